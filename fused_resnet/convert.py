"""convert(model): fuse an existing torchvision or timm model in place, keeping its parameters, buffers and
state_dict keys.

Swapped: torchvision's BasicBlock and Bottleneck (for fused_resnet's), Conv2dNormActivation with BatchNorm2d and
ReLU (for ConvBNReLU), timm.models.resnet's BasicBlock and Bottleneck (for TimmBasicBlock and TimmBottleneck), and
the stem of a torchvision or timm ResNet (the model becomes a FusedStemResNet or FusedTimmResNet, a subclass of
the library's ResNet whose stem runs as one fused op). The norm layers may be BatchNorm2d or torchvision's
FrozenBatchNorm2d. The new modules share the originals' submodules, so every parameter and buffer is the same
tensor and a checkpoint loads both ways with strict=True.
Modules that cannot be fused (another norm layer, a subclass with its own forward, a non-standard downsample,
timm's attention or anti-aliasing layers) are left as they are and reported with a FusionWarning, and so are
timm blocks with stochastic depth, which are swapped but run unfused while they train.
"""

from __future__ import annotations

import functools
import sys
import warnings

import torch
from torch import nn

from .fusion import Fusable
from .memory import check_memory_policy, set_memory_policy
from .models import FusedStem, ResNet
from .modules import BasicBlock, Bottleneck, ConvBNReLU, TimmBasicBlock, TimmBottleneck, timm_resnet_module
from .ops import FoldedWeights

__all__ = ["FusionWarning", "convert", "convert_sync_batchnorm", "unfused_modules"]


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

    class FusedStemResNet(torchvision.models.ResNet, FusedStem):
        """A torchvision ResNet whose stem (conv1, bn1, relu) runs as one fused op; convert() makes it."""

        _forward_impl = ResNet._forward_impl

    FusedStemResNet.__module__ = __name__
    FusedStemResNet.__qualname__ = "FusedStemResNet"  # pickled by reference: fused_resnet.convert.FusedStemResNet
    return FusedStemResNet


@functools.cache
def _fused_timm_resnet_class() -> type:
    timm_resnet = timm_resnet_module()

    class FusedTimmResNet(timm_resnet.ResNet, FusedStem):
        """A timm ResNet whose stem (conv1, or a deep stem's three convolutions, with bn1 and act1) runs as one
        fused op; convert() makes it."""

        _stem_activation = "act1"
        _deep_stem = True

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            # timm's forward_features with the stem fused.
            x, entry_format = self.enter_blocks(x)
            x = self.forward_stem_pool(x)
            stages = [self.layer1, self.layer2, self.layer3, self.layer4]
            if self.grad_checkpointing and not torch.jit.is_scripting():
                return timm_resnet.checkpoint_seq(stages, x, flatten=True)
            for stage in stages:
                x = stage(x)
            return self.leave_blocks(x, entry_format)

    FusedTimmResNet.__module__ = __name__
    FusedTimmResNet.__qualname__ = "FusedTimmResNet"  # pickled by reference: fused_resnet.convert.FusedTimmResNet
    return FusedTimmResNet


def __getattr__(name: str):
    # Unpickling a converted model looks the class up here; it exists only where torchvision (timm) does.
    if name == "FusedStemResNet" and _torchvision() is not None:
        return _fused_stem_resnet_class()
    if name == "FusedTimmResNet":
        return _fused_timm_resnet_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _candidates(torchvision) -> dict[type, type]:
    """{class convert() swaps: its fused counterpart}. timm's classes count only once timm is imported: a model
    holding timm blocks has imported it, and importing timm for others would cost seconds."""
    candidates: dict[type, type] = {}
    if torchvision is not None:
        tv_resnet = torchvision.models.resnet
        candidates.update({tv_resnet.BasicBlock: BasicBlock, tv_resnet.Bottleneck: Bottleneck,
                           torchvision.ops.misc.Conv2dNormActivation: ConvBNReLU})
    timm_resnet = sys.modules.get("timm.models.resnet")
    if timm_resnet is not None:
        candidates.update({timm_resnet.BasicBlock: TimmBasicBlock, timm_resnet.Bottleneck: TimmBottleneck})
    return candidates


def _fused_counterpart(module: nn.Module, candidates: dict[type, type]) -> tuple[nn.Module | None, str | None]:
    """(the fused module replacing `module`, None), (None, why it cannot be fused), or (None, None) when
    `module` is not something convert() fuses."""
    for original_class, fused_class in candidates.items():
        if type(module) is original_class:
            if fused_class is ConvBNReLU and len(module) == 1:
                return None, None  # a lone convolution (an FPN's Conv2dNormActivation): nothing to fuse
            fused = fused_class.adopt(module)
            reason = fused.structure_blocker()
            return (None, reason) if reason else (fused, None)
        if isinstance(module, original_class) and not isinstance(module, fused_class):
            library = original_class.__module__.split(".")[0]
            return None, (f"{type(module).__name__} subclasses {library}'s {original_class.__name__} "
                          "(its forward may differ)")
    return None, None


