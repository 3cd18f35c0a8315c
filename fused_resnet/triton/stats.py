"""Merging per-tile batch statistics into per-channel mean and variance, deterministically and without losing
the variance of a channel whose mean is large next to its spread.

Producers (the statistics pass of bn.py, a convolution's epilogue) reduce fixed tiles of an activation to a
per-tile, per-channel (mean, M2), M2 being the sum of squared deviations from the tile's own mean, and a count
of elements per tile and channel. Those are already robust: no sum of squares of raw values is ever formed.
What is left is merging up to thousands of tiles without undoing that, in an order fixed by the shapes alone.

The merge walks tiles in blocks of BLOCK_T, in order; a block is reduced in two passes over registers (its
weighted mean, then each tile's M2 plus its count times the squared distance of its mean from the block's: the law
of total variance), and blocks are combined in order with Chan, Golub & LeVeque's update. Few tiles are merged in
one level: one program per block of channels walks them all. Many tiles are merged in two: a first level of one
program per (chunk of tiles, block of channels) merges its chunk into a float64 (count, mean, M2), a second merges
the chunks' results the same way. One program walking every tile would leave the GPU idle: a bf16 ResNet stem's
convolution at batch 256 hands over 25,088 tiles of 64 channels, which one level merges with 2 programs of 392
sequential blocks each, two levels with 392 programs of 2 blocks, then 2 of 4. Everything is accumulated in float64
whatever the partials' dtype: the merge touches T*C values, a sliver of the activation the partials came from, so
the price is invisible, and with it the merge's rounding stays far below the fp32 partials' own even with many
thousands of tiles, where a running fp32 merge would drift by about T ulps of the mean difference. Chunks, like
blocks, are cut by the shapes alone, and there are no atomics: the result is the same bits on every run.

Every launch runs under launch_guard, on the device of the tensors it reads.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..tensors import describe
from . import INTERPRET_ENV_VAR, interpreted

# Tile counts are stored as integers or as floats holding whole numbers (float32 is exact up to 2**24); the kernel
# reads any of these into float64.
COUNT_DTYPES = (torch.int32, torch.int64, torch.float32, torch.float64)

# Channels per program: 32 float32 means are one 128-byte line of a partial's row, so a block's loads stay
# coalesced, and a C of 256 (the smallest ResNet-50 stage) still spreads over 8 programs.
MAX_BLOCK_C = 32
# Tiles per block: a [64, 32] block is 2048 values per array, 16 float64 registers per thread with 4 warps,
# and 64 tiles per two-pass step keep the number of sequential Chan updates at T/64.
MAX_BLOCK_T = 64
# Up to this many blocks of tiles are merged in one level: a second launch costs about what a walk of a few
# dependent block loads does (an estimate: no GPU has timed it yet). At batch 256 only layer4's convolutions (98
# tiles) stay one level; the stem's 25,088 and layer1's 6,272 (convolution tiles of 128 rows) take two.
MAX_ONE_LEVEL_BLOCKS = 4
# The first level's chunks are sized for at least this many programs, about 4 per SM of a 132-SM H100, so that
# every SM has loads in flight; the second level then walks a few hundred chunks, a few blocks.
MERGE_TARGET_PROGRAMS = 512

_NO_GUARD = contextlib.nullcontext()


def launch_guard(t: Tensor) -> contextlib.AbstractContextManager:
    """The context every Triton launch runs in: t's device made the current CUDA device. Triton launches on the
    current device and its current stream, not on its arguments' device: a model on cuda:1 without
    torch.cuda.set_device(1) would launch on cuda:0, an illegal address or a read across devices and streams.
    For a CPU tensor (the interpreter) there is nothing to switch: a shared nullcontext, no cost. The device is
    named by its index: torch.cuda.device builds 5x faster from an int than from a torch.device (1.1 against 5.6 us,
    measured here on a loaded CPU)."""
    return torch.cuda.device(t.get_device()) if t.is_cuda else _NO_GUARD


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
def _merge_tiles(mean_partial_ptr, m2_partial_ptr, count_partial_ptr, first_tile, span, end, num_channels, channels,
                 channel_mask, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Float64 (count, mean, M2) of `channels` over tiles [first_tile, min(first_tile + span, end)), in order."""
    count = tl.zeros([BLOCK_C], dtype=tl.float64)
    mean = tl.zeros([BLOCK_C], dtype=tl.float64)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for offset in range(0, span, BLOCK_T):
        tiles = first_tile + offset + tl.arange(0, BLOCK_T)
        tile_mask = tiles < end
        mask = tile_mask[:, None] & channel_mask[None, :]
        offsets = tiles[:, None].to(tl.int64) * num_channels + channels[None, :]
        tile_count = tl.load(count_partial_ptr + tiles, mask=tile_mask, other=0).to(tl.float64)
        tile_count = tl.broadcast_to(tile_count[:, None], [BLOCK_T, BLOCK_C])
        present = mask & (tile_count > 0)
        # A tile without elements may carry any mean (0/0 where its producer divided): it must not reach the sums.
        tile_mean = tl.where(present, tl.load(mean_partial_ptr + offsets, mask=mask, other=0).to(tl.float64), 0.0)
        tile_m2 = tl.where(present, tl.load(m2_partial_ptr + offsets, mask=mask, other=0).to(tl.float64), 0.0)
        tile_count = tl.where(present, tile_count, 0.0)

        block_count = tl.sum(tile_count, axis=0)
        safe_block_count = tl.maximum(block_count, 1.0)
        block_mean = tl.sum(tile_count * tile_mean, axis=0) / safe_block_count
        deviation = tl.where(present, tile_mean - block_mean[None, :], 0.0)
        weighted_deviation = tile_count * deviation
        # The corrected two-pass form: the first pass's rounded mean is fixed up by the deviations' sum.
        deviation_sum = tl.sum(weighted_deviation, axis=0)
        block_mean += deviation_sum / safe_block_count
        block_m2 = (tl.sum(tile_m2, axis=0) + tl.sum(weighted_deviation * deviation, axis=0)
                    - deviation_sum * deviation_sum / safe_block_count)

        count, mean, m2 = chan_merge(count, mean, m2, block_count, block_mean, block_m2)
    return count, mean, m2


