"""fused_resnet: fused conv-BatchNorm-ReLU and BatchNorm-add-ReLU kernels behind drop-in torchvision ResNet blocks.

    model = fused_resnet.convert(torchvision.models.resnet50())   # in place, same state_dict
    block = fused_resnet.Bottleneck(256, 64)                       # torchvision's signature

Backends (see :mod:`fused_resnet.backends`): ``auto`` (default), ``torch``, ``cpu``, ``cuda``, ``triton``;
choose with ``fused_resnet.use_backend(name)`` or the ``FUSED_RESNET_BACKEND`` environment variable.
"""

from . import ops, reference
from .backends import available_backends, backend_status, use_backend
from .cifar import CifarResNet, cifar_resnet
from .convert import FusionWarning, convert, convert_sync_batchnorm, unfused_modules
from .kernels.native import CPU_CONVOLUTIONS, cpu_convolution_choices, use_cpu_convolutions
from .memory import MEMORY_POLICIES, set_memory_policy, use_memory_policy
from . import fx  # after .models, which it imports
from .models import (
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)
from .modules import BasicBlock, Bottleneck, ConvBNReLU, TimmBasicBlock, TimmBottleneck
from .ops import clear_folded_weights
from .params import BatchNormParams, ConvBN, ConvParams, MaxPoolParams, ZeroPadIdentity
from .warmup import WarmupReport, warmup

__version__ = "0.1.0"

__all__ = [
    "BasicBlock", "BatchNormParams", "Bottleneck", "CPU_CONVOLUTIONS", "CifarResNet", "ConvBN", "ConvBNReLU",
    "ConvParams",
    "FusionWarning", "MEMORY_POLICIES", "MaxPoolParams", "ResNet", "TimmBasicBlock", "TimmBottleneck",
    "WarmupReport", "ZeroPadIdentity", "available_backends", "backend_status", "cifar_resnet",
    "clear_folded_weights", "convert", "convert_sync_batchnorm", "cpu_convolution_choices", "fx", "ops", "reference",
    "resnet18", "resnet34",
    "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "set_memory_policy", "unfused_modules", "use_backend", "use_cpu_convolutions", "use_memory_policy", "warmup",
    "wide_resnet50_2",
    "wide_resnet101_2",
]
