"""Float64 formulas of the four BatchNorm kernel ops (batch_stats, bn_act, bn_act_backward_reduce,
bn_act_backward_elemt; schemas and comments in csrc/ops.cpp), which every kernel set is compared with.

Each formula returns an :class:`Exact`: the float64 result of the op on the (already rounded) inputs, and the sum of
the magnitudes of the terms that result adds up. A kernel adds the same terms in its accumulation dtype, so its
error is bounded by that dtype's rounding times the magnitude, however much the terms cancel (tests/kernel_cases.py
turns the two into a bound). The formulas run on the inputs' device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Exact(NamedTuple):
    value: Tensor
    magnitude: Tensor  # the sum of |term| over the terms `value` is the sum of: what rounding errors scale with


def per_channel(v: Tensor) -> Tensor:
    return v.double().view(1, -1, 1, 1)


def masked(grad: Tensor, output: Tensor | None) -> Tensor:
    """threshold_backward: the gradient where output > 0 or is NaN, 0 where output <= 0 (-0 included)."""
    g = grad.double()
    return g if output is None else torch.where(output.double() <= 0, torch.zeros_like(g), g)


def relu_mask_of(grad, output, x, mean, mask_scale=None, mask_shift=None) -> Tensor:
    """The backward ops' masked gradient: by `output` (masked), or, with mask_scale and mask_shift, by the ReLU of
    bn_act(x, mean, mask_scale, mask_shift) decided on its float64 value; else the gradient itself. The kernels decide
    the latter in their accumulation dtype: where the value is within its rounding of 0 the two may differ, which the
    tests keep out of their data (kernel_cases.gradient_clear_of_relu_threshold)."""
    if mask_scale is None:
        return masked(grad, output)
    return masked(grad, bn_act(x, mean, mask_scale, mask_shift, relu=False).value)


def _sum_of(terms: list[Tensor]) -> Exact:
    return Exact(sum(terms), sum(t.abs() for t in terms))


def _channel_sum(products: Tensor) -> Exact:
    return Exact(products.sum((0, 2, 3)), products.abs().sum((0, 2, 3)))


def batch_stats(x: Tensor) -> tuple[Exact, Exact]:
    """Per-channel mean (terms x / count) and biased variance (terms (x - mean)^2 / count, all >= 0)."""
    x = x.double()
    var = x.var((0, 2, 3), unbiased=False)
    return Exact(x.mean((0, 2, 3)), x.abs().mean((0, 2, 3))), Exact(var, var)


def bn_act(x, mean, scale, shift, residual=None, residual_mean=None, residual_scale=None, residual_shift=None,
           relu=True) -> Exact:
    """[relu]((x - mean) * scale + shift [+ residual | + (residual - residual_mean) * residual_scale +
    residual_shift]); a None mean is 0. The terms are those the kernels round: x - mean is exact in their inputs'
    precision up to one rounding of the difference, so its magnitude is |x - mean|, not |x| + |mean|."""
    terms = [_centered(x, mean) * per_channel(scale), per_channel(shift).expand(x.shape)]
    if residual is not None and residual_scale is not None:
        terms += [_centered(residual, residual_mean) * per_channel(residual_scale),
                  per_channel(residual_shift).expand(x.shape)]
    elif residual is not None:
        terms.append(residual.double())
    out = _sum_of(terms)
    return Exact(torch.relu(out.value), out.magnitude) if relu else out


def _centered(x: Tensor, mean: Tensor | None) -> Tensor:
    return x.double() if mean is None else x.double() - per_channel(mean)


def zero_pad_identity(residual: Tensor, channels: int, stride: int, channels_before: int) -> Tensor:
    """Option A's shortcut: `residual` subsampled by `stride`, zero-padded to `channels` (float64)."""
    r = residual.double()[:, :, ::stride, ::stride]
    return torch.nn.functional.pad(r, (0, 0, 0, 0, channels_before, channels - r.shape[1] - channels_before))


def backward_reduce(grad, output, x, mean, x2=None, mean2=None, mask_scale=None,
                    mask_shift=None) -> tuple[Exact, Exact, Exact | None]:
    """Per-channel (sum gm, sum gm * (x - mean), sum gm * (x2 - mean2) or None), gm the gradient masked by the ReLU
    (relu_mask_of)."""
    gm = relu_mask_of(grad, output, x, mean, mask_scale, mask_shift)
    second = _channel_sum(gm * (x2.double() - per_channel(mean2))) if x2 is not None else None
    return _channel_sum(gm), _channel_sum(gm * (x.double() - per_channel(mean))), second


def _elemt(gm: Tensor, x: Tensor, mean: Tensor, coefs) -> Exact:
    k_dy, k_xmu, k_0 = coefs
    return _sum_of([per_channel(k_dy) * gm, per_channel(k_xmu) * (x.double() - per_channel(mean)),
                    per_channel(k_0).expand(gm.shape)])


def backward_elemt(grad, output, x, mean, coefs, x2=None, mean2=None, coefs2=None, residual_grad=False,
                   mask_scale=None, mask_shift=None) -> tuple[Exact, Exact | None]:
    """(k_dy * gm + k_xmu * (x - mean) + k_0, and the same of the second BN, or gm when residual_grad, or None), gm
    the gradient masked by the ReLU (relu_mask_of)."""
    gm = relu_mask_of(grad, output, x, mean, mask_scale, mask_shift)
    if x2 is not None:
        return _elemt(gm, x, mean, coefs), _elemt(gm, x2, mean2, coefs2)
    return _elemt(gm, x, mean, coefs), (Exact(gm, torch.zeros_like(gm)) if residual_grad else None)
