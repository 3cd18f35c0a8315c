"""Triton kernels of the fused BatchNorm(+residual)+ReLU ops and their launchers: the same four ops, arguments,
semantics and return conventions as torch.ops.fused_resnet.{batch_stats, bn_act, bn_act_backward_reduce,
bn_act_backward_elemt} (schemas: csrc/ops.cpp), for CUDA tensors and, under TRITON_INTERPRET=1 (set before this
module is imported), CPU tensors.

Layouts. An activation is 4-D and dense in one of two layouts, and every kernel comes in one version per layout:
  NCHW (contiguous):    N*C planes of H*W elements, one channel per plane; blocks are [planes, H*W] (or
                        [images, H*W] of one channel for reductions), so a per-channel parameter is one value per
                        plane, broadcast along the contiguous axis;
  NHWC (channels_last): N*H*W rows of C elements; blocks are [rows, channels], contiguous along the channels,
                        and a per-channel parameter is a vector along them.
A dense NCHW or channels_last input keeps its layout, and outputs are written dense in it; any other strides are
first made contiguous (NCHW), as the compiled ops do for layouts they do not serve. The other activations of a
call (residual, grad_output, output, input2) are brought to the input's layout.

Precision. Values are loaded into the accumulation dtype (float32 for float16/bfloat16/float32, float64 for
float64), computed there, and rounded once to the output dtype; statistics and sums come back in that
accumulation dtype, like the compiled ops'.

Reductions are deterministic: the tensor is cut into tiles whose bounds depend on its shape alone, each tile is
reduced by one program, tiles' results land in a [tiles, channels] partial, and partials are merged per channel
in tile order by a second kernel (statistics of many tiles: two levels, chunks then their results, see stats.py).
No floating-point atomics anywhere. Batch statistics are robust to a large mean:
a block is reduced in two passes over registers (its mean, then the corrected sum of squared deviations), blocks
of a tile and tiles are combined with Chan et al.'s update (stats.merge_partial_stats).

Block sizes (all powers of two, from the shape alone):
  reductions hold up to REDUCE_BLOCK = 4096 values in registers (16 per thread with 8 warps), enough to amortize a
  program's fixed cost; elementwise kernels move ELEMENTWISE_BLOCK = 2048 elements per program (16 per
  thread, each thread's run contiguous for vector loads). Along the contiguous axis a block spans as much of it as
  it has (a whole plane when H*W fits; 64 or 128 channels of a row, 128-256 bytes of bfloat16), the rest of the
  budget goes to more planes/images/rows, so 7x7 or 1x1 planes do not leave most lanes idle.
  In channels_last reductions a program folds up to MAX_BLOCKS_PER_TILE consecutive row blocks into one tile
  (Chan's update in registers) while the grid keeps at least TARGET_PROGRAMS programs: at ResNet-50's 256x256x56x56
  that is 3136 programs (about 24 per SM of an H100's 132) and a partial of 1.6 MB for 411 MB of bfloat16 input,
  where one tile per block would have written a partial a sixteenth of the input's size, for the merge to read
  back. Tiny tensors get a grid of one or a few programs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..tensors import accumulation_dtype, memory_format_of
from .activation import relu
from .stats import chan_merge, check_launch_device, launch_guard, merge_partial_stats

REDUCE_BLOCK = 4096
ELEMENTWISE_BLOCK = 2048
# Channels per block along a channels_last row: 64 (reductions, which keep three per-channel accumulators) or 128
# (elementwise) consecutive channels are one or two 128-byte lines of bfloat16.
REDUCE_BLOCK_C = 64
ELEMENTWISE_BLOCK_C = 128
# The final sum of backward_reduce's partials: 32 float32 columns per program (a 128-byte line of a partial row),
# chunks of 64 tiles summed as a tree.
SUM_BLOCK_COLUMNS = 32
SUM_BLOCK_T = 64
# About 8 programs per SM of a 132-SM H100, so that every SM has work and the last wave is a small fraction.
TARGET_PROGRAMS = 1024
MAX_BLOCKS_PER_TILE = 16

# bn_act's residual term: none, + residual, + (residual - residual_mean) * residual_scale + residual_shift, option
# A's.
RESIDUAL_NONE = tl.constexpr(0)
RESIDUAL_IDENTITY = tl.constexpr(1)
RESIDUAL_AFFINE = tl.constexpr(2)
RESIDUAL_PADDED = tl.constexpr(3)
# The backward kernels' ReLU mask (csrc/ops.cpp): none, from the saved output, or from the input's normalization
# (mask_scale and mask_shift).
MASK_NONE = tl.constexpr(0)
MASK_OUTPUT = tl.constexpr(1)
MASK_INPUT = tl.constexpr(2)
# bn_act_backward_elemt's second output: none, the masked gradient (an identity residual's), a second BN's input grad.
OTHER_NONE = tl.constexpr(0)
OTHER_MASKED_GRAD = tl.constexpr(1)
OTHER_SECOND_BN = tl.constexpr(2)


# ---------------------------------------------------------------------------------------------------------------
# Kernels. Per-channel parameters arrive in the accumulation dtype, so their pointer's element type names it.


@triton.jit
def _mask_by_output(grad, output):
    # threshold_backward: the gradient passes unless output <= 0 (a NaN output passes it, as in PyTorch).
    return tl.where(output <= 0, 0.0, grad)


@triton.jit
def _normalize(x, mean, scale, shift):
    # The centered form (x - mean) * scale + shift: folding the mean into the shift would cancel at a large mean.
    # bn_act and the backward kernels' mask from the input share it, so that the compiler makes the same arithmetic
    # (fused multiply-add or not) of both and the mask is bn_act's output's bit for bit.
    return (x - mean) * scale + shift


@triton.jit
def _mask_by_input(grad, x, mean, mask_scale, mask_shift):
    # MASK_INPUT: the mask of bn_act's output, recomputed from its input with its arithmetic (_normalize).
    return _mask_by_output(grad, _normalize(x, mean, mask_scale, mask_shift))


@triton.jit
def _block_moments(values, mask, count):
    """Mean and M2 along axis 0 of a block of `count` valid rows (masked lanes are ignored), by the corrected
    two-pass formula: mean first, then deviations, whose sum repairs the first mean's rounding."""
    safe_count = tl.maximum(count, 1.0)
    mean = tl.sum(values, axis=0) / safe_count
    deviation = tl.where(mask, values - mean[None, :], 0.0)
    deviation_sum = tl.sum(deviation, axis=0)
    m2 = tl.sum(deviation * deviation, axis=0) - deviation_sum * deviation_sum / safe_count
    return mean + deviation_sum / safe_count, m2


