"""BatchNorm arithmetic of the autograd nodes, on per-channel vectors in the accumulation dtype: the centered
affine form of a BatchNorm in forward, the coefficients of its input gradient in backward, and the running
statistics' update after the block. The arithmetic itself is the kernel set's (KernelSet.bn_affine,
bn_backward_coefs, update_running_stats); what a BatchNorm's configuration changes (running statistics in place of
batch ones, a process group's sums, momentum=None) is decided here."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from ..kernels import BackwardCoefs, KernelSet
from ..params import BatchNormParams, advance_batch_count
from ..tensors import accumulation_dtype, as_dtype
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
        self, kernels: KernelSet, y: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None
    ) -> BatchNormAffine:
        """The BatchNorm of y in its centered form. `mean` and `var` are the batch statistics (mean, biased
        variance, computed where y was made, in the accumulation dtype) when the BN uses them, else the running
        ones."""
        if not self.use_batch_stats:
            acc = accumulation_dtype(y.dtype)
            mean, var = as_dtype(mean, acc), as_dtype(var, acc)
        return BatchNormAffine(mean, *kernels.bn_affine(var, weight, bias, self.eps))

    def gradients(
        self, kernels: KernelSet, sum_dy: Tensor, sum_dy_xmu: Tensor, invstd: Tensor, weight: Tensor | None,
        count: int,
    ) -> tuple[BackwardCoefs, Tensor, Tensor]:
        """(input-gradient coefficients, weight gradient, bias gradient) of this BatchNorm from its backward's
        per-channel sums over `count` values (KernelSet.bn_backward_coefs). A synchronized one normalized with the
        group's mean and variance, so its input gradient takes sum_dy and sum_dy_xmu summed over the group; its
        weight and bias gradients stay this rank's, for DistributedDataParallel to average, as in
        nn.SyncBatchNorm's backward."""
        coefs, grad_weight, grad_bias = kernels.bn_backward_coefs(sum_dy, sum_dy_xmu, invstd, weight,
                                                                  self.use_batch_stats, count)
        if self.process_group is not None:
            group_sum_dy, group_sum_dy_xmu, group_count = sum_over_group(self.process_group, sum_dy, sum_dy_xmu, count)
            coefs = kernels.bn_backward_coefs(group_sum_dy, group_sum_dy_xmu, invstd, weight, True, group_count)[0]
        return coefs, grad_weight, grad_bias


def update_running_stats(
    kernels: KernelSet, bn: BatchNormParams, batch_mean: Tensor, batch_var: Tensor, count: int | Tensor
) -> None:
    """The running-statistics update of one training forward, as nn.BatchNorm2d does it (num_batches_tracked
    too). `batch_var` is the biased variance; `count` the values per channel: an int, or for a synchronized
    BatchNorm the whole process group's, a 0-d float64 tensor on the device. The batch statistics come without
    autograd history, so the in-place updates record none either."""
    factor = advance_batch_count(bn, batch_mean)
    if not bn.updates_running_stats:
        return
    assert bn.running_mean is not None and bn.running_var is not None
    kernels.update_running_stats(bn.running_mean, bn.running_var, batch_mean, batch_var, factor, count)
