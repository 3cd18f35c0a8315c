"""BatchNorm arithmetic of the autograd nodes, on per-channel vectors in the accumulation dtype: the centered
affine form of a BatchNorm in forward, and the coefficients of its input gradient in backward."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..kernels import BackwardCoefs
from ..params import BatchNormParams
from ..tensors import accumulation_dtype, as_dtype, scalar_operand
from .sync import sum_over_group


class BatchNormAffine(NamedTuple):
    """A BatchNorm as the kernels apply it, BN(y) = (y - mean) * scale + shift, per channel: scale = weight * invstd,
    shift = the BN's bias. Centered rather than folded (y * scale + (bias - mean * scale)): at a mean of 1e4 and a
    spread of ~3 the folded shift cancels to ~3e-4 on outputs of order 1 in fp32 (docs/design.md §4)."""

    mean: Tensor
    invstd: Tensor
    scale: Tensor
    shift: Tensor


class BatchNormSpec(NamedTuple):
    """What an autograd node needs to know of a BatchNorm besides its tensors."""

    eps: float
    use_batch_stats: bool
    process_group: object | None = None  # a synchronized BatchNorm's (its backward sums over the group)

    @staticmethod
    def of(bn: BatchNormParams) -> BatchNormSpec:
        return BatchNormSpec(bn.eps, bn.use_batch_stats, bn.process_group)

    def affine(
        self, y: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None
    ) -> BatchNormAffine:
        """The BatchNorm of y in its centered form. `mean` and `var` are the batch statistics (mean, biased
        variance, computed where y was made, in the accumulation dtype) when the BN uses them, else the running
        ones."""
        acc = accumulation_dtype(y.dtype)
        if not self.use_batch_stats:
            mean, var = as_dtype(mean, acc), as_dtype(var, acc)
        invstd = torch.rsqrt(var + scalar_operand(self.eps, var))
        scale = invstd * as_dtype(weight, acc) if weight is not None else invstd
        shift = as_dtype(bias, acc) if bias is not None else torch.zeros_like(invstd)
        return BatchNormAffine(mean, invstd, scale, shift)

    def gradients(
        self, sum_dy: Tensor, sum_dy_xmu: Tensor, invstd: Tensor, weight: Tensor | None, count: int
    ) -> tuple[BackwardCoefs, Tensor, Tensor]:
        """:func:`backward_coefs` of this BatchNorm from its backward's per-channel sums over `count` values. A
        synchronized one normalized with the group's mean and variance, so its input gradient takes sum_dy and
        sum_dy_xmu summed over the group; its weight and bias gradients stay this rank's, for
        DistributedDataParallel to average, as in nn.SyncBatchNorm's backward."""
        coefs, grad_weight, grad_bias = backward_coefs(sum_dy, sum_dy_xmu, invstd, weight, self.use_batch_stats, count)
        if self.process_group is not None:
            group_sum_dy, group_sum_dy_xmu, group_count = sum_over_group(self.process_group, sum_dy, sum_dy_xmu, count)
            coefs = backward_coefs(group_sum_dy, group_sum_dy_xmu, invstd, weight, True, group_count)[0]
        return coefs, grad_weight, grad_bias


def backward_coefs(
    sum_dy: Tensor, sum_dy_xmu: Tensor, invstd: Tensor, weight: Tensor | None, use_batch_stats: bool,
    count: int | Tensor,
) -> tuple[BackwardCoefs, Tensor, Tensor]:
    """The coefficients of BN's input gradient, grad_y = k_dy*g + k_xmu*(y - mean) + k_0 (g masked by the ReLU),
    and the gradients of the BN weight and bias. With batch statistics the mean and variance depend on y:
        grad_y = w*invstd * (g - mean(g) - (y - mean) * invstd^2 * mean(g * (y - mean))).
    `count` (the values the sums run over) is an int, or a synchronized BatchNorm's 0-d float64 tensor of the
    group's count, on the device: -1.0 / count is then the same float64 as with an int."""
    w_invstd = invstd * as_dtype(weight, invstd.dtype) if weight is not None else invstd
    sum_dy_xhat = sum_dy_xmu * invstd  # also the weight's gradient
    if use_batch_stats:
        # invstd^3 on its own underflows fp32 for a spread above ~4e12 (bf16 activations reach 1e38): multiplying
        # sum(g * x_hat) by invstd and then w*invstd keeps every intermediate in range.
        minus_inv_count = scalar_operand(-1.0 / count, invstd)
        coefs = (w_invstd, (sum_dy_xhat * invstd).mul_(w_invstd).mul_(minus_inv_count),
                 (w_invstd * sum_dy).mul_(minus_inv_count))
    else:
        zeros = torch.zeros_like(invstd)
        coefs = (w_invstd, zeros, zeros)
    return coefs, sum_dy_xhat, sum_dy