def _check_model(op: str, model: object) -> None:
    if isinstance(model, type) and issubclass(model, nn.Module):
        raise TypeError(f"{op}: expected a torch.nn.Module instance, got the class {model.__name__}: instantiate it "
                        "first, e.g. torchvision.models.resnet50()")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"{op}: expected an eager torch.nn.Module, got a TorchScript {type(model).__name__}, whose "
                        "forward is compiled: convert the model before scripting it")


def convert(
    model: nn.Module, sync_bn: bool = False, process_group: object | None = None, *, memory: str | None = None
) -> nn.Module:
    """Fuses `model` in place and returns it (a new module only when `model` itself is a block).

    With `sync_bn`, every BatchNorm becomes an nn.SyncBatchNorm (see :func:`convert_sync_batchnorm`) whose
    statistics the fused ops merge over `process_group` (the default group when None) in training. `memory` sets
    the memory policy of training of every fused module ("default" or "min", see :mod:`fused_resnet.memory`);
    None leaves it to the program's."""
    _check_model("convert", model)
    check_memory_policy(memory, "convert: memory")
    if not isinstance(sync_bn, bool):
        raise TypeError(f"convert: expected sync_bn to be a bool, got {type(sync_bn).__name__}")
    if process_group is not None and not sync_bn:
        raise ValueError("convert: a process_group is only used with sync_bn=True")
    torchvision = _torchvision()
    candidates = _candidates(torchvision)
    skipped: dict[str, str] = {}
    replacements = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            qualified = f"{parent_name}.{child_name}" if parent_name else child_name
            fused, reason = _fused_counterpart(child, candidates)
            if fused is not None:
                replacements.append((parent, child_name, fused))
                reason = _training_note(fused)
            if reason is not None:
                skipped[qualified] = reason
    for parent, child_name, fused in replacements:
        setattr(parent, child_name, fused)

    fused_root, reason = _fused_counterpart(model, candidates)
    if fused_root is not None:
        model = fused_root
        reason = _training_note(fused_root)
    if reason is not None:
        skipped["(the model)"] = reason
    stems = {}  # {a library's ResNet: the subclass that fuses its stem}
    if torchvision is not None:
        stems[torchvision.models.ResNet] = _fused_stem_resnet_class
    timm_resnet = sys.modules.get("timm.models.resnet")
    if timm_resnet is not None:
        stems[timm_resnet.ResNet] = _fused_timm_resnet_class
    original_class = type(model)
    if original_class in stems:
        # The model becomes the subclass in place (its own parameters, buffers, hooks), and stays one if its stem
        # can fuse.
        model.__class__ = stems[original_class]()
        reason = model.structure_blocker()
        if reason is not None:
            model.__class__ = original_class
            skipped["(stem)"] = reason
        else:
            model._folded = FoldedWeights()  # made here, not on the first call, which may be inside torch.compile
    set_memory_policy(model, memory)
    if skipped:
        details = "; ".join(f"{name}: {why}" for name, why in skipped.items())
        warnings.warn(f"convert left {len(skipped)} module(s) unfused: {details}", FusionWarning, stacklevel=2)
    return convert_sync_batchnorm(model, process_group) if sync_bn else model


def convert_sync_batchnorm(model: nn.Module, process_group: object | None = None) -> nn.Module:
    """torch.nn.SyncBatchNorm.convert_sync_batchnorm: every BatchNorm*d of `model` becomes an nn.SyncBatchNorm
    sharing its parameters and buffers (the state_dict keys stay). Fused modules run them fused, merging the
    per-channel statistics over `process_group` (the default group when None) inside the fused ops in training
    under torch.distributed; elsewhere (eval, one rank) they are ordinary BatchNorms. Returns the model (a new
    module only when `model` itself is a BatchNorm)."""
    _check_model("convert_sync_batchnorm", model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)


def _training_note(fused: Fusable) -> str | None:
    """For the FusionWarning: why a swapped module will still run unfused while it trains, or None."""
    reason = fused.training_blocker()
    return f"runs unfused while training ({reason})" if reason else None


def unfused_modules(model: nn.Module) -> dict[str, str]:
    """The modules of `model` that would not run fused ops on their next forward, and why: fused_resnet modules
    that fall back to PyTorch (hooks, an unusual norm layer...) and torchvision or timm blocks convert() would
    swap."""
    _check_model("unfused_modules", model)
    candidates = _candidates(_torchvision())
    found = {}
    for name, module in model.named_modules():
        label = name or "(the model)"
        if isinstance(module, Fusable):
            reason = module.fusion_blocker()
            if reason is not None:
                found[label] = reason
            continue
        fused, reason = _fused_counterpart(module, candidates)
        if fused is not None:
            library = type(module).__module__.split(".")[0]
            found[label] = f"a {library} {type(module).__name__}: call fused_resnet.convert(model)"
        elif reason is not None:
            found[label] = reason
    return found
