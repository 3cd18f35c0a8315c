"""The pure-PyTorch oracle: every fused op composed from torch.nn.functional, with nn.BatchNorm2d's semantics.

The ``torch`` backend runs these, and the tests compare every other backend against them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from .params import BatchNormParams, ConvBN, ConvParams, ZeroPadIdentity, advance_batch_count


def batch_norm(y: Tensor, bn: BatchNormParams) -> Tensor:
    """nn.BatchNorm2d.forward on `y`."""
    factor = advance_batch_count(bn)
    return F.batch_norm(
        y, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.use_batch_stats, factor, bn.eps
    )


def batch_norm_act(input: Tensor, bn: BatchNormParams, residual: Tensor | None = None, relu: bool = True) -> Tensor:
    """[relu](batch_norm(input) + residual)."""
    out = batch_norm(input, bn)
    if residual is not None:
        out = out + residual
    return F.relu(out) if relu else out


def conv2d(x: Tensor, conv: ConvParams) -> Tensor:
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def conv_bn(x: Tensor, unit: ConvBN) -> Tensor:
    return batch_norm(conv2d(x, unit.conv), unit.bn)


def conv_bn_relu(x: Tensor, unit: ConvBN) -> Tensor:
    return F.relu(conv_bn(x, unit))


def residual_block(
    x: Tensor, units: Sequence[ConvBN], shortcut: ConvBN | str | None, shortcut_input: Tensor | None = None
) -> Tensor:
    """relu(F(x) + shortcut(x)): F is conv-BN-ReLU for every unit but the last, then conv-BN;
    the shortcut is "identity", a projection (a ConvBN applied to `shortcut_input`, by default x), option A's
    ZeroPadIdentity, or None (a plain block)."""
    out = x
    for unit in units[:-1]:
        out = conv_bn_relu(out, unit)
    out = conv_bn(out, units[-1])
    if shortcut == "identity":
        out = out + x
    elif isinstance(shortcut, ZeroPadIdentity):
        out = out + shortcut.apply(x, out.shape[1])
    elif isinstance(shortcut, ConvBN):
        out = out + conv_bn(x if shortcut_input is None else shortcut_input, shortcut)
    return F.relu(out)
