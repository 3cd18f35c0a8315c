"""Whether a fused module can run its fused op, and if not, why: the Fusable interface and the checks on the
submodules it fuses.

A fused module runs the plain PyTorch sequence of its submodules instead of the fused op whenever the op would
not be the same computation. Three questions decide it, each a method of :class:`Fusable`:
  structure_blocker(): is the module built of layers the op computes (a plain Conv2d, a supported norm layer,
      nn.ReLU...)? convert() asks once, before swapping a module in, and leaves the original with a FusionWarning
      when it is not;
  training_blocker(): does the module fall back whenever it trains (timm's stochastic depth drops whole branches,
      which the op does not)? convert() notes it in the FusionWarning;
  fusion_blocker(): does the module fall back on its next forward (its structure, a layer dropping right now,
      hooks that would not fire inside the op)? Every forward asks, so it stays cheap.
Every fused module implements it: the residual blocks and ConvBNReLU (fused_resnet.modules), the stem of the
library's ResNet and CifarResNet and of convert()'s FusedStemResNet and FusedTimmResNet (fused_resnet.models'
FusedStem); fused_resnet.unfused_modules() reports the fusion_blocker() of each.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from torch import nn
from torch.nn.modules import module as _module_globals

__all__ = [
    "Fusable", "conv_blocker", "downsample_blocker", "hooks_blocker", "is_frozen_batch_norm", "norm_blocker",
    "relu_blocker",
]


class Fusable:
    """A module that runs a fused op when its submodules allow it, and PyTorch's sequence of them otherwise.
    Each method returns why the fused op cannot run, in words for a warning (naming the submodule), or None."""

    def structure_blocker(self) -> str | None:
        """Why the module's layers are not what the fused op computes, whatever its mode or hooks."""
        raise NotImplementedError(f"{type(self).__name__} must say when its structure blocks fusion")

    def training_blocker(self) -> str | None:
        """Why the module runs unfused whenever it trains although its structure fuses (checked by convert())."""
        return None

    def fusion_blocker(self) -> str | None:
        """Why the module's next forward runs unfused: its structure, a training-time fallback that applies now,
        or hooks. Called on every forward."""
        raise NotImplementedError(f"{type(self).__name__} must say when its forward runs unfused")

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module before compiling any (nothing is compiled or cached yet):
        # the fused ops are Python autograd functions and kernel dispatch, which TorchScript cannot compile.
        raise RuntimeError(
            f"torch.jit.script cannot compile fused_resnet's {type(self).__name__}: its fused ops run Python "
            "(autograd functions, kernel dispatch) that TorchScript does not support. Use torch.compile(model), "
            "torch.export.export(model, (x,)) or torch.jit.trace(model, x) instead.")


def is_frozen_batch_norm(module: nn.Module) -> bool:
    """Whether `module` is torchvision's FrozenBatchNorm2d (timm's models use the same class). Looked up without
    importing torchvision: an instance exists only once its module has been imported."""
    misc = sys.modules.get("torchvision.ops.misc")
    return misc is not None and type(module) is misc.FrozenBatchNorm2d


def conv_blocker(name: str, conv: nn.Module) -> str | None:
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
        return f"{name} is a {type(conv).__name__}, not a plain nn.Conv2d"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"{name} pads with padding={conv.padding!r}, padding_mode={conv.padding_mode!r} (fused: zeros, numeric)"
    return None


def norm_blocker(name: str, bn: nn.Module) -> str | None:
    if type(bn) is nn.SyncBatchNorm or is_frozen_batch_norm(bn):
        return None
    if not isinstance(bn, nn.BatchNorm2d) or type(bn).forward is not nn.BatchNorm2d.forward:
        return f"{name} is a {type(bn).__name__}, not nn.BatchNorm2d, nn.SyncBatchNorm or FrozenBatchNorm2d"
    return None


def relu_blocker(name: str, relu: nn.Module) -> str | None:
    if type(relu) is not nn.ReLU:
        return f"{name} is a {type(relu).__name__}, not nn.ReLU"
    return None


def downsample_blocker(downsample: nn.Module) -> str | None:
    """Why a projection shortcut cannot run fused, or None. Fused: nn.Sequential(conv, norm) (torchvision's and
    timm's downsample_conv), and timm's downsample_avg, nn.Sequential(pool, conv, norm) with an nn.AvgPool2d (run
    as it is, its output the projection's input) or an nn.Identity (stride 1) as the pool."""
    expected = "downsample is not nn.Sequential(conv, BatchNorm2d)"
    if not (isinstance(downsample, nn.Sequential) and type(downsample).forward is nn.Sequential.forward):
        return expected
    if len(downsample) == 3 and type(downsample[0]) in (nn.AvgPool2d, nn.Identity):
        return conv_blocker("downsample.1", downsample[1]) or norm_blocker("downsample.2", downsample[2])
    if len(downsample) != 2:
        return expected
    return conv_blocker("downsample.0", downsample[0]) or norm_blocker("downsample.1", downsample[1])


def hooks_blocker(modules: Sequence[tuple[str, nn.Module]]) -> str | None:
    """Whether hooks on the (name, module) pairs or their submodules, or global module hooks, are registered:
    they would not fire inside a fused op."""
    if _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks or \
            _module_globals._global_backward_hooks or _module_globals._global_backward_pre_hooks:
        return "global module hooks are registered (they would not fire inside a fused op)"
    # Checked on every forward: walk the modules cheaply, and name the hooked one only when there is one.
    for name, parent in modules:
        for sub in parent.modules():
            if sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks or sub._backward_pre_hooks:
                hooked = next(n for n, m in parent.named_modules(prefix=name) if m is sub)
                return f"{hooked} has hooks (they would not fire inside a fused op)"
    return None
