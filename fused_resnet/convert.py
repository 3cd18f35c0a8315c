"""convert(model): fuse an existing torchvision model in place, keeping its parameters, buffers and state_dict keys.

Swapped: torchvision's BasicBlock and Bottleneck (for fused_resnet's), Conv2dNormActivation with BatchNorm2d and
ReLU (for ConvBNReLU), and the stem of a torchvision ResNet (the model becomes a FusedStemResNet, a subclass of
torchvision's ResNet whose conv1-bn1-relu runs as one fused op). The new modules share the originals' submodules,
so every parameter and buffer is the same tensor and a checkpoint loads both ways with strict=True.
Modules that cannot be fused (another norm layer, a subclass with its own forward, a non-standard downsample)
are left as they are and reported with a FusionWarning.
"""

from __future__ import annotations

import functools
import warnings

from torch import nn

from .models import ResNet, stem_blocker, stem_forward
from .modules import BasicBlock, Bottleneck, ConvBNReLU

__all__ = ["FusionWarning", "convert", "unfused_modules"]


class FusionWarning(UserWarning):
    """convert() left some modules unfused."""


def _torchvision():
    try:
        import torchvision
    except ImportError:
        return None
    return torchvision


@functools.cache
def _fused_stem_resnet_class() -> type:
    torchvision = _torchvision()

    class FusedStemResNet(torchvision.models.ResNet):
        """A torchvision ResNet whose stem (conv1, bn1, relu) runs as one fused op; convert() makes it."""

        _forward_impl = ResNet._forward_impl

        def _fusion_blocker(self) -> str | None:
            return stem_blocker(self)

        def _structure_blocker(self) -> str | None:
            return ResNet._structure_blocker(self)

    FusedStemResNet.__module__ = __name__
    FusedStemResNet.__qualname__ = "FusedStemResNet"  # pickled by reference: fused_resnet.convert.FusedStemResNet
    return FusedStemResNet


def __getattr__(name: str):
    # Unpickling a converted model looks the class up here; it exists only where torchvision does.
    if name == "FusedStemResNet" and _torchvision() is not None:
        return _fused_stem_resnet_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fused_counterpart(module: nn.Module, torchvision) -> tuple[nn.Module | None, str | None]:
    """(the fused module replacing `module`, None), (None, why it cannot be fused), or (None, None) when
    `module` is not something convert() fuses."""
    if torchvision is None:
        return None, None
    tv_resnet = torchvision.models.resnet
    candidates = {tv_resnet.BasicBlock: BasicBlock, tv_resnet.Bottleneck: Bottleneck,
                  torchvision.ops.misc.Conv2dNormActivation: ConvBNReLU}
    for tv_class, fused_class in candidates.items():
        if type(module) is tv_class:
            fused = fused_class.adopt(module)
            reason = fused._structure_blocker()
            return (None, reason) if reason else (fused, None)
        if isinstance(module, tv_class) and not isinstance(module, fused_class):
            return None, f"{type(module).__name__} subclasses torchvision's {tv_class.__name__} (its forward may differ)"
    return None, None


def convert(model: nn.Module) -> nn.Module:
    """Fuses `model` in place and returns it (a new module only when `model` itself is a block)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected a torch.nn.Module, got {type(model).__name__}")
    torchvision = _torchvision()
    skipped: dict[str, str] = {}
    replacements = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            fused, reason = _fused_counterpart(child, torchvision)
            qualified = f"{parent_name}.{child_name}" if parent_name else child_name
            if fused is not None:
                replacements.append((parent, child_name, fused))
            elif reason is not None:
                skipped[qualified] = reason
    for parent, child_name, fused in replacements:
        setattr(parent, child_name, fused)

    fused_root, reason = _fused_counterpart(model, torchvision)
    if fused_root is not None:
        model = fused_root
    elif reason is not None:
        skipped["(the model)"] = reason
    if torchvision is not None and type(model) is torchvision.models.ResNet:
        reason = ResNet._structure_blocker(model)
        if reason is None:
            model.__class__ = _fused_stem_resnet_class()
        else:
            skipped["(stem)"] = reason
    if skipped:
        details = "; ".join(f"{name}: {why}" for name, why in skipped.items())
        warnings.warn(f"convert left {len(skipped)} module(s) unfused: {details}", FusionWarning, stacklevel=2)
    return model


def unfused_modules(model: nn.Module) -> dict[str, str]:
    """The modules of `model` that would not run fused ops on their next forward, and why: fused_resnet modules
    that fall back to PyTorch (hooks, an unusual norm layer...) and torchvision blocks convert() would swap."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unfused_modules: expected a torch.nn.Module, got {type(model).__name__}")
    torchvision = _torchvision()
    found = {}
    for name, module in model.named_modules():
        label = name or "(the model)"
        blocker = getattr(module, "_fusion_blocker", None)
        if blocker is not None:
            reason = blocker()
            if reason is not None:
                found[label] = reason
            continue
        fused, reason = _fused_counterpart(module, torchvision)
        if fused is not None:
            found[label] = f"a torchvision {type(module).__name__}: call fused_resnet.convert(model)"
        elif reason is not None:
            found[label] = reason
    return found
