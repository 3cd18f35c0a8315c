"""Drop-in fused modules: torchvision's BasicBlock and Bottleneck, and torchvision.ops.Conv2dNormActivation's
conv-BN-ReLU, with the same constructor signatures, attribute names and state_dict keys.

The modules only hold parameters; their forward hands the current tensors to the fused ops. A module runs the
plain PyTorch sequence of its submodules instead whenever the fused op would not be the same computation: a norm
layer other than BatchNorm2d (a subclass that overrides forward, GroupNorm, FrozenBatchNorm2d...), a changed
activation, a downsample other than conv1x1+BatchNorm2d, or forward/backward hooks on a submodule (which would not
fire inside a fused op). :func:`fused_resnet.unfused_modules` lists which modules of a model do, and why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from . import ops
from .ops import FoldedWeights
from .params import BatchNormParams, ConvBN, ConvParams, ZeroPadIdentity

__all__ = ["BasicBlock", "Bottleneck", "ConvBNReLU", "conv_bn"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, groups=groups, bias=False,
                     dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, name: str) -> ConvBN:
    """The op-level view of a Conv2d followed by a BatchNorm2d (their current tensors and flags)."""
    return ConvBN(
        ConvParams(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups),
        BatchNormParams(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum,
                        bn.eps, bn.training),
        name,
    )


def _conv_blocker(name: str, conv: nn.Module) -> str | None:
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
        return f"{name} is a {type(conv).__name__}, not a plain nn.Conv2d"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"{name} pads with padding={conv.padding!r}, padding_mode={conv.padding_mode!r} (fused: zeros, numeric)"
    return None


def _bn_blocker(name: str, bn: nn.Module) -> str | None:
    if not isinstance(bn, nn.BatchNorm2d) or type(bn).forward is not nn.BatchNorm2d.forward:
        return f"{name} is a {type(bn).__name__}, not nn.BatchNorm2d"
    return None


def hooks_blocker(modules: Sequence[tuple[str, nn.Module]]) -> str | None:
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


def _relu_blocker(name: str, relu: nn.Module) -> str | None:
    if type(relu) is not nn.ReLU:
        return f"{name} is a {type(relu).__name__}, not nn.ReLU"
    return None


def stem_structure_blocker(model: nn.Module) -> str | None:
    """Why a ResNet's stem (conv1, bn1, relu) cannot run as one fused op, hooks aside; None if it can."""
    return _conv_blocker("conv1", model.conv1) or _bn_blocker("bn1", model.bn1) or _relu_blocker("relu", model.relu)


SHORTCUTS = (None, "A", "B", "none")


class _ResidualBlock(nn.Module):
    """What BasicBlock and Bottleneck share: relu(F(x) + shortcut(x)) where F chains conv/bn pairs with ReLU
    between them, fused through ops.residual_block.

    The shortcut follows the `shortcut` argument (keyword-only, beyond torchvision's signature), in the terms of
    He et al. 2015, §3.3:
      None:   torchvision's: `downsample` when given, else the identity;
      "A":    the identity, subsampled by `stride` and zero-padded to the new channels when the shape changes
              (parameter-free; the paper's CIFAR networks);
      "B":    a projection (1x1 conv + norm, built here unless `downsample` is given) when the shape changes;
      "none": no shortcut (the paper's plain networks).
    """

    expansion: int
    # (conv, bn) attribute names of F, in order; the ReLU is `relu`, the shortcut `downsample` (or option A).
    _pairs: tuple[tuple[str, str], ...]

    def __init__(self) -> None:
        super().__init__()
        self._folded = FoldedWeights()

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
        fused.__dict__.update(block.__dict__)
        fused._folded = FoldedWeights()
        fused.shortcut, fused._zero_pad = None, None
        return fused

    def _fusion_blocker(self) -> str | None:
        return self._structure_blocker() or hooks_blocker(list(self.named_children()))

    def _structure_blocker(self) -> str | None:
        for conv_name, bn_name in self._pairs:
            reason = _conv_blocker(conv_name, getattr(self, conv_name)) or _bn_blocker(bn_name, getattr(self, bn_name))
            if reason:
                return reason
        reason = _relu_blocker("relu", self.relu)
        if reason:
            return reason
        if self.downsample is not None:
            ds = self.downsample
            if not (isinstance(ds, nn.Sequential) and type(ds).forward is nn.Sequential.forward and len(ds) == 2):
                return "downsample is not nn.Sequential(conv, BatchNorm2d)"
            return _conv_blocker("downsample.0", ds[0]) or _bn_blocker("downsample.1", ds[1])
        return None

    def forward(self, x: Tensor) -> Tensor:
        if self._fusion_blocker() is not None:
            return self._unfused_forward(x)
        units = [conv_bn(getattr(self, c), getattr(self, b), f"{c}/{b}") for c, b in self._pairs]
        shortcut: ops.Shortcut = "identity"
        if self.shortcut == "none":
            shortcut = None
        elif self.downsample is not None:
            shortcut = conv_bn(self.downsample[0], self.downsample[1], "downsample.0/downsample.1")
        elif self._zero_pad is not None:
            shortcut = self._zero_pad
        return ops.residual_block(x, units, shortcut, folded=self._folded)

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
            stride, before = self._zero_pad
            after = out.shape[1] - x.shape[1] - before
            identity = F.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, before, after))
        else:
            identity = x
        out += identity
        return self.relu(out)


class BasicBlock(_ResidualBlock):
    """torchvision.models.resnet.BasicBlock, fused: two 3x3 convolutions. `shortcut`: see _ResidualBlock."""

    expansion: int = 1
    _pairs = (("conv1", "bn1"), ("conv2", "bn2"))

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
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self._init_shortcut(shortcut, inplanes, stride, norm_layer)


class Bottleneck(_ResidualBlock):
    """torchvision.models.resnet.Bottleneck ("ResNet v1.5": the stride on the 3x3 convolution), fused.
    `shortcut`: see _ResidualBlock."""

    expansion: int = 4
    _pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

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
    ) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self._init_shortcut(shortcut, inplanes, stride, norm_layer)


class ConvBNReLU(nn.Sequential):
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

    def _fusion_blocker(self) -> str | None:
        return self._structure_blocker() or hooks_blocker(list(self.named_children()))

    def _structure_blocker(self) -> str | None:
        if len(self) != 3:
            return f"it has {len(self)} layers, not conv, norm and activation"
        return _conv_blocker("0", self[0]) or _bn_blocker("1", self[1]) or _relu_blocker("2", self[2])

    def forward(self, x: Tensor) -> Tensor:
        if self._fusion_blocker() is not None:
            return super().forward(x)
        return ops.conv_bn_relu(x, conv_bn(self[0], self[1], "0/1"), folded=self._folded)
