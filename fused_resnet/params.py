"""The tensors and settings a fused op needs from a Conv2d and a BatchNorm2d, with nn.BatchNorm2d's bookkeeping.

Ops take these instead of modules so that the op layer never depends on nn.Module objects; modules build them
on every call (they are cheap views of the modules' current tensors and flags). They are NamedTuples, immutable
like frozen dataclasses but built 5x faster, which counts at three per conv-BN unit per forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class ConvParams(NamedTuple):
    """A 2-D convolution with zero padding, as nn.Conv2d runs it."""

    weight: Tensor
    bias: Tensor | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        kh, kw = self.weight.shape[-2:]
        out_h = (height + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        out_w = (width + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return out_h, out_w


class BatchNormParams(NamedTuple):
    """A BatchNorm2d's parameters, buffers and flags, with its semantics.

    `momentum` follows nn.BatchNorm2d: None means a cumulative average over `num_batches_tracked` batches.
    `training` is the module's flag; batch statistics are used when training or when there are no running ones.
    `process_group` (a torch.distributed process group) makes the batch statistics those of every rank's batch
    together, as nn.SyncBatchNorm's in training: set it only when they are used and the group has several ranks.
    """

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None = None
    momentum: float | None = 0.1
    eps: float = 1e-5
    training: bool = True
    process_group: object | None = None

    @property
    def use_batch_stats(self) -> bool:
        return self.training or self.running_mean is None

    @property
    def updates_running_stats(self) -> bool:
        return self.training and self.running_mean is not None


class ConvBN(NamedTuple):
    """A convolution followed by a BatchNorm; `name` labels it in error messages (e.g. "conv2/bn2")."""

    conv: ConvParams
    bn: BatchNormParams
    name: str = "conv/bn"


class ZeroPadIdentity(NamedTuple):
    """Option A's shortcut (He et al. 2015, §3.3): the identity, subsampled by `stride` and zero-padded in the
    channel dimension, `channels_before` zero channels before x's and the rest after; parameter-free."""

    stride: int
    channels_before: int

    @staticmethod
    def between(in_channels: int, out_channels: int, stride: int) -> ZeroPadIdentity:
        """The shortcut from `in_channels` to `out_channels`, padding both sides evenly (the odd channel after),
        as the CIFAR ResNets people reproduce the paper with do: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))."""
        return ZeroPadIdentity(stride, (out_channels - in_channels) // 2)


def advance_batch_count(bn: BatchNormParams) -> float:
    """nn.BatchNorm2d's bookkeeping for one forward in training: bumps num_batches_tracked and returns the
    factor of the running-statistics update (0.0 when the running statistics are not updated)."""
    if not bn.updates_running_stats:
        return 0.0
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        if bn.num_batches_tracked is None:
            raise ValueError("momentum=None (a cumulative average) needs num_batches_tracked")
        return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum


def update_running_stats(bn: BatchNormParams, batch_mean: Tensor, batch_var: Tensor, count: int) -> None:
    """The running-statistics update of one training forward, as nn.BatchNorm2d does it: the running variance
    takes the unbiased batch variance. `batch_var` is the biased one; `count` the values per channel (over the
    whole process group for a synchronized BatchNorm). The batch statistics come without autograd history, so the
    in-place updates record none either."""
    factor = advance_batch_count(bn)
    if not bn.updates_running_stats:
        return
    assert bn.running_mean is not None and bn.running_var is not None
    unbiased = batch_var * (count / (count - 1))
    _lerp_into(bn.running_mean, batch_mean, factor)
    _lerp_into(bn.running_var, unbiased, factor)


def _lerp_into(running: Tensor, batch: Tensor, factor: float) -> None:
    """running += factor * (batch - running), computed in `batch`'s (accumulation) dtype and rounded once into
    `running`'s, as nn.BatchNorm2d does for low-precision running statistics."""
    if running.dtype == batch.dtype:
        running.lerp_(batch, factor)
    else:
        running.copy_(torch.lerp(running.to(batch.dtype), batch, factor))


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`t` in `dtype`, skipping the call when it already is (.to() costs a Python-to-C++ call even then)."""
    return t if t.dtype == dtype else t.to(dtype)
