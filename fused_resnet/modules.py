"""Drop-in fused modules: torchvision's BasicBlock and Bottleneck, timm's BasicBlock and Bottleneck
(timm.models.resnet), and torchvision.ops.Conv2dNormActivation's conv-BN-ReLU, with the same constructor
signatures, attribute names and state_dict keys.

The modules only hold parameters; their forward hands the current tensors to the fused ops. The norm layers they
fuse are nn.BatchNorm2d, nn.SyncBatchNorm (the fused ops merge the batch statistics over its process group) and
torchvision's FrozenBatchNorm2d (an eval-mode BatchNorm in every mode, as detection backbones use it). A module
runs the plain PyTorch sequence of its submodules instead whenever the fused op would not be the same
computation: another norm layer (a subclass that overrides forward, GroupNorm...), a changed activation, a
downsample other than conv+BatchNorm2d, timm's anti-aliasing, attention or active stochastic-depth layers, or
forward/backward hooks on a submodule (which would not fire inside a fused op). Each module says so through the
:class:`fused_resnet.fusion.Fusable` interface; :func:`fused_resnet.unfused_modules` lists which modules of a model
fall back, and why.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch.distributed as dist
from torch import Tensor, nn
from torch.fx import Proxy

from . import ops
from .fusion import Fusable, conv_blocker, downsample_blocker, hooks_blocker, is_frozen_batch_norm, norm_blocker, \
    relu_blocker
from .memory import check_memory_policy
from .ops import FoldedWeights
from .params import BatchNormParams, ConvBN, ConvParams, ZeroPadIdentity

__all__ = [
    "BasicBlock", "Bottleneck", "ConvBNReLU", "TimmBasicBlock", "TimmBottleneck", "batch_norm_params", "conv_bn",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, groups=groups, bias=False,
                     dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def sync_process_group(bn: nn.SyncBatchNorm) -> object | None:
    """The process group whose batch statistics a SyncBatchNorm merges on its next forward, or None when it
    merges none: as nn.SyncBatchNorm decides, only in training, with torch.distributed initialized, over its
    process_group (the default group when None) when that has more than one rank."""
    if not (bn.training and dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group if bn.process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def batch_norm_params(bn: nn.Module) -> BatchNormParams:
    """The op-level view of a BatchNorm2d, SyncBatchNorm or FrozenBatchNorm2d (its current tensors and flags)."""
    if type(bn) is not nn.BatchNorm2d and is_frozen_batch_norm(bn):
        # An eval-mode BatchNorm whatever the module's mode: running statistics, never updated; its weight and
        # bias are buffers, so no gradient reaches them, while the input and the convolution still get theirs.
        return BatchNormParams(bn.weight, bn.bias, bn.running_mean, bn.running_var, None, 0.0, bn.eps, False)
    return BatchNormParams(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum,
                           bn.eps, bn.training, sync_process_group(bn) if type(bn) is nn.SyncBatchNorm else None)


def conv_bn(conv: nn.Conv2d, bn: nn.Module, name: str) -> ConvBN:
    """The op-level view of a Conv2d followed by a norm layer batch_norm_params() takes (current tensors, flags)."""
    return ConvBN(
        ConvParams(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups),
        batch_norm_params(bn),
        name,
    )


SHORTCUTS = (None, "A", "B", "none")


class _ResidualBlock(nn.Module, Fusable):
    """What BasicBlock and Bottleneck share: torchvision's constructor (each builds its branch F in
    _build_branch) and relu(F(x) + shortcut(x)) where F chains conv/bn pairs with ReLU between them, fused
    through ops.residual_block.

    The shortcut follows the `shortcut` argument (keyword-only, beyond torchvision's signature), in the terms of
    He et al. 2015, §3.3:
      None:   torchvision's: `downsample` when given, else the identity;
      "A":    the identity, subsampled by `stride` and zero-padded to the new channels when the shape changes
              (parameter-free; the paper's CIFAR networks);
      "B":    a projection (1x1 conv + norm, built here unless `downsample` is given) when the shape changes;
      "none": no shortcut (the paper's plain networks).
    `memory` (keyword-only too) is the block's memory policy in training, "default" or "min"; None (the default)
    follows the program's (:mod:`fused_resnet.memory`).
    """

    expansion: int
    # (conv, bn) attribute names of F, in order; the shortcut is `downsample` (or option A).
    _pairs: tuple[tuple[str, str], ...]
    # The attribute names of the ReLUs (torchvision's blocks apply one `relu` everywhere).
    _activations: tuple[str, ...] = ("relu",)
    memory: str | None = None  # the memory policy (blocks pickled before it existed read this default)

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        shortcut: str | None = None,
        memory: str | None = None,
    ) -> None:
        super().__init__()
        self.memory = check_memory_policy(memory, f"{type(self).__name__}: memory")
        self._folded = FoldedWeights()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._build_branch(inplanes, planes, stride, groups, base_width, dilation, norm_layer)
        self.downsample = downsample
        self.stride = stride
        self._init_shortcut(shortcut, inplanes, stride, norm_layer)

    def _build_branch(self, inplanes: int, planes: int, stride: int, groups: int, base_width: int, dilation: int,
                      norm_layer: Callable[..., nn.Module]) -> None:
        """Registers the branch's convolutions, norm layers and ReLU in torchvision's order (the state_dict's)."""
        raise NotImplementedError(f"{type(self).__name__} must build its residual branch")

    def _init_shortcut(self, shortcut: str | None, inplanes: int, stride: int,
                       norm_layer: Callable[..., nn.Module]) -> None:
        if shortcut not in SHORTCUTS:
            raise ValueError(f"{type(self).__name__}: expected shortcut to be one of {SHORTCUTS}, got {shortcut!r}")
        out_channels = getattr(self, self._pairs[-1][0]).out_channels
        changes_shape = stride != 1 or inplanes != out_channels
        if shortcut in ("A", "none") and self.downsample is not None:
            raise ValueError(f"{type(self).__name__}: shortcut={shortcut!r} takes no downsample module")
        if shortcut == "A" and changes_shape and out_channels < inplanes:
            raise ValueError(f"{type(self).__name__}: option A pads channels; it cannot go from {inplanes} to "
                             f"{out_channels}")
        if shortcut == "B" and changes_shape and self.downsample is None:
            self.downsample = nn.Sequential(conv1x1(inplanes, out_channels, stride), norm_layer(out_channels))
        self.shortcut = shortcut
        self._zero_pad = ZeroPadIdentity.between(inplanes, out_channels, stride) \
            if shortcut == "A" and changes_shape else None

    @classmethod
    def adopt(cls, block: nn.Module) -> _ResidualBlock:
        """A fused block built around the submodules, parameters, buffers, hooks and mode of a torchvision block
        of the same kind (shared, not copied)."""
        fused = cls.__new__(cls)
        fused._take_over(block)
        return fused

    def _take_over(self, block: nn.Module) -> None:
        """Becomes `block` (its submodules, parameters, buffers, hooks and mode, shared) with its own shortcut
        (the block's downsample or the identity) and folded-weight cache."""
        self.__dict__.update(block.__dict__)
        self._folded = FoldedWeights()
        self.shortcut, self._zero_pad = None, None
        self.memory = None

    def structure_blocker(self) -> str | None:
        for conv_name, bn_name in self._pairs:
            reason = conv_blocker(conv_name, getattr(self, conv_name)) or norm_blocker(bn_name, getattr(self, bn_name))
            if reason:
                return reason
        for name in self._activations:
            reason = relu_blocker(name, getattr(self, name))
            if reason:
                return reason
        if self.downsample is not None:
            return downsample_blocker(self.downsample)
        return None

    def fusion_blocker(self) -> str | None:
        return self.structure_blocker() or hooks_blocker(list(self.named_children()))

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Proxy):  # torch.fx traces the model: one call of the block (fused_resnet/fx.py)
            from . import fx  # (which imports this module)
            return fx.module_call(self, x)
        if self.fusion_blocker() is not None:
            return self._unfused_forward(x)
        units = [conv_bn(getattr(self, c), getattr(self, b), f"{c}/{b}") for c, b in self._pairs]
        shortcut: ops.Shortcut = "identity"
        shortcut_input = None
        if self.shortcut == "none":
            shortcut = None
        elif self.downsample is not None:
            last = len(self.downsample) - 1
            if last == 2:  # timm's downsample_avg: its pool (average or identity) makes the projection's input
                shortcut_input = self.downsample[0](x)
            shortcut = conv_bn(self.downsample[last - 1], self.downsample[last],
                               f"downsample.{last - 1}/downsample.{last}")
        elif self._zero_pad is not None:
            shortcut = self._zero_pad
        return ops.residual_block(x, units, shortcut, shortcut_input=shortcut_input, folded=self._folded,
                                  memory=self.memory)

    def _unfused_forward(self, x: Tensor) -> Tensor:
        out = x
        for i, (conv_name, bn_name) in enumerate(self._pairs):
            out = getattr(self, bn_name)(getattr(self, conv_name)(out))
            if i < len(self._pairs) - 1:
                out = self.relu(out)
        if self.shortcut == "none":
            return self.relu(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        elif self._zero_pad is not None:
            identity = self._zero_pad.apply(x, out.shape[1])
        else:
            identity = x
        out += identity
        return self.relu(out)


class BasicBlock(_ResidualBlock):
    """torchvision.models.resnet.BasicBlock, fused: two 3x3 convolutions. `shortcut`: see _ResidualBlock."""

    expansion: int = 1
    _pairs = (("conv1", "bn1"), ("conv2", "bn2"))

    def _build_branch(self, inplanes: int, planes: int, stride: int, groups: int, base_width: int, dilation: int,
                      norm_layer: Callable[..., nn.Module]) -> None:
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)


class Bottleneck(_ResidualBlock):
    """torchvision.models.resnet.Bottleneck ("ResNet v1.5": the stride on the 3x3 convolution), fused.
    `shortcut`: see _ResidualBlock."""

    expansion: int = 4
    _pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def _build_branch(self, inplanes: int, planes: int, stride: int, groups: int, base_width: int, dilation: int,
                      norm_layer: Callable[..., nn.Module]) -> None:
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)


class ConvBNReLU(nn.Sequential, Fusable):
    """torchvision.ops.Conv2dNormActivation with its defaults (BatchNorm2d, ReLU), fused: children 0 (conv),
    1 (norm) and 2 (activation), as there. Other norm or activation layers, or none, run unfused."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str | None = None,
        groups: int = 1,
        norm_layer: Callable[..., nn.Module] | None = nn.BatchNorm2d,
        activation_layer: Callable[..., nn.Module] | None = nn.ReLU,
        dilation: int | tuple[int, int] = 1,
        inplace: bool | None = True,
        bias: bool | None = None,
    ) -> None:
        if padding is None:
            if isinstance(kernel_size, int) and isinstance(dilation, int):
                padding = (kernel_size - 1) // 2 * dilation
            else:
                ks = kernel_size if isinstance(kernel_size, tuple) else (kernel_size, kernel_size)
                dil = dilation if isinstance(dilation, tuple) else (dilation, dilation)
                padding = tuple((k - 1) // 2 * d for k, d in zip(ks, dil))
        if bias is None:
            bias = norm_layer is None
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation=dilation, groups=groups,
                      bias=bias)
        ]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            layers.append(activation_layer(**({} if inplace is None else {"inplace": inplace})))
        super().__init__(*layers)
        self.out_channels = out_channels
        self._folded = FoldedWeights()

    @classmethod
    def adopt(cls, block: nn.Sequential) -> ConvBNReLU:
        """A fused module around the layers (and hooks, mode) of a torchvision Conv2dNormActivation (shared)."""
        fused = cls.__new__(cls)
        fused.__dict__.update(block.__dict__)
        fused._folded = FoldedWeights()
        return fused

    def structure_blocker(self) -> str | None:
        if len(self) != 3:
            return f"it has {len(self)} layers, not conv, norm and activation"
        return conv_blocker("0", self[0]) or norm_blocker("1", self[1]) or relu_blocker("2", self[2])

    def fusion_blocker(self) -> str | None:
        return self.structure_blocker() or hooks_blocker(list(self.named_children()))

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Proxy):  # torch.fx traces the model: one call of the module (fused_resnet/fx.py)
            from . import fx  # (which imports this module)
            return fx.module_call(self, x)
        if self.fusion_blocker() is not None:
            return super().forward(x)
        return ops.conv_bn_relu(x, conv_bn(self[0], self[1], "0/1"), folded=self._folded)


def timm_resnet_module() -> ModuleType:
    """timm.models.resnet, imported on first use (timm is optional, and slow to import)."""
    try:
        import timm.models.resnet
    except ImportError as error:
        raise ImportError(f"fused_resnet's timm blocks need timm (pip install timm): {error}") from error
    return timm.models.resnet


class _TimmResidualBlock(_ResidualBlock):
    """What the fused versions of timm.models.resnet's BasicBlock and Bottleneck share: timm's constructor,
    attributes and state_dict keys; the residual branch and the shortcut run through ops.residual_block.

    Fused when the block computes only relu(F(x) + shortcut(x)): every activation an nn.ReLU, no anti-aliasing
    layer (`aa` an nn.Identity), no attention module (`se` None), and `drop_block`/`drop_path` identities, or
    timm's DropBlock2d/DropPath while they do not drop (in eval, or at drop_prob 0). Otherwise timm's own forward
    runs: an SE block or a block with anti-aliasing always, one with stochastic depth while it trains."""

    _timm_class_name: str  # the class of timm.models.resnet this one fuses

    def __init__(self, *args, **kwargs) -> None:
        # Built by timm's constructor, whose signature changes between timm releases, then taken over whole
        # (nn.Module's state included, so nn.Module.__init__ has nothing to add).
        self._take_over(getattr(timm_resnet_module(), self._timm_class_name)(*args, **kwargs))

    def structure_blocker(self) -> str | None:
        reason = super().structure_blocker()
        if reason:
            return reason
        if type(self.aa) is not nn.Identity:
            return f"aa is a {type(self.aa).__name__} (anti-aliasing between convolutions; not fused)"
        if self.se is not None:
            return f"se is a {type(self.se).__name__} (attention after the last BatchNorm; not fused)"
        timm_layers = timm_resnet_module()
        for name, stochastic in (("drop_block", timm_layers.DropBlock2d), ("drop_path", timm_layers.DropPath)):
            layer = getattr(self, name)
            if layer is not None and type(layer) not in (nn.Identity, stochastic):
                return f"{name} is a {type(layer).__name__}, not nn.Identity or timm's {stochastic.__name__}"
        return None

    def _dropping_layers(self) -> list[tuple[str, nn.Module]]:
        """The stochastic-depth layers (name, layer) that drop something while they train."""
        layers = ((name, getattr(self, name)) for name in ("drop_block", "drop_path"))
        return [(name, layer) for name, layer in layers if getattr(layer, "drop_prob", 0.0)]

    def training_blocker(self) -> str | None:
        return next((f"{name} drops with probability {layer.drop_prob} in training"
                     for name, layer in self._dropping_layers()), None)

    def fusion_blocker(self) -> str | None:
        reason = self.structure_blocker() or next(
            (f"{name} drops with probability {layer.drop_prob} (it is training)"
             for name, layer in self._dropping_layers() if layer.training), None)
        return reason or hooks_blocker(list(self.named_children()))

    def _unfused_forward(self, x: Tensor) -> Tensor:
        return getattr(timm_resnet_module(), self._timm_class_name).forward(self, x)


class TimmBasicBlock(_TimmResidualBlock):
    """timm.models.resnet.BasicBlock, fused (see _TimmResidualBlock); timm's constructor arguments."""

    expansion: int = 1
    _timm_class_name = "BasicBlock"
    _pairs = (("conv1", "bn1"), ("conv2", "bn2"))
    _activations = ("act1", "act2")


class TimmBottleneck(_TimmResidualBlock):
    """timm.models.resnet.Bottleneck, fused (see _TimmResidualBlock); timm's constructor arguments."""

    expansion: int = 4
    _timm_class_name = "Bottleneck"
    _pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
    _activations = ("act1", "act2", "act3")
