"""The tensors and settings a fused op needs from a Conv2d and a BatchNorm2d, with nn.BatchNorm2d's bookkeeping.

Ops take these instead of modules so that the op layer never depends on nn.Module objects; modules build them
on every call (they are cheap views of the modules' current tensors and flags). They are NamedTuples, immutable
like frozen dataclasses but built 5x faster, which counts at three per conv-BN unit per forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .tensors import conv_output_size, memory_format_of


class ConvParams(NamedTuple):
    """A 2-D convolution with zero padding, as nn.Conv2d runs it."""

    weight: Tensor
    bias: Tensor | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return conv_output_size((height, width), tuple(self.weight.shape[-2:]), self.stride, self.padding,
                                self.dilation)


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

    def apply(self, x: Tensor, out_channels: int) -> Tensor:
        """The shortcut's value for input `x` in a block of `out_channels`: F.pad(x[:, :, ::s, ::s]) in PyTorch, the
        form the reference and an unfused block compute (the fused kernels read x in place instead)."""
        after = out_channels - x.shape[1] - self.channels_before
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.channels_before, after))

    def output_shape(self, x_shape: Sequence[int]) -> list[int]:
        """The (N, C, H, W) of x subsampled by the stride (the channels before zero padding)."""
        return [x_shape[0], x_shape[1], *((size - 1) // self.stride + 1 for size in x_shape[2:])]

    def input_gradient(self, grad: Tensor, x_shape: Sequence[int]) -> Tensor:
        """The gradient of the shortcut with respect to x, from the block output's gradient `grad`: x's channels of
        it at the positions the subsampling kept, zero where x was skipped; laid out as `grad`."""
        grad_x = grad.new_zeros(x_shape).contiguous(memory_format=memory_format_of(grad))
        begin = self.channels_before
        grad_x[:, :, :: self.stride, :: self.stride] = grad[:, begin:begin + x_shape[1]]
        return grad_x


class MaxPoolParams(NamedTuple):
    """A 2-D max pooling, as nn.MaxPool2d runs it (without returning its indices)."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    ceil_mode: bool = False

    @staticmethod
    def of(pool: torch.nn.MaxPool2d) -> MaxPoolParams:
        stride = pool.stride if pool.stride is not None else pool.kernel_size  # nn.MaxPool2d's default

        def pair(value: int | Sequence[int]) -> tuple[int, int]:
            return (value, value) if isinstance(value, int) else (value[0], value[-1])

        return MaxPoolParams(pair(pool.kernel_size), pair(stride), pair(pool.padding), pair(pool.dilation),
                             pool.ceil_mode)

    def apply(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)


def advance_batch_count(bn: BatchNormParams, factor_like: Tensor | None = None) -> float | Tensor:
    """nn.BatchNorm2d's bookkeeping for one forward in training: bumps num_batches_tracked and returns the
    factor of the running-statistics update (0.0 when the running statistics are not updated). For momentum=None
    that is 1 / num_batches_tracked: a float, as F.batch_norm takes it, or, given `factor_like`, a 0-d tensor of
    its dtype on the counter's device (the same float64, rounded as lerp rounds a float factor), which needs no
    read of the counter: a wait for the device, barred in a CUDA graph."""
    if not bn.updates_running_stats:
        return 0.0
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        if bn.num_batches_tracked is None:
            raise ValueError("momentum=None (a cumulative average) needs num_batches_tracked")
        if factor_like is not None:
            return bn.num_batches_tracked.to(torch.float64).reciprocal().to(factor_like.dtype)
        return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum
