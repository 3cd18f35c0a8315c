"""Float64 formulas of the compiled kernel primitives (torch.ops.fused_resnet.*), for the kernel tests of every
device. The ops' schemas and comments are in csrc/ops.cpp."""

from __future__ import annotations

import torch
from torch import Tensor


def per_channel(v: Tensor) -> Tensor:
    return v.double().view(1, -1, 1, 1)


def masked(grad: Tensor, output: Tensor | None) -> Tensor:
    g = grad.double()
    return g if output is None else torch.where(output.double() <= 0, torch.zeros_like(g), g)


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    x = x.double()
    return x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)


def bn_act(x, scale, shift, residual=None, residual_scale=None, residual_shift=None, relu=True) -> Tensor:
    out = x.double() * per_channel(scale) + per_channel(shift)
    if residual is not None:
        r = residual.double()
        out = out + (r * per_channel(residual_scale) + per_channel(residual_shift) if residual_scale is not None else r)
    return torch.relu(out) if relu else out


def zero_pad_identity(residual: Tensor, channels: int, stride: int, channels_before: int) -> Tensor:
    """Option A's shortcut: `residual` subsampled by `stride`, zero-padded to `channels` (float64)."""
    r = residual.double()[:, :, ::stride, ::stride]
    return torch.nn.functional.pad(r, (0, 0, 0, 0, channels_before, channels - r.shape[1] - channels_before))


def backward_reduce(grad, output, x, mean, x2=None, mean2=None) -> tuple[Tensor, Tensor, Tensor | None]:
    gm = masked(grad, output)
    sums = (gm.sum((0, 2, 3)), (gm * (x.double() - per_channel(mean))).sum((0, 2, 3)))
    third = (gm * (x2.double() - per_channel(mean2))).sum((0, 2, 3)) if x2 is not None else None
    return (*sums, third)


def backward_elemt(grad, output, x, mean, coefs, x2=None, mean2=None, coefs2=None, residual_grad=False):
    gm = masked(grad, output)
    k_dy, k_xmu, k_0 = coefs
    grad_x = per_channel(k_dy) * gm + per_channel(k_xmu) * (x.double() - per_channel(mean)) + per_channel(k_0)
    if x2 is not None:
        k2_dy, k2_xmu, k2_0 = coefs2
        return grad_x, per_channel(k2_dy) * gm + per_channel(k2_xmu) * (x2.double() - per_channel(mean2)) + per_channel(k2_0)
    return grad_x, (gm if residual_grad else None)
