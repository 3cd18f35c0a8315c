"""ResNets built from fused blocks, with torchvision's constructors, module structure and state_dict keys
(a torchvision checkpoint loads with strict=True, and back). No weights are downloaded: to start from
pretrained weights, build the torchvision model with them and call :func:`fused_resnet.convert`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import Proxy

from . import ops
from .fusion import Fusable, conv_blocker, hooks_blocker, norm_blocker, relu_blocker
from .memory import check_memory_policy, set_memory_policy
from .modules import BasicBlock, Bottleneck, conv1x1, conv_bn
from .ops import FoldedWeights
from .params import MaxPoolParams
from .tensors import memory_format_of

__all__ = [
    "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
]


class FusedStem(Fusable):
    """A ResNet whose stem, conv1 -> bn1 -> activation, runs as one fused op: torchvision's (the activation
    `relu`), the library's ResNet and CifarResNet, or timm's (`act1`, and conv1 may be a deep stem: resnet50d's
    nn.Sequential of conv, norm, act, conv, norm, act, conv). The model's forward calls forward_stem()."""

    _stem_activation = "relu"  # the attribute name of the stem's activation
    _deep_stem = False  # whether conv1 may be a deep stem (timm's)
    memory: str | None = None  # the memory policy of the stem (fused_resnet.memory); None: the program's

    def _deep_stem_layers(self) -> list[tuple[tuple[str, nn.Module], ...]]:
        """The ((name, conv), (name, norm), (name, act)) triples of a deep stem: three, the last finished by bn1
        and the activation."""
        conv1, act = self.conv1, self._stem_activation
        return [(("conv1.0", conv1[0]), ("conv1.1", conv1[1]), ("conv1.2", conv1[2])),
                (("conv1.3", conv1[3]), ("conv1.4", conv1[4]), ("conv1.5", conv1[5])),
                (("conv1.6", conv1[6]), ("bn1", self.bn1), (act, getattr(self, act)))]

    def structure_blocker(self) -> str | None:
        conv1, act = self.conv1, self._stem_activation
        if not (self._deep_stem and isinstance(conv1, nn.Sequential)):
            return (conv_blocker("conv1", conv1) or norm_blocker("bn1", self.bn1)
                    or relu_blocker(act, getattr(self, act)))
        if type(conv1).forward is not nn.Sequential.forward or len(conv1) != 7:
            return "conv1 is not a deep stem of conv, norm, act, conv, norm, act, conv"
        for (conv_name, conv), (bn_name, bn), (act_name, activation) in self._deep_stem_layers():
            reason = conv_blocker(conv_name, conv) or norm_blocker(bn_name, bn) or relu_blocker(act_name, activation)
            if reason:
                return reason
        return None

    def fusion_blocker(self) -> str | None:
        act = self._stem_activation
        return self.structure_blocker() or hooks_blocker(
            [("conv1", self.conv1), ("bn1", self.bn1), (act, getattr(self, act))]
        )

    @staticmethod
    def enter_blocks(x: Tensor) -> tuple[Tensor, torch.memory_format]:
        """(x in the memory format the stem and the blocks should run in, x's own): the one the backend's
        convolutions run fastest in (ops.preferred_memory_format). The model turns its features back into x's format
        after the last stage (:meth:`leave_blocks`), so what it returns is laid out as before: one conversion at
        each end. In inference an NCHW input runs channels_last on the cpu backend, with weights folded in that
        layout once. Under autograd too, where the cpu backend's GEMMs may run: they read the NCHW parameters as
        they are and give their gradients in that layout (resnet50 at batch 16, 160x160, float32 NCHW on a 2-core
        AVX-512 Xeon, paired: the fused train step 1.03x torchvision's with NCHW blocks, 1.17x with channels_last
        ones; docs/design.md §4).
        Under torch.compile the preferred layout in training too: a compiled NCHW model with NCHW blocks trained
        slower than eager (resnet50 at batch 4, 128x128: 0.85x torchvision eager, against 0.98x with channels_last
        blocks, paired runs on an AVX-512 Xeon; at batch 16, 160x160: 0.84x, against 1.10x)."""
        if isinstance(x, Proxy):  # torch.fx traces the model: one node (fused_resnet/fx.py, which imports this)
            from . import fx
            return fx.traced_enter_blocks(x)
        entry_format = memory_format_of(x)
        if x.dim() != 4:
            return x, entry_format
        training = torch.is_grad_enabled() and not torch.compiler.is_compiling()
        return x.contiguous(memory_format=ops.preferred_memory_format(x, training=training)), entry_format

    @staticmethod
    def leave_blocks(x: Tensor, entry_format: torch.memory_format) -> Tensor:
        """The last stage's features in the input's memory format (see :meth:`enter_blocks`)."""
        if isinstance(x, Proxy):  # torch.fx traces the model: one node (fused_resnet/fx.py)
            from . import fx
            return fx.traced_leave_blocks(x, entry_format)
        return x if x.dim() != 4 else x.contiguous(memory_format=entry_format)

    def forward_stem_pool(self, x: Tensor) -> Tensor:
        """maxpool(forward_stem(x)): one fused op where the pool is a plain nn.MaxPool2d after a one-convolution
        stem, which under the "min" memory policy keeps only the convolution's output for backward (not the
        activation and the pool's indices, together 1.5 times its size in float32)."""
        pool = self.maxpool
        if (isinstance(x, Proxy) or type(pool) is not nn.MaxPool2d or pool.return_indices
                or isinstance(self.conv1, nn.Sequential) or self.fusion_blocker() is not None
                or hooks_blocker([("maxpool", pool)]) is not None):
            return pool(self.forward_stem(x))
        return ops.conv_bn_relu(x, conv_bn(self.conv1, self.bn1, "conv1/bn1"), max_pool=MaxPoolParams.of(pool),
                                folded=self._folded, memory=self.memory)

    def forward_stem(self, x: Tensor) -> Tensor:
        """activation(bn1(conv1(x))), as one fused op unless fusion_blocker() says otherwise."""
        if isinstance(x, Proxy):  # torch.fx traces the model: the stem is one node (fused_resnet/fx.py)
            from . import fx
            return fx.stem_call(self, x)
        if self.fusion_blocker() is not None:
            return getattr(self, self._stem_activation)(self.bn1(self.conv1(x)))
        conv1 = self.conv1
        if not isinstance(conv1, nn.Sequential):
            return ops.conv_bn_relu(x, conv_bn(conv1, self.bn1, "conv1/bn1"), folded=self._folded, memory=self.memory)
        units = [conv_bn(conv, bn, f"{conv_name}/{bn_name}")
                 for (conv_name, conv), (bn_name, bn), _ in self._deep_stem_layers()]
        # A chain of conv-BN-ReLU units is a residual block without a shortcut: the deep stem runs as one op whose
        # normalized activations between the convolutions are recomputed in backward, never saved.
        return ops.residual_block(x, units, None, folded=self._folded, memory=self.memory)


