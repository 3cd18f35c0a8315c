"""Merging per-tile batch statistics into per-channel mean and variance, deterministically and without losing
the variance of a channel whose mean is large next to its spread.

Producers (the statistics pass of bn.py, a convolution's epilogue) reduce fixed tiles of an activation to a
per-tile, per-channel (mean, M2), M2 being the sum of squared deviations from the tile's own mean, and a count
of elements per tile and channel. Those are already robust: no sum of squares of raw values is ever formed.
What is left is merging up to thousands of tiles without undoing that, in an order fixed by the shapes alone.

The merge runs one program per block of channels. It walks the tiles in chunks of BLOCK_T, in order; a chunk
is reduced in two passes over registers (its weighted mean, then each tile's M2 plus its count times the
squared distance of its mean from the chunk's: the law of total variance), and chunks are combined in order
with Chan, Golub & LeVeque's update. Everything is accumulated in float64 whatever the partials' dtype: the
merge touches T*C values, a sliver of the activation the partials came from, so the price is invisible, and
with it the merge's rounding stays far below the fp32 partials' own even with many thousands of tiles, where
a running fp32 merge would drift by about T ulps of the mean difference. No atomics: the result is the same
bits on every run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..tensors import describe
from . import INTERPRET_ENV_VAR, interpreted

# Tile counts are stored as integers or as floats holding whole numbers (float32 is exact up to 2**24); the kernel
# reads any of these into float64.
COUNT_DTYPES = (torch.int32, torch.int64, torch.float32, torch.float64)

# Channels per program: 32 float32 means are one 128-byte line of a partial's row, so a chunk's loads stay
# coalesced, and a C of 256 (the smallest ResNet-50 stage) still spreads over 8 programs.
MAX_BLOCK_C = 32
# Tiles per chunk: a [64, 32] chunk is 2048 values per array, 16 float64 registers per thread with 4 warps,
# and 64 tiles per two-pass step keep the number of sequential Chan updates at T/64.
MAX_BLOCK_T = 64


@triton.jit
def chan_merge(count, mean, m2, other_count, other_mean, other_m2):
    """(count, mean, M2) of two partial statistics together, by Chan et al.'s update: the merged mean moves by the
    difference of the means weighted by the other part's share, and M2 gains the between-part term. No sum of
    squares is formed, so a large mean costs the variance nothing."""
    total = count + other_count
    weight = tl.where(total > 0, other_count / tl.maximum(total, 1.0), 0.0)
    delta = other_mean - mean
    return total, mean + delta * weight, m2 + (other_m2 + delta * delta * (count * weight))


@triton.jit
def _merge_partial_stats_kernel(
    mean_partial_ptr,
    m2_partial_ptr,
    count_partial_ptr,
    mean_ptr,
    var_ptr,
    num_tiles,
    num_channels,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    channels = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < num_channels
    count = tl.zeros([BLOCK_C], dtype=tl.float64)
    mean = tl.zeros([BLOCK_C], dtype=tl.float64)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for t0 in range(0, num_tiles, BLOCK_T):
        tiles = t0 + tl.arange(0, BLOCK_T)
        tile_mask = tiles < num_tiles
        mask = tile_mask[:, None] & channel_mask[None, :]
        offsets = tiles[:, None].to(tl.int64) * num_channels + channels[None, :]
        tile_count = tl.load(count_partial_ptr + tiles, mask=tile_mask, other=0).to(tl.float64)
        tile_count = tl.broadcast_to(tile_count[:, None], [BLOCK_T, BLOCK_C])
        present = mask & (tile_count > 0)
        # A tile without elements may carry any mean (0/0 where its producer divided): it must not reach the sums.
        tile_mean = tl.where(present, tl.load(mean_partial_ptr + offsets, mask=mask, other=0).to(tl.float64), 0.0)
        tile_m2 = tl.where(present, tl.load(m2_partial_ptr + offsets, mask=mask, other=0).to(tl.float64), 0.0)
        tile_count = tl.where(present, tile_count, 0.0)

        chunk_count = tl.sum(tile_count, axis=0)
        safe_chunk_count = tl.maximum(chunk_count, 1.0)
        chunk_mean = tl.sum(tile_count * tile_mean, axis=0) / safe_chunk_count
        deviation = tl.where(present, tile_mean - chunk_mean[None, :], 0.0)
        weighted_deviation = tile_count * deviation
        # The corrected two-pass form: the first pass's rounded mean is fixed up by the deviations' sum.
        deviation_sum = tl.sum(weighted_deviation, axis=0)
        chunk_mean += deviation_sum / safe_chunk_count
        chunk_m2 = (tl.sum(tile_m2, axis=0) + tl.sum(weighted_deviation * deviation, axis=0)
                    - deviation_sum * deviation_sum / safe_chunk_count)

        count, mean, m2 = chan_merge(count, mean, m2, chunk_count, chunk_mean, chunk_m2)
    has_values = count > 0
    safe_count = tl.maximum(count, 1.0)
    # No elements at all: NaN, as the mean and variance of an empty tensor are in torch.
    out_mean = tl.where(has_values, mean, float("nan"))
    out_var = tl.where(has_values, tl.maximum(m2, 0.0) / safe_count, float("nan"))
    tl.store(mean_ptr + channels, out_mean.to(mean_ptr.dtype.element_ty), mask=channel_mask)
    tl.store(var_ptr + channels, out_var.to(var_ptr.dtype.element_ty), mask=channel_mask)


def check_launch_device(op: str, t: Tensor) -> None:
    """Refuses, naming `op`, a tensor on a device the kernels do not run on: they run on CUDA tensors, or on CPU
    tensors under Triton's interpreter. Every launcher calls it on its input, since elsewhere the launch would fail
    inside Triton with a message about pointers, not devices."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreted()):
        return
    raise RuntimeError(f"{op}: the Triton kernels run on CUDA tensors, or on CPU tensors when {INTERPRET_ENV_VAR}=1 "
                       f"is set before fused_resnet is imported; got a {describe(t)}")


def merge_partial_stats(mean_partial: Tensor, m2_partial: Tensor, count_partial: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased variance) from per-tile partial statistics.

    mean_partial, m2_partial: [T, C], float32 (or float64, for float64 activations), both the same dtype: for
    tile t and channel c, the mean of the tile's elements of channel c and the sum of their squared deviations
    from that mean. count_partial: [T], the number of elements of each tile (the same for every channel), of one
    of COUNT_DTYPES, holding whole numbers; 0 is allowed (the tile is skipped, whatever its mean and M2 hold). All
    on one device the kernels run on. Returns (mean[C], var[C]) in the partials' dtype; a channel of zero total
    count comes out NaN. Deterministic: tiles merge in index order, in chunks of a size fixed by T and C.

    A step of the launchers that produce the partials (bn.batch_stats, conv.conv2d), which have checked the device:
    the arguments are trusted.
    """
    num_tiles, num_channels = mean_partial.shape
    mean_partial, m2_partial, count_partial = (t.contiguous() for t in (mean_partial, m2_partial, count_partial))
    mean = torch.empty(num_channels, dtype=mean_partial.dtype, device=mean_partial.device)
    var = torch.empty_like(mean)
    block_c = min(MAX_BLOCK_C, triton.next_power_of_2(num_channels))
    block_t = min(MAX_BLOCK_T, triton.next_power_of_2(num_tiles))
    grid = (triton.cdiv(num_channels, block_c),)
    _merge_partial_stats_kernel[grid](mean_partial, m2_partial, count_partial, mean, var, num_tiles, num_channels,
                                      BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)
    return mean, var