# _SHIFT_WHY: a channel's mean can be large against its spread (a conv bias of 1e4, spread 0.1). In fp32, moments of
# the raw values then lose the spread: a mean of 1e4 is held to 1e-3, 1% of the spread, and a tile mean rounded so
# corrupts the between-tile term of the merged variance (1.2e-4 relative error measured at mean/spread 1e5). So
# each tile computes on x - shift (its first value: of the channel's scale, so the differences are exact and small)
# and hands shift + mean to the merge in float64.
@triton.jit
def _batch_stats_planes_kernel(x_ptr, mean_partial_ptr, m2_partial_ptr, count_ptr, N, C, HW, hw_blocks,
                               ACC_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr):
    # Tile `tile` of channel `c`: images [n0, n0 + BLOCK_N) x pixels [hw0, hw0 + BLOCK_HW) of the NCHW input.
    tile = tl.program_id(0)
    c = tl.program_id(1)
    n0 = (tile // hw_blocks) * BLOCK_N
    hw0 = (tile % hw_blocks) * BLOCK_HW
    images = n0 + tl.arange(0, BLOCK_N)
    pixels = hw0 + tl.arange(0, BLOCK_HW)
    mask = (images < N)[:, None] & (pixels < HW)[None, :]
    offsets = (images.to(tl.int64)[:, None] * C + c) * HW + pixels[None, :]
    # Moments of x - shift, the tile's first value: small numbers whatever the channel's mean (see _SHIFT_WHY).
    shift = tl.load(x_ptr + (n0.to(tl.int64) * C + c) * HW + hw0).to(ACC_DTYPE)
    x = tl.where(mask, tl.load(x_ptr + offsets, mask=mask, other=0).to(ACC_DTYPE) - shift, 0.0)
    count = (tl.minimum(N - n0, BLOCK_N) * tl.minimum(HW - hw0, BLOCK_HW)).to(ACC_DTYPE)
    # The corrected two-pass moments, as in _block_moments, over the whole [images, pixels] block.
    first_mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
    deviation = tl.where(mask, x - first_mean, 0.0)
    deviation_sum = tl.sum(tl.sum(deviation, axis=1), axis=0)
    m2 = tl.sum(tl.sum(deviation * deviation, axis=1), axis=0) - deviation_sum * deviation_sum / count
    out = tile.to(tl.int64) * C + c
    tl.store(mean_partial_ptr + out, shift.to(tl.float64) + (first_mean + deviation_sum / count).to(tl.float64))
    tl.store(m2_partial_ptr + out, m2.to(tl.float64))
    tl.store(count_ptr + tile, count.to(count_ptr.dtype.element_ty), mask=c == 0)


@triton.jit
def _batch_stats_rows_kernel(x_ptr, mean_partial_ptr, m2_partial_ptr, count_ptr, rows, C, ACC_DTYPE: tl.constexpr,
                             BLOCKS_PER_TILE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Tile `tile`: BLOCKS_PER_TILE consecutive blocks of BLOCK_R rows, channels [c0, c0 + BLOCK_C) of the NHWC input.
    tile = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    tile_row0 = tile * (BLOCKS_PER_TILE * BLOCK_R)
    # Moments of x - shift, the tile's first row: small numbers whatever the channel's mean (see _SHIFT_WHY).
    shift = tl.load(x_ptr + tile_row0.to(tl.int64) * C + channels, mask=channel_mask, other=0).to(ACC_DTYPE)
    count = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    mean = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    m2 = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    for block in range(BLOCKS_PER_TILE):
        row0 = tile_row0 + block * BLOCK_R
        row_ids = row0 + tl.arange(0, BLOCK_R)
        mask = (row_ids < rows)[:, None] & channel_mask[None, :]
        x = tl.load(x_ptr + row_ids.to(tl.int64)[:, None] * C + channels[None, :], mask=mask, other=0).to(ACC_DTYPE)
        x = tl.where(mask, x - shift[None, :], 0.0)
        block_count = tl.minimum(tl.maximum(rows - row0, 0), BLOCK_R).to(ACC_DTYPE)
        block_mean, block_m2 = _block_moments(x, mask, block_count)
        count, mean, m2 = chan_merge(count, mean, m2, block_count, block_mean, block_m2)
    out = tile.to(tl.int64) * C + channels
    tl.store(mean_partial_ptr + out, shift.to(tl.float64) + mean.to(tl.float64), mask=channel_mask)
    tl.store(m2_partial_ptr + out, m2.to(tl.float64), mask=channel_mask)
    tile_count = tl.minimum(rows - tile_row0, BLOCKS_PER_TILE * BLOCK_R)
    tl.store(count_ptr + tile, tile_count.to(count_ptr.dtype.element_ty), mask=tl.program_id(1) == 0)


@triton.jit
def _bn_act_term(x, mean, scale, shift, residual, residual_mean, residual_scale, residual_shift,
                 RESIDUAL: tl.constexpr, RELU: tl.constexpr):
    # `residual` is the loaded residual (option A's already zero outside its channels), unused without one.
    v = _normalize(x, mean, scale, shift)
    if RESIDUAL == RESIDUAL_IDENTITY or RESIDUAL == RESIDUAL_PADDED:
        v += residual
    if RESIDUAL == RESIDUAL_AFFINE:
        v += (residual - residual_mean) * residual_scale + residual_shift
    if RELU:
        v = relu(v)
    return v


@triton.jit
def _bn_act_planes_kernel(x_ptr, mean_ptr, scale_ptr, shift_ptr, residual_ptr, residual_mean_ptr, residual_scale_ptr,
                          residual_shift_ptr, out_ptr, planes, C, HW, W, residual_C, residual_H, residual_W,
                          residual_stride, residual_channel_offset, RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr):
    acc_dtype = scale_ptr.dtype.element_ty
    plane_ids = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pixels = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    plane_mask = plane_ids < planes
    mask = plane_mask[:, None] & (pixels < HW)[None, :]
    c = plane_ids % C
    offsets = plane_ids.to(tl.int64)[:, None] * HW + pixels[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0).to(acc_dtype)
    mean = tl.load(mean_ptr + c, mask=plane_mask, other=0)[:, None]
    scale = tl.load(scale_ptr + c, mask=plane_mask, other=0)[:, None]
    shift = tl.load(shift_ptr + c, mask=plane_mask, other=0)[:, None]
    residual_offsets = offsets
    residual_mask = mask
    residual_mean = mean
    residual_scale = scale
    residual_shift = shift
    if RESIDUAL == RESIDUAL_AFFINE:
        residual_mean = tl.load(residual_mean_ptr + c, mask=plane_mask, other=0)[:, None]
        residual_scale = tl.load(residual_scale_ptr + c, mask=plane_mask, other=0)[:, None]
        residual_shift = tl.load(residual_shift_ptr + c, mask=plane_mask, other=0)[:, None]
    if RESIDUAL == RESIDUAL_PADDED:
        # R[n, c, h, w] = residual[n, c - offset, h * stride, w * stride] where residual has that channel.
        residual_c = c - residual_channel_offset
        n = (plane_ids // C).to(tl.int64)
        h = pixels // W
        w = pixels % W
        residual_plane = (n * residual_C + residual_c) * (residual_H * residual_W)
        residual_offsets = residual_plane[:, None] + ((h * residual_stride) * residual_W + w * residual_stride)[None, :]
        # Lanes outside the residual's channels are masked off and read as the zero padding.
        residual_mask = mask & ((residual_c >= 0) & (residual_c < residual_C))[:, None]
    residual = x
    if RESIDUAL != RESIDUAL_NONE:
        residual = tl.load(residual_ptr + residual_offsets, mask=residual_mask, other=0).to(acc_dtype)
    v = _bn_act_term(x, mean, scale, shift, residual, residual_mean, residual_scale, residual_shift, RESIDUAL, RELU)
    tl.store(out_ptr + offsets, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_act_rows_kernel(x_ptr, mean_ptr, scale_ptr, shift_ptr, residual_ptr, residual_mean_ptr, residual_scale_ptr,
                        residual_shift_ptr, out_ptr, rows, C, HW, W, residual_C, residual_H, residual_W,
                        residual_stride, residual_channel_offset, RESIDUAL: tl.constexpr, RELU: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    acc_dtype = scale_ptr.dtype.element_ty
    row_ids = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    mask = (row_ids < rows)[:, None] & channel_mask[None, :]
    offsets = row_ids.to(tl.int64)[:, None] * C + channels[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0).to(acc_dtype)
    mean = tl.load(mean_ptr + channels, mask=channel_mask, other=0)[None, :]
    scale = tl.load(scale_ptr + channels, mask=channel_mask, other=0)[None, :]
    shift = tl.load(shift_ptr + channels, mask=channel_mask, other=0)[None, :]
    residual_offsets = offsets
    residual_mask = mask
    residual_mean = mean
    residual_scale = scale
    residual_shift = shift
    if RESIDUAL == RESIDUAL_AFFINE:
        residual_mean = tl.load(residual_mean_ptr + channels, mask=channel_mask, other=0)[None, :]
        residual_scale = tl.load(residual_scale_ptr + channels, mask=channel_mask, other=0)[None, :]
        residual_shift = tl.load(residual_shift_ptr + channels, mask=channel_mask, other=0)[None, :]
    if RESIDUAL == RESIDUAL_PADDED:
        # Row (n, h, w) reads residual row (n, h * stride, w * stride), its channels from `offset` on.
        n = (row_ids // HW).to(tl.int64)
        h = (row_ids % HW) // W
        w = row_ids % W
        residual_row = (n * residual_H + h * residual_stride) * residual_W + w * residual_stride
        residual_c = channels - residual_channel_offset
        residual_offsets = residual_row[:, None] * residual_C + residual_c[None, :]
        residual_mask = mask & ((residual_c >= 0) & (residual_c < residual_C))[None, :]
    residual = x
    if RESIDUAL != RESIDUAL_NONE:
        residual = tl.load(residual_ptr + residual_offsets, mask=residual_mask, other=0).to(acc_dtype)
    v = _bn_act_term(x, mean, scale, shift, residual, residual_mean, residual_scale, residual_shift, RESIDUAL, RELU)
    tl.store(out_ptr + offsets, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_terms(gm, x, x2, mask, mean, mean2, SECOND: tl.constexpr):
    """What one element adds to the sums: gm * (x - mean) and gm * (x2 - mean2), zero where masked off."""
    gm_xmu = tl.where(mask, gm * (x - mean), 0.0)
    gm_xmu2 = gm_xmu
    if SECOND:
        gm_xmu2 = tl.where(mask, gm * (x2 - mean2), 0.0)
    return gm_xmu, gm_xmu2


@triton.jit
def _backward_reduce_planes_kernel(g_ptr, output_ptr, x_ptr, mean_ptr, x2_ptr, mean2_ptr, mask_scale_ptr,
                                   mask_shift_ptr, partial_ptr, N, C, HW, hw_blocks, MASK: tl.constexpr,
                                   SECOND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HW: tl.constexpr):
    # The tiles of _batch_stats_planes_kernel; partial is [tiles, sums, C].
    tile = tl.program_id(0)
    c = tl.program_id(1)
    acc_dtype = partial_ptr.dtype.element_ty
    n0 = (tile // hw_blocks) * BLOCK_N
    images = n0 + tl.arange(0, BLOCK_N)
    pixels = (tile % hw_blocks) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = (images < N)[:, None] & (pixels < HW)[None, :]
    offsets = (images.to(tl.int64)[:, None] * C + c) * HW + pixels[None, :]
    mean = tl.load(mean_ptr + c).to(acc_dtype)
    mean2 = mean
    if SECOND:
        mean2 = tl.load(mean2_ptr + c).to(acc_dtype)
    gm = tl.load(g_ptr + offsets, mask=mask, other=0).to(acc_dtype)
    if MASK == MASK_OUTPUT:
        gm = _mask_by_output(gm, tl.load(output_ptr + offsets, mask=mask, other=0).to(acc_dtype))
    x = tl.load(x_ptr + offsets, mask=mask, other=0).to(acc_dtype)
    if MASK == MASK_INPUT:
        gm = _mask_by_input(gm, x, mean, tl.load(mask_scale_ptr + c), tl.load(mask_shift_ptr + c))
    x2 = x
    if SECOND:
        x2 = tl.load(x2_ptr + offsets, mask=mask, other=0).to(acc_dtype)
    gm_xmu, gm_xmu2 = _reduce_terms(gm, x, x2, mask, mean, mean2, SECOND)
    sums = 2 + SECOND
    out = partial_ptr + tile.to(tl.int64) * (sums * C) + c
    tl.store(out, tl.sum(tl.sum(gm, axis=1), axis=0))
    tl.store(out + C, tl.sum(tl.sum(gm_xmu, axis=1), axis=0))
    if SECOND:
        tl.store(out + 2 * C, tl.sum(tl.sum(gm_xmu2, axis=1), axis=0))


@triton.jit
def _backward_reduce_rows_kernel(g_ptr, output_ptr, x_ptr, mean_ptr, x2_ptr, mean2_ptr, mask_scale_ptr,
                                 mask_shift_ptr, partial_ptr, rows, C, MASK: tl.constexpr, SECOND: tl.constexpr,
                                 BLOCKS_PER_TILE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # The tiles of _batch_stats_rows_kernel; partial is [tiles, sums, C].
    tile = tl.program_id(0)
    acc_dtype = partial_ptr.dtype.element_ty
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    mean = tl.load(mean_ptr + channels, mask=channel_mask, other=0).to(acc_dtype)[None, :]
    mean2 = mean
    if SECOND:
        mean2 = tl.load(mean2_ptr + channels, mask=channel_mask, other=0).to(acc_dtype)[None, :]
    mask_scale = mean
    mask_shift = mean
    if MASK == MASK_INPUT:
        mask_scale = tl.load(mask_scale_ptr + channels, mask=channel_mask, other=0)[None, :]
        mask_shift = tl.load(mask_shift_ptr + channels, mask=channel_mask, other=0)[None, :]
    sum_dy = tl.zeros([BLOCK_C], dtype=acc_dtype)
    sum_dy_xmu = tl.zeros([BLOCK_C], dtype=acc_dtype)
    sum_dy_xmu2 = tl.zeros([BLOCK_C], dtype=acc_dtype)
    for block in range(BLOCKS_PER_TILE):
        row_ids = (tile * BLOCKS_PER_TILE + block) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (row_ids < rows)[:, None] & channel_mask[None, :]
        offsets = row_ids.to(tl.int64)[:, None] * C + channels[None, :]
        gm = tl.load(g_ptr + offsets, mask=mask, other=0).to(acc_dtype)
        if MASK == MASK_OUTPUT:
            gm = _mask_by_output(gm, tl.load(output_ptr + offsets, mask=mask, other=0).to(acc_dtype))
        x = tl.load(x_ptr + offsets, mask=mask, other=0).to(acc_dtype)
        if MASK == MASK_INPUT:
            gm = _mask_by_input(gm, x, mean, mask_scale, mask_shift)
        x2 = x
        if SECOND:
            x2 = tl.load(x2_ptr + offsets, mask=mask, other=0).to(acc_dtype)
        gm_xmu, gm_xmu2 = _reduce_terms(gm, x, x2, mask, mean, mean2, SECOND)
        sum_dy += tl.sum(gm, axis=0)
        sum_dy_xmu += tl.sum(gm_xmu, axis=0)
        sum_dy_xmu2 += tl.sum(gm_xmu2, axis=0)
    sums = 2 + SECOND
    out = partial_ptr + tile.to(tl.int64) * (sums * C) + channels
    tl.store(out, sum_dy, mask=channel_mask)
    tl.store(out + C, sum_dy_xmu, mask=channel_mask)
    if SECOND:
        tl.store(out + 2 * C, sum_dy_xmu2, mask=channel_mask)


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, num_tiles, columns, BLOCK_T: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """Column sums of a [tiles, columns] partial, in tile order (chunks of BLOCK_T, each summed as a tree), in
    float64 so that thousands of tiles add no rounding of their own; the result is cast to out's dtype."""
    cols = tl.program_id(0) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < columns
    total = tl.zeros([BLOCK_COLS], dtype=tl.float64)
    for t0 in range(0, num_tiles, BLOCK_T):
        tiles = t0 + tl.arange(0, BLOCK_T)
        mask = (tiles < num_tiles)[:, None] & col_mask[None, :]
        chunk = tl.load(partial_ptr + tiles.to(tl.int64)[:, None] * columns + cols[None, :], mask=mask, other=0)
        total += tl.sum(chunk.to(tl.float64), axis=0)
    tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _backward_elemt_term(gm, x, mean, coef_dy, coef_xmu, coef_const):
    return coef_dy * gm + coef_xmu * (x - mean) + coef_const


@triton.jit
def _backward_elemt_planes_kernel(g_ptr, output_ptr, x_ptr, mean_ptr, coef_dy_ptr, coef_xmu_ptr, coef_const_ptr,
                                  x2_ptr, mean2_ptr, coef2_dy_ptr, coef2_xmu_ptr, coef2_const_ptr, mask_scale_ptr,
                                  mask_shift_ptr, grad_x_ptr, grad_other_ptr, planes, C, HW, MASK: tl.constexpr,
                                  OTHER: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HW: tl.constexpr):
    acc_dtype = mean_ptr.dtype.element_ty
    plane_ids = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    pixels = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    plane_mask = plane_ids < planes
    mask = plane_mask[:, None] & (pixels < HW)[None, :]
    c = plane_ids % C
    offsets = plane_ids.to(tl.int64)[:, None] * HW + pixels[None, :]
    gm = tl.load(g_ptr + offsets, mask=mask, other=0).to(acc_dtype)
    if MASK == MASK_OUTPUT:
        gm = _mask_by_output(gm, tl.load(output_ptr + offsets, mask=mask, other=0).to(acc_dtype))
    x = tl.load(x_ptr + offsets, mask=mask, other=0).to(acc_dtype)
    mean = tl.load(mean_ptr + c, mask=plane_mask, other=0)[:, None]
    if MASK == MASK_INPUT:
        gm = _mask_by_input(gm, x, mean, tl.load(mask_scale_ptr + c, mask=plane_mask, other=0)[:, None],
                            tl.load(mask_shift_ptr + c, mask=plane_mask, other=0)[:, None])
    grad_x = _backward_elemt_term(gm, x, mean,
                                  tl.load(coef_dy_ptr + c, mask=plane_mask, other=0)[:, None],
                                  tl.load(coef_xmu_ptr + c, mask=plane_mask, other=0)[:, None],
                                  tl.load(coef_const_ptr + c, mask=plane_mask, other=0)[:, None])
    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if OTHER == OTHER_MASKED_GRAD:
        tl.store(grad_other_ptr + offsets, gm.to(grad_other_ptr.dtype.element_ty), mask=mask)
    if OTHER == OTHER_SECOND_BN:
        x2 = tl.load(x2_ptr + offsets, mask=mask, other=0).to(acc_dtype)
        grad_x2 = _backward_elemt_term(gm, x2, tl.load(mean2_ptr + c, mask=plane_mask, other=0)[:, None],
                                       tl.load(coef2_dy_ptr + c, mask=plane_mask, other=0)[:, None],
                                       tl.load(coef2_xmu_ptr + c, mask=plane_mask, other=0)[:, None],
                                       tl.load(coef2_const_ptr + c, mask=plane_mask, other=0)[:, None])
        tl.store(grad_other_ptr + offsets, grad_x2.to(grad_other_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_elemt_rows_kernel(g_ptr, output_ptr, x_ptr, mean_ptr, coef_dy_ptr, coef_xmu_ptr, coef_const_ptr,
                                x2_ptr, mean2_ptr, coef2_dy_ptr, coef2_xmu_ptr, coef2_const_ptr, mask_scale_ptr,
                                mask_shift_ptr, grad_x_ptr, grad_other_ptr, rows, C, MASK: tl.constexpr,
                                OTHER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    acc_dtype = mean_ptr.dtype.element_ty
    row_ids = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    mask = (row_ids < rows)[:, None] & channel_mask[None, :]
    offsets = row_ids.to(tl.int64)[:, None] * C + channels[None, :]
    gm = tl.load(g_ptr + offsets, mask=mask, other=0).to(acc_dtype)
    if MASK == MASK_OUTPUT:
        gm = _mask_by_output(gm, tl.load(output_ptr + offsets, mask=mask, other=0).to(acc_dtype))
    x = tl.load(x_ptr + offsets, mask=mask, other=0).to(acc_dtype)
    mean = tl.load(mean_ptr + channels, mask=channel_mask, other=0)[None, :]
    if MASK == MASK_INPUT:
        gm = _mask_by_input(gm, x, mean, tl.load(mask_scale_ptr + channels, mask=channel_mask, other=0)[None, :],
                            tl.load(mask_shift_ptr + channels, mask=channel_mask, other=0)[None, :])
    grad_x = _backward_elemt_term(gm, x, mean,
                                  tl.load(coef_dy_ptr + channels, mask=channel_mask, other=0)[None, :],
                                  tl.load(coef_xmu_ptr + channels, mask=channel_mask, other=0)[None, :],
                                  tl.load(coef_const_ptr + channels, mask=channel_mask, other=0)[None, :])
    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if OTHER == OTHER_MASKED_GRAD:
        tl.store(grad_other_ptr + offsets, gm.to(grad_other_ptr.dtype.element_ty), mask=mask)
    if OTHER == OTHER_SECOND_BN:
        x2 = tl.load(x2_ptr + offsets, mask=mask, other=0).to(acc_dtype)
        grad_x2 = _backward_elemt_term(gm, x2, tl.load(mean2_ptr + channels, mask=channel_mask, other=0)[None, :],
                                       tl.load(coef2_dy_ptr + channels, mask=channel_mask, other=0)[None, :],
                                       tl.load(coef2_xmu_ptr + channels, mask=channel_mask, other=0)[None, :],
                                       tl.load(coef2_const_ptr + channels, mask=channel_mask, other=0)[None, :])
        tl.store(grad_other_ptr + offsets, grad_x2.to(grad_other_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Geometry: how a shape is cut into blocks and tiles (the shape alone decides, so results are reproducible).


def _num_warps(block_elements: int) -> int:
    # 8-16 elements per thread for large blocks; small blocks (tiny tensors) get fewer warps, not idle lanes.
    return max(1, min(8, block_elements // 512))


class Activation(NamedTuple):
    """A dense activation, its layout and its geometry."""

    tensor: Tensor
    memory_format: torch.memory_format
    N: int
    C: int
    H: int
    W: int

    @property
    def channels_last(self) -> bool:
        return self.memory_format == torch.channels_last

    @property
    def HW(self) -> int:
        return self.H * self.W

    @property
    def rows(self) -> int:
        return self.N * self.H * self.W

    @property
    def accumulation_dtype(self) -> torch.dtype:
        return accumulation_dtype(self.tensor.dtype)


class PlaneTiles(NamedTuple):
    """NCHW reduction tiles: [BLOCK_N images, BLOCK_HW pixels] of one channel, all in registers at once."""

    block_n: int
    block_hw: int
    hw_blocks: int
    count: int

    @staticmethod
    def of(a: Activation) -> PlaneTiles:
        block_hw = min(triton.next_power_of_2(a.HW), REDUCE_BLOCK)
        block_n = min(max(1, REDUCE_BLOCK // block_hw), triton.next_power_of_2(a.N))
        hw_blocks = triton.cdiv(a.HW, block_hw)
        return PlaneTiles(block_n, block_hw, hw_blocks, triton.cdiv(a.N, block_n) * hw_blocks)


class RowTiles(NamedTuple):
    """NHWC reduction tiles: blocks_per_tile blocks of [block_r rows, block_c channels], one after the other."""

    block_r: int
    block_c: int
    blocks_per_tile: int
    count: int
    channel_blocks: int

    @staticmethod
    def of(a: Activation) -> RowTiles:
        block_c = min(triton.next_power_of_2(a.C), REDUCE_BLOCK_C)
        block_r = min(max(1, REDUCE_BLOCK // block_c), triton.next_power_of_2(a.rows))
        row_blocks = triton.cdiv(a.rows, block_r)
        channel_blocks = triton.cdiv(a.C, block_c)
        blocks_per_tile = 1
        while (blocks_per_tile * 2 <= MAX_BLOCKS_PER_TILE
               and triton.cdiv(row_blocks, blocks_per_tile * 2) * channel_blocks >= TARGET_PROGRAMS):
            blocks_per_tile *= 2
        return RowTiles(block_r, block_c, blocks_per_tile, triton.cdiv(row_blocks, blocks_per_tile), channel_blocks)


class ElementwiseBlocks(NamedTuple):
    """Blocks of elementwise kernels: [block_outer, block_inner] over (planes, pixels) or (rows, channels)."""

    block_outer: int
    block_inner: int
    grid: tuple[int, int]

    @staticmethod
    def of(a: Activation) -> ElementwiseBlocks:
        outer, inner = (a.rows, a.C) if a.channels_last else (a.N * a.C, a.HW)
        inner_limit = ELEMENTWISE_BLOCK_C if a.channels_last else ELEMENTWISE_BLOCK
        block_inner = min(triton.next_power_of_2(inner), inner_limit)
        block_outer = min(max(1, ELEMENTWISE_BLOCK // block_inner), triton.next_power_of_2(outer))
        grid = (triton.cdiv(outer, block_outer), triton.cdiv(inner, block_inner))
        return ElementwiseBlocks(block_outer, block_inner, grid)

    @property
    def num_warps(self) -> int:
        return _num_warps(self.block_outer * self.block_inner)


# ---------------------------------------------------------------------------------------------------------------
# Arguments as the kernels read them. The launchers trust their arguments: they are the bodies of the registered ops
# (library.py), which the Triton kernel set calls with what fused_resnet.ops has checked. Only the input's device is
# checked (stats.check_launch_device), as on a device the kernels do not run on Triton fails with a message about
# pointers. Every launch runs under stats.launch_guard(input), on the input's device and its current stream.


def _input(op: str, t: Tensor) -> Activation:
    """The input of an op, on a device the kernels run on, dense in its layout (NCHW unless dense channels_last)."""
    check_launch_device(op, t)
    memory_format = memory_format_of(t)
    return Activation(t.contiguous(memory_format=memory_format), memory_format, *t.shape)


def _activation_like(t: Tensor | None, a: Activation) -> Tensor | None:
    """Another activation of the call (or None), dense in the input's layout."""
    return None if t is None else t.contiguous(memory_format=a.memory_format)


def _channel_param(t: Tensor | None, a: Activation) -> Tensor | None:
    """A vector of per-channel values (or None), contiguous in the accumulation dtype."""
    return None if t is None else t.to(a.accumulation_dtype).contiguous()


def _channel_mean(t: Tensor | None, a: Activation) -> Tensor:
    """A per-channel mean as _channel_param makes it, zeros for None (no centering): the kernels have one form."""
    return torch.zeros(a.C, dtype=a.accumulation_dtype, device=a.tensor.device) if t is None else _channel_param(t, a)


def _is_padded_residual(a: Activation, residual: Tensor | None, stride: int, offset: int) -> bool:
    """Whether bn_act's residual is option A's (subsampled, or fewer channels placed at `offset`) rather than an
    identity: the test of checks.h's check_padded_residual."""
    return stride != 1 or offset != 0 or (residual is not None and residual.shape[1] != a.C)


# ---------------------------------------------------------------------------------------------------------------
# Launchers: the compiled ops' arguments, order and return conventions.


def batch_stats(y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of a 4-D activation, in its accumulation dtype."""
    a = _input("fused_resnet.triton.batch_stats", y)
    x, acc = a.tensor, a.accumulation_dtype
    if a.channels_last:
        tiles = RowTiles.of(a)
        num_tiles = tiles.count
    else:
        plane_tiles = PlaneTiles.of(a)
        num_tiles = plane_tiles.count
    # float64 partials, whatever the dtype (see _SHIFT_WHY): T x C values, against N*H*W x C read.
    mean_partial = torch.empty((num_tiles, a.C), dtype=torch.float64, device=x.device)
    m2_partial = torch.empty_like(mean_partial)
    count_partial = torch.empty(num_tiles, dtype=torch.int32, device=x.device)
    acc_dtype = tl.float64 if acc == torch.float64 else tl.float32
    with launch_guard(x):
        if a.channels_last:
            _batch_stats_rows_kernel[(num_tiles, tiles.channel_blocks)](
                x, mean_partial, m2_partial, count_partial, a.rows, a.C, ACC_DTYPE=acc_dtype,
                BLOCKS_PER_TILE=tiles.blocks_per_tile, BLOCK_R=tiles.block_r, BLOCK_C=tiles.block_c,
                num_warps=_num_warps(tiles.block_r * tiles.block_c))
        else:
            _batch_stats_planes_kernel[(num_tiles, a.C)](
                x, mean_partial, m2_partial, count_partial, a.N, a.C, a.HW, plane_tiles.hw_blocks,
                ACC_DTYPE=acc_dtype, BLOCK_N=plane_tiles.block_n, BLOCK_HW=plane_tiles.block_hw,
                num_warps=_num_warps(plane_tiles.block_n * plane_tiles.block_hw))
    # The merge guards its own launches.
    mean, var = merge_partial_stats(mean_partial, m2_partial, count_partial)
    return mean.to(acc), var.to(acc)


def bn_act(
    y: Tensor,
    mean: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    residual: Tensor | None = None,
    residual_mean: Tensor | None = None,
    residual_scale: Tensor | None = None,
    residual_shift: Tensor | None = None,
    relu: bool = True,
    residual_stride: int = 1,
    residual_channel_offset: int = 0,
) -> Tensor:
    """[relu]((y - mean) * scale + shift + R), R = (residual - residual_mean) * residual_scale + residual_shift (a
    projection shortcut's BN), residual, or nothing; a None mean (residual_mean) is 0. With residual_stride > 1,
    residual_channel_offset > 0 or a residual with fewer channels than y, R is option A's shortcut, read in place:
    R[n, c, h, w] = residual[n, c - residual_channel_offset, h * residual_stride, w * residual_stride] where residual
    has that channel, 0 elsewhere."""
    a = _input("fused_resnet.triton.bn_act", y)
    mean = _channel_mean(mean, a)
    scale = _channel_param(scale, a)
    shift = _channel_param(shift, a)
    residual_geometry = (a.C, a.H, a.W)
    if _is_padded_residual(a, residual, residual_stride, residual_channel_offset):
        kind = RESIDUAL_PADDED
        residual_geometry = tuple(residual.shape[1:])
    elif residual is None:
        kind = RESIDUAL_NONE
    else:
        kind = RESIDUAL_IDENTITY if residual_scale is None else RESIDUAL_AFFINE
    residual = _activation_like(residual, a)
    residual_mean = _channel_mean(residual_mean, a) if kind == RESIDUAL_AFFINE else None
    residual_scale = _channel_param(residual_scale, a)
    residual_shift = _channel_param(residual_shift, a)
    x = a.tensor
    out = torch.empty_like(x)
    blocks = ElementwiseBlocks.of(a)
    kernel, extent = (_bn_act_rows_kernel, a.rows) if a.channels_last else (_bn_act_planes_kernel, a.N * a.C)
    block_names = ("BLOCK_R", "BLOCK_C") if a.channels_last else ("BLOCK_P", "BLOCK_HW")
    with launch_guard(x):
        kernel[blocks.grid](
            x, mean, scale, shift, residual, residual_mean, residual_scale, residual_shift, out, extent, a.C, a.HW, a.W,
            *residual_geometry, residual_stride, residual_channel_offset, RESIDUAL=kind.value, RELU=bool(relu),
            **dict(zip(block_names, (blocks.block_outer, blocks.block_inner))), num_warps=blocks.num_warps)
    return out


def _sum_partials(partial: Tensor, sums: int, channels: int, dtype: torch.dtype) -> list[Tensor]:
    """Per-channel totals of a [tiles, sums, channels] partial, summed over tiles in order. Launches on the current
    device: its caller holds the launch guard."""
    num_tiles = partial.shape[0]
    columns = sums * channels
    out = torch.empty((sums, channels), dtype=dtype, device=partial.device)
    block_cols = min(triton.next_power_of_2(columns), SUM_BLOCK_COLUMNS)
    block_t = min(triton.next_power_of_2(num_tiles), SUM_BLOCK_T)
    _sum_partials_kernel[(triton.cdiv(columns, block_cols),)](partial, out, num_tiles, columns, BLOCK_T=block_t,
                                                              BLOCK_COLS=block_cols, num_warps=4)
    return list(out.unbind(0))


def _mask_kind(output: Tensor | None, mask_scale: Tensor | None) -> tl.constexpr:
    """The backward kernels' MASK for a call: from its output, from its input (mask_scale given), or none."""
    return MASK_OUTPUT if output is not None else MASK_INPUT if mask_scale is not None else MASK_NONE


def bn_act_backward_reduce(
    grad_output: Tensor, output: Tensor | None, input: Tensor, mean: Tensor, input2: Tensor | None = None,
    mean2: Tensor | None = None, mask_scale: Tensor | None = None, mask_shift: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """With gm = grad_output masked by the ReLU (where output > 0, or where (input - mean) * mask_scale + mask_shift
    > 0 computed as bn_act computes it, or everywhere when neither is given), per channel: (sum gm,
    sum gm * (input - mean), sum gm * (input2 - mean2) or an empty tensor), in the accumulation dtype."""
    a = _input("fused_resnet.triton.bn_act_backward_reduce", input)
    second = input2 is not None
    x = a.tensor
    g = _activation_like(grad_output, a)
    out = _activation_like(output, a)
    x2 = _activation_like(input2, a)
    mean = _channel_param(mean, a)
    mean2 = _channel_param(mean2, a)
    mask_vectors = [_channel_param(mask_scale, a), _channel_param(mask_shift, a)]
    acc = a.accumulation_dtype
    sums = 3 if second else 2
    flags = dict(MASK=_mask_kind(out, mask_scale).value, SECOND=second)
    with launch_guard(x):
        if a.channels_last:
            tiles = RowTiles.of(a)
            partial = torch.empty((tiles.count, sums, a.C), dtype=acc, device=x.device)
            _backward_reduce_rows_kernel[(tiles.count, tiles.channel_blocks)](
                g, out, x, mean, x2, mean2, *mask_vectors, partial, a.rows, a.C, **flags,
                BLOCKS_PER_TILE=tiles.blocks_per_tile, BLOCK_R=tiles.block_r, BLOCK_C=tiles.block_c,
                num_warps=_num_warps(tiles.block_r * tiles.block_c))
        else:
            plane_tiles = PlaneTiles.of(a)
            partial = torch.empty((plane_tiles.count, sums, a.C), dtype=acc, device=x.device)
            _backward_reduce_planes_kernel[(plane_tiles.count, a.C)](
                g, out, x, mean, x2, mean2, *mask_vectors, partial, a.N, a.C, a.HW, plane_tiles.hw_blocks, **flags,
                BLOCK_N=plane_tiles.block_n, BLOCK_HW=plane_tiles.block_hw,
                num_warps=_num_warps(plane_tiles.block_n * plane_tiles.block_hw))
        totals = _sum_partials(partial, sums, a.C, acc)
    if not second:
        totals.append(torch.empty(0, dtype=acc, device=x.device))
    return tuple(totals)


def bn_act_backward_elemt(
    grad_output: Tensor, output: Tensor | None, input: Tensor, mean: Tensor, coef_dy: Tensor, coef_xmu: Tensor,
    coef_const: Tensor, input2: Tensor | None = None, mean2: Tensor | None = None, coef2_dy: Tensor | None = None,
    coef2_xmu: Tensor | None = None, coef2_const: Tensor | None = None, residual_grad: bool = False,
    mask_scale: Tensor | None = None, mask_shift: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """grad_input = coef_dy * gm + coef_xmu * (input - mean) + coef_const, gm = grad_output masked by the ReLU as in
    bn_act_backward_reduce; grad_other is the same for input2 with mean2 and the coef2_* vectors, or gm
    itself when residual_grad (an identity residual's gradient), or an empty tensor."""
    a = _input("fused_resnet.triton.bn_act_backward_elemt", input)
    second = input2 is not None
    x = a.tensor
    g = _activation_like(grad_output, a)
    out = _activation_like(output, a)
    x2 = _activation_like(input2, a)
    params = [_channel_param(t, a) for t in (mean, coef_dy, coef_xmu, coef_const)]
    params2 = [_channel_param(t, a) for t in (mean2, coef2_dy, coef2_xmu, coef2_const)]
    mask_vectors = [_channel_param(mask_scale, a), _channel_param(mask_shift, a)]
    grad_input = torch.empty_like(x)
    other = OTHER_SECOND_BN if second else OTHER_MASKED_GRAD if residual_grad else OTHER_NONE
    grad_other = torch.empty_like(x) if other != OTHER_NONE else None
    blocks = ElementwiseBlocks.of(a)
    if a.channels_last:
        kernel, extent, block_names = _backward_elemt_rows_kernel, a.rows, ("BLOCK_R", "BLOCK_C")
    else:
        kernel, extent, block_names = _backward_elemt_planes_kernel, a.N * a.C, ("BLOCK_P", "BLOCK_HW")
    with launch_guard(x):
        kernel[blocks.grid](
            g, out, x, *params, x2, *params2, *mask_vectors, grad_input, grad_other, extent,
            *((a.C,) if a.channels_last else (a.C, a.HW)), MASK=_mask_kind(out, mask_scale).value, OTHER=other.value,
            **dict(zip(block_names, (blocks.block_outer, blocks.block_inner))), num_warps=blocks.num_warps)
    if grad_other is None:
        grad_other = torch.empty(0, dtype=x.dtype, device=x.device)
    return grad_input, grad_other