class ResNet(nn.Module, FusedStem):
    """torchvision.models.ResNet with a fused stem; `block` is BasicBlock or Bottleneck (fused ones by default
    through the factories, but any block with torchvision's constructor works)."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: list[bool] | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        memory: str | None = None,
    ) -> None:
        super().__init__()
        check_memory_policy(memory, "ResNet: memory")
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation should be None or a 3-element tuple, "
                f"got {replace_stride_with_dilation}"
            )
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self._folded = FoldedWeights()

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        # Zero the last BN of each residual branch so that every block starts as an identity
        # (Goyal et al., "Accurate, Large Minibatch SGD", 2017), as torchvision does.
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)
        set_memory_policy(self, memory)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1, dilate: bool = False
    ) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride), norm_layer(planes * block.expansion)
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation,
                        norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation, norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def _forward_impl(self, x: Tensor) -> Tensor:
        x, entry_format = self.enter_blocks(x)
        x = self.forward_stem_pool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.leave_blocks(self.layer4(x), entry_format)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(x)


def _resnet(name: str, block: type[BasicBlock | Bottleneck], layers: list[int], weights: Any, progress: bool,
            **kwargs: Any) -> ResNet:
    if weights is not None:
        raise ValueError(
            f"fused_resnet.{name} does not download weights; build torchvision.models.{name}(weights=...) "
            "and pass it to fused_resnet.convert(), which keeps its parameters"
        )
    return ResNet(block, layers, **kwargs)


def _fixed(kwargs: dict[str, Any], **params: Any) -> dict[str, Any]:
    """kwargs with the parameters a named variant fixes; a conflicting value is an error, as in torchvision."""
    for param, value in params.items():
        if param in kwargs and kwargs[param] != value:
            raise ValueError(f"The parameter '{param}' expected value {value} but got {kwargs[param]} instead.")
    return {**kwargs, **params}


def resnet18(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnet18", BasicBlock, [2, 2, 2, 2], weights, progress, **kwargs)


def resnet34(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnet34", BasicBlock, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet50(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnet50", Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet101(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnet101", Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def resnet152(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnet152", Bottleneck, [3, 8, 36, 3], weights, progress, **kwargs)


def resnext50_32x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnext50_32x4d", Bottleneck, [3, 4, 6, 3], weights, progress,
                   **_fixed(kwargs, groups=32, width_per_group=4))


def resnext101_32x8d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnext101_32x8d", Bottleneck, [3, 4, 23, 3], weights, progress,
                   **_fixed(kwargs, groups=32, width_per_group=8))


def resnext101_64x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnext101_64x4d", Bottleneck, [3, 4, 23, 3], weights, progress,
                   **_fixed(kwargs, groups=64, width_per_group=4))


def wide_resnet50_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("wide_resnet50_2", Bottleneck, [3, 4, 6, 3], weights, progress,
                   **_fixed(kwargs, width_per_group=64 * 2))


def wide_resnet101_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("wide_resnet101_2", Bottleneck, [3, 4, 23, 3], weights, progress,
                   **_fixed(kwargs, width_per_group=64 * 2))
