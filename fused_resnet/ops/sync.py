"""Synchronized BatchNorm (nn.SyncBatchNorm): the batch statistics of every rank of a process group together, in
forward (the ranks' moments merged) and in backward (the ranks' per-channel sums added)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..params import BatchNormParams


def _gather_over(group: object, vector: Tensor) -> Tensor:
    """Every rank's `vector` in `group`, stacked in rank order, in float64: counts stay exact, and sums over the
    ranks are taken in the same order on every rank."""
    vector = vector.to(torch.float64)
    gathered = [torch.empty_like(vector) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, vector, group=group)
    return torch.stack(gathered)


def synchronized(
    bn: BatchNormParams, stats: Sequence[Tensor], shape: Sequence[int]
) -> tuple[Sequence[Tensor], int | Tensor]:
    """A BatchNorm's batch statistics (mean, biased variance; none when it uses running ones) of a conv output of
    `shape`, and their count per channel: over every rank of its process group when it has one, each rank's
    (count, mean, variance) merged as Chan et al. merge partial moments (no cancellation). The group's count is a
    0-d float64 tensor on the statistics' device (exact below 2^53): reading it back as an int would wait for the
    device on every BatchNorm of every step, and bar the step from a CUDA graph."""
    count = shape[0] * shape[2] * shape[3]
    if not stats or bn.process_group is None:
        return stats, count
    mean, var = stats
    channels = mean.numel()
    rows = _gather_over(bn.process_group, torch.cat([mean.new_full((1,), count), mean, var]))
    counts, means, variances = rows[:, :1], rows[:, 1:1 + channels], rows[:, 1 + channels:]
    total = counts.sum()
    group_mean = (counts * means).sum(0) / total
    group_var = (counts * (variances + (means - group_mean).square())).sum(0) / total
    return (group_mean.to(mean.dtype), group_var.to(var.dtype)), total


def sum_over_group(group: object, sum_dy: Tensor, sum_dy_xmu: Tensor, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """A BatchNorm backward's per-channel sums, and the count of values they run over, summed over every rank of
    `group`; the count as :func:`synchronized` returns it, a 0-d float64 tensor on the device."""
    channels = sum_dy.numel()
    sums = _gather_over(group, torch.cat([sum_dy.new_full((1,), count), sum_dy, sum_dy_xmu])).sum(0)
    return sums[1:1 + channels].to(sum_dy.dtype), sums[1 + channels:].to(sum_dy.dtype), sums[0]