@triton.jit
def _merge_chunks_kernel(
    mean_partial_ptr,
    m2_partial_ptr,
    count_partial_ptr,
    chunk_mean_ptr,
    chunk_m2_ptr,
    chunk_count_ptr,
    num_tiles,
    num_channels,
    chunk_tiles,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # The first level: chunk `chunk` (tiles [chunk * chunk_tiles, + chunk_tiles)) of a block of channels, into a
    # float64 [chunks, C] (mean, M2) and a [chunks] count (the same for every channel: channel 0's lane stores it).
    chunk = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < num_channels
    count, mean, m2 = _merge_tiles(mean_partial_ptr, m2_partial_ptr, count_partial_ptr, chunk * chunk_tiles,
                                   chunk_tiles, num_tiles, num_channels, channels, channel_mask, BLOCK_T, BLOCK_C)
    out = chunk.to(tl.int64) * num_channels + channels
    tl.store(chunk_mean_ptr + out, mean, mask=channel_mask)
    tl.store(chunk_m2_ptr + out, m2, mask=channel_mask)
    tl.store(chunk_count_ptr + chunk + 0 * channels, count, mask=channels == 0)


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
    # The one level, or the second: every tile (or chunk) of a block of channels, into its mean and variance.
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < num_channels
    count, mean, m2 = _merge_tiles(mean_partial_ptr, m2_partial_ptr, count_partial_ptr, 0, num_tiles, num_tiles,
                                   num_channels, channels, channel_mask, BLOCK_T, BLOCK_C)
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


def merge_chunk_tiles(num_tiles: int, channel_blocks: int, block_t: int) -> int:
    """Tiles per chunk of the first merge level: a multiple of block_t that gives the first level about
    MERGE_TARGET_PROGRAMS programs (channel_blocks per chunk), or num_tiles itself, one chunk, so one level: when
    the tiles are at most MAX_ONE_LEVEL_BLOCKS blocks of block_t, or the channel blocks alone reach the target."""
    if num_tiles <= MAX_ONE_LEVEL_BLOCKS * block_t:
        return num_tiles
    chunks = triton.cdiv(MERGE_TARGET_PROGRAMS, channel_blocks)
    return min(num_tiles, triton.cdiv(triton.cdiv(num_tiles, chunks), block_t) * block_t)


def merge_partial_stats(mean_partial: Tensor, m2_partial: Tensor, count_partial: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased variance) from per-tile partial statistics.

    mean_partial, m2_partial: [T, C], float32 (or float64, for float64 activations), both the same dtype: for
    tile t and channel c, the mean of the tile's elements of channel c and the sum of their squared deviations
    from that mean. count_partial: [T], the number of elements of each tile (the same for every channel), of one
    of COUNT_DTYPES, holding whole numbers; 0 is allowed (the tile is skipped, whatever its mean and M2 hold). All
    on one device the kernels run on; the launches run on it (launch_guard), whatever the current device. Returns
    (mean[C], var[C]) in the partials' dtype; a channel of zero total count comes out NaN. Deterministic: tiles
    merge in index order, in blocks and chunks of sizes fixed by T and C.

    A step of the launchers that produce the partials (bn.batch_stats, conv.conv2d), which have checked the device:
    the arguments are trusted.
    """
    num_tiles, num_channels = mean_partial.shape
    mean_partial, m2_partial, count_partial = (t.contiguous() for t in (mean_partial, m2_partial, count_partial))
    device = mean_partial.device
    mean = torch.empty(num_channels, dtype=mean_partial.dtype, device=device)
    var = torch.empty_like(mean)
    block_c = min(MAX_BLOCK_C, triton.next_power_of_2(num_channels))
    channel_blocks = triton.cdiv(num_channels, block_c)
    block_t = min(MAX_BLOCK_T, triton.next_power_of_2(num_tiles))
    chunk_tiles = merge_chunk_tiles(num_tiles, channel_blocks, block_t)
    with launch_guard(mean_partial):
        if chunk_tiles < num_tiles:
            num_chunks = triton.cdiv(num_tiles, chunk_tiles)
            chunk_mean = torch.empty((num_chunks, num_channels), dtype=torch.float64, device=device)
            chunk_m2 = torch.empty_like(chunk_mean)
            chunk_count = torch.empty(num_chunks, dtype=torch.float64, device=device)
            _merge_chunks_kernel[(num_chunks, channel_blocks)](
                mean_partial, m2_partial, count_partial, chunk_mean, chunk_m2, chunk_count, num_tiles, num_channels,
                chunk_tiles, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)
            mean_partial, m2_partial, count_partial, num_tiles = chunk_mean, chunk_m2, chunk_count, num_chunks
            block_t = min(MAX_BLOCK_T, triton.next_power_of_2(num_chunks))
        _merge_partial_stats_kernel[(channel_blocks,)](mean_partial, m2_partial, count_partial, mean, var, num_tiles,
                                                       num_channels, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)
    return mean, var
