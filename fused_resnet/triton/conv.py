"""Convolution as an implicit GEMM, with the fusions of a training or inference ResNet around it.

The GEMM: rows are the output pixels (N*Hout*Wout), columns the output channels of one group, and the reduction
runs over KH*KW*(Cin/groups). One program computes a BLOCK_M x BLOCK_N output tile; its K loop walks the kernel
taps (kh, kw) and, per tap, the group's input channels in chunks of BLOCK_K, gathering the input tile straight
from x (no im2col buffer). Groups are folded into the grid's second dimension (groups * column tiles per group).
Every tensor is addressed through its strides, so NCHW and channels_last inputs, weights and residuals run
without copies; the output follows x's memory format. A weight tile is BLOCK_K input channels by BLOCK_N output
channels: a weight whose output channels are innermost in memory (w.permute(2, 3, 1, 0).contiguous().permute(3, 2,
0, 1), same shape) loads it in coalesced rows, which a caller that keeps weights across calls can cache.

Fusions (docs/design.md §4):
- prologue (training: conv_{i+1} of a BN-ReLU-conv chain): each input value is replaced by
  relu((x - mean)*scale + shift) as it is loaded (centered: a mean folded into the shift cancels when it is large),
  and only then are the positions that fall in the zero padding set to 0, because the padding of conv(relu(bn(y)))
  pads the normalized activation, not y;
- epilogue: + bias (inference, BN folded into the weights), + residual (same shape, or option A's shortcut read
  in place: subsampled and channel-offset, zero outside its channels), then ReLU, stored in x's dtype;
- statistics (training: conv_i): per tile and channel, the count, mean and M2 of the values as stored (rounded
  to the output dtype, so that BN normalizes exactly what it reads), the mean first and then the squared
  deviations from it; merge_partial_stats merges the tiles in a fixed order (no atomics: deterministic).

Accumulation is fp32. fp32 inputs use TF32 tensor cores when torch.backends.cudnn.allow_tf32 is set (PyTorch's
default for convolutions) and IEEE fp32 otherwise. The backward is not here: it stays on ATen
(torch.ops.aten.convolution_backward, i.e. cuDNN), which needs only the saved input and weight.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..tensors import conv_output_size, describe, empty_dense_like, is_channels_last
from . import interpreted
from .activation import relu
from .stats import check_launch_device, launch_guard, merge_partial_stats

_OP = "fused_resnet.triton.conv2d"
AUTOTUNE_ENV_VAR = "FUSED_RESNET_TRITON_AUTOTUNE"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class ConvConfig(NamedTuple):
    """One launch configuration of the convolution kernel: its tile sizes and Triton's scheduling knobs."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# The configurations shipped for Ampere/Hopper, keyed by (BLOCK_N, BLOCK_K): `choose_config` picks one from the
# problem's shape and layout. All use 4 warps: an implicit-GEMM template elsewhere computed wrong results for kernels
# larger than 1x1 at num_warps >= 8, so only configurations that the tests run explicitly (tests/test_triton_conv.py,
# on a 3x3 stride-2 padded and a 1x1 problem, for real on a GPU) are shipped. None spills a register, and each fits
# an A100's shared memory (163 KiB a block; an H100 has 227), in every dtype: tests/test_triton_conv_sm90.py compiles
# them for sm_90 at ResNet-50's launches and reads ptxas' report. That caps the tiles: with the prologue, the
# statistics epilogue and the gather's index arithmetic, 4 warps have no room for a 128x128 fp32 accumulator (128
# registers a thread) or for BLOCK_K 64 (128x128 tiles spilled 0.1-4.4 KB a thread, 128x64x64 up to 2.3 KB, and fp32
# at BLOCK_K 64 needed 147-230 KB of shared memory). The widest tile, 64x128x32, takes 153-252 registers.
CONFIGS: dict[tuple[int, int], ConvConfig] = {
    (16, 16): ConvConfig(64, 16, 16, 4, 3),
    (32, 16): ConvConfig(64, 32, 16, 4, 3),
    (32, 32): ConvConfig(128, 32, 32, 4, 4),
    (64, 16): ConvConfig(128, 64, 16, 4, 4),
    (64, 32): ConvConfig(128, 64, 32, 4, 4),
    (128, 32): ConvConfig(64, 128, 32, 4, 4),
}

# NCHW inputs: a tile's input channels are H*W elements apart, so its loads are single elements that Triton cannot
# copy to shared memory asynchronously; the pipeline holds every stage's tile in registers instead, and the tiles
# above spill (64x64x32: 0.3-0.6 KB a thread, 128x128x32: up to 4.3 KB; even 64x64x16 reaches 255 registers and
# spills 12-24 B with a 3x3 kernel at 14x14 and a batch of 143). Tiles of 2048 outputs and BLOCK_K 16 take at most
# 128 registers; for a group wider than 32 channels 32x64 rather than 64x32, so that the gathered input is read
# once per 64 output channels.
NCHW_CONFIGS: dict[tuple[int, int], ConvConfig] = {
    (16, 16): ConvConfig(64, 16, 16, 4, 3),
    (32, 16): ConvConfig(64, 32, 16, 4, 3),
    (64, 16): ConvConfig(32, 64, 16, 4, 3),
}

# Under TRITON_INTERPRET=1 every program runs one after the other in numpy, and every operation costs the same
# whatever its size: small tiles keep the wasted (masked) work of tiny test shapes low. Its warps and stages only
# matter on a GPU, where the tests run it too.
INTERPRETER_CONFIG = ConvConfig(32, 16, 16, 4, 2)


def choose_config(out_channels_per_group: int, in_channels_per_group: int, channels_last: bool) -> ConvConfig:
    """The shipped configuration for a problem, without a search.

    From CONFIGS for a channels_last input, NCHW_CONFIGS for an NCHW one. BLOCK_N is the group's output channels
    rounded up to a power of two (16 up to the table's widest), so that narrow groups (ResNeXt: 4..32 channels a
    group) do not pay for wide tiles of zeros. BLOCK_K is the group's input channels per tap rounded up likewise,
    up to the largest the table has for that BLOCK_N (a stem with 3 input channels takes 16). Under the Triton
    interpreter: INTERPRETER_CONFIG.
    """
    if interpreted():
        return INTERPRETER_CONFIG
    table = CONFIGS if channels_last else NCHW_CONFIGS
    widest = max(n for n, _ in table)
    block_n = min(widest, max(16, triton.next_power_of_2(out_channels_per_group)))
    block_k = max(16, triton.next_power_of_2(in_channels_per_group))
    available_k = sorted(k for n, k in table if n == block_n)
    fitting_k = [k for k in available_k if k <= block_k]
    return table[(block_n, fitting_k[-1] if fitting_k else available_k[0])]


def autotune_enabled() -> bool:
    """FUSED_RESNET_TRITON_AUTOTUNE=1 searches the shipped configurations per shape and layout instead of taking
    `choose_config`'s pick."""
    return os.environ.get(AUTOTUNE_ENV_VAR, "0") not in ("", "0")


@triton.jit
def _conv_kernel(
    x_ptr, w_ptr, bias_ptr, mean_ptr, scale_ptr, shift_ptr, residual_ptr, y_ptr,
    mean_partial_ptr, m2_partial_ptr, count_partial_ptr,
    in_h, in_w, out_h, out_w, rows,
    in_per_group, out_channels, out_per_group,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    w_stride_o, w_stride_i, w_stride_h, w_stride_w,
    r_stride_n, r_stride_c, r_stride_h, r_stride_w,
    y_stride_n, y_stride_c, y_stride_h, y_stride_w,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    residual_channels, residual_stride, residual_channel_offset,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    STATS: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tiles_per_group = tl.cdiv(out_per_group, BLOCK_N)
    group = pid_n // tiles_per_group

    # Output pixels of this tile (GEMM rows) and their (n, oh, ow).
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < rows
    pixels = out_h * out_w
    n = m // pixels
    ohw = m % pixels
    oh = ohw // out_w
    ow = ohw % out_w
    # int64 for the batch term: N*C*H*W passes 2**31 at batches in the thousands (256 x 56 x 56 from 2,700 images).
    x_row = n.to(tl.int64) * x_stride_n
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w

    # Output channels of this tile (GEMM columns), within the group and overall.
    j = (pid_n % tiles_per_group) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = j < out_per_group
    co = group * out_per_group + j

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_chunks = tl.cdiv(in_per_group, BLOCK_K)
    # One flat loop over (tap, channel chunk), so that Triton pipelines it whatever the kernel size.
    for step in range(0, KH * KW * k_chunks):
        tap = step // k_chunks
        c0 = (step % k_chunks) * BLOCK_K
        kh = tap // KW
        kw = tap % KW
        ih = ih0 + kh * dil_h
        iw = iw0 + kw * dil_w
        inside = m_mask & (ih >= 0) & (ih < in_h) & (iw >= 0) & (iw < in_w)
        ci = c0 + tl.arange(0, BLOCK_K)
        k_mask = ci < in_per_group
        cin = group * in_per_group + ci
        a_mask = inside[:, None] & k_mask[None, :]
        a_ptrs = x_ptr + (x_row + ih * x_stride_h + iw * x_stride_w)[:, None] + (cin * x_stride_c)[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if HAS_PROLOGUE:
            mean = tl.load(mean_ptr + cin, mask=k_mask, other=0.0)
            scale = tl.load(scale_ptr + cin, mask=k_mask, other=0.0)
            shift = tl.load(shift_ptr + cin, mask=k_mask, other=0.0)
            normalized = relu((a.to(tl.float32) - mean[None, :]) * scale[None, :] + shift[None, :])
            # The zero padding (and the rows and channels past the end) must stay 0 after the transform: relu(shift)
            # is not 0. Rounded to x's dtype, as the normalized activation of the unfused path would be.
            a = tl.where(a_mask, normalized, 0.0).to(x_ptr.dtype.element_ty)
        b_ptrs = w_ptr + (kh * w_stride_h + kw * w_stride_w) + (ci * w_stride_i)[:, None] + (co * w_stride_o)[None, :]
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_IN_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        # R[n, c, h, w] = residual[n, c - offset, h*stride, w*stride] where that channel exists, else 0; a plain
        # residual is stride 1, offset 0.
        rc = co - residual_channel_offset
        r_mask = out_mask & ((rc >= 0) & (rc < residual_channels))[None, :]
        r_row = n.to(tl.int64) * r_stride_n + (oh * residual_stride) * r_stride_h + (ow * residual_stride) * r_stride_w
        r = tl.load(residual_ptr + r_row[:, None] + (rc * r_stride_c)[None, :], mask=r_mask, other=0.0)
        acc += r.to(tl.float32)
    if RELU:
        acc = relu(acc)
    out = acc.to(y_ptr.dtype.element_ty)
    y_row = n.to(tl.int64) * y_stride_n + oh * y_stride_h + ow * y_stride_w
    tl.store(y_ptr + y_row[:, None] + (co * y_stride_c)[None, :], out, mask=out_mask)

    if STATS:
        # Moments of the stored values minus the tile's first row: small numbers whatever the channel's mean (a
        # mean of 1e4 in fp32 is held to 1e-3, which a spread of 0.1 cannot afford), the mean handed on in float64
        # (as in bn.py's batch statistics).
        stored = out.to(tl.float32)
        shift = tl.sum(tl.where((tl.arange(0, BLOCK_M) == 0)[:, None], stored, 0.0), axis=0)
        shifted = tl.where(out_mask, stored - shift[None, :], 0.0)
        count = tl.minimum(rows - pid_m * BLOCK_M, BLOCK_M)
        tile_mean = tl.sum(shifted, axis=0) / count
        deviation = tl.where(out_mask, shifted - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(deviation * deviation, axis=0)
        partial = pid_m.to(tl.int64) * out_channels + co
        tl.store(mean_partial_ptr + partial, shift.to(tl.float64) + tile_mean.to(tl.float64), mask=n_mask)
        tl.store(m2_partial_ptr + partial, tile_m2.to(tl.float64), mask=n_mask)
        # Every column tile of this row tile knows the count; one of them writes it.
        tl.store(count_partial_ptr + pid_m, count, mask=pid_n == 0)


def _interpreter_bench(kernel_call, quantiles):
    """The search's timer under TRITON_INTERPRET=1, where Triton has no device to time on: one call's wall time
    (meaningless as a speed, but it lets the tests run the search path, best_config included)."""
    start = time.perf_counter()
    kernel_call()
    elapsed = time.perf_counter() - start
    return [elapsed] * len(quantiles)


def _triton_config(config: ConvConfig) -> triton.Config:
    return triton.Config({"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k},
                         num_warps=config.num_warps, num_stages=config.num_stages)


# Every shipped configuration, each once.
SEARCHED: dict[ConvConfig, triton.Config] = {
    c: _triton_config(c) for c in (*CONFIGS.values(), *NCHW_CONFIGS.values())}


def _configs_of_the_layout(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The search's candidates for one launch: the table `choose_config` picks from for its input's layout (an NCHW
    input spills with the channels_last tiles)."""
    table = CONFIGS if is_channels_last(named_args["x_ptr"]) else NCHW_CONFIGS
    return [SEARCHED[c] for c in table.values()]


# The opt-in search: the shipped configurations of the input's layout, timed once per shape, layout and fused
# variant (and dtype, which Triton adds to the key). The channel strides of the input, weight and residual tell
# their layouts apart (NCHW's x_stride_c is H*W, channels_last's 1; a weight's w_stride_i is KH*KW, 1 or Cout), and
# a configuration that wins on one layout may lose on another.
_conv_kernel_autotuned = triton.autotune(
    configs=list(SEARCHED.values()),
    key=["in_h", "in_w", "out_h", "out_w", "rows", "in_per_group", "out_channels", "out_per_group",
         "x_stride_c", "w_stride_o", "w_stride_i", "r_stride_c", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h",
         "dil_w", "KH", "KW", "HAS_BIAS", "HAS_PROLOGUE", "HAS_RESIDUAL", "RELU", "STATS", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _configs_of_the_layout},
    do_bench=_interpreter_bench if interpreted() else None,
)(_conv_kernel)


class KernelArguments(NamedTuple):
    """What a launch hands `_conv_kernel` besides its configuration: the arguments in order, the variant's
    constexprs, and the output and statistics buffers among those arguments (None without `stats`)."""

    args: tuple
    flags: dict
    y: Tensor
    mean_partial: Tensor | None
    m2_partial: Tensor | None
    count_partial: Tensor | None


def kernel_arguments(x: Tensor, weight: Tensor, bias: Tensor | None, out_size: tuple[int, int],
                     stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                     input_mean: Tensor | None, input_scale: Tensor | None, input_shift: Tensor | None,
                     residual: Tensor | None, residual_stride: int, residual_channel_offset: int, relu: bool,
                     stats: bool, tiles: int
                     ) -> KernelArguments:
    """Allocates the output (and, with `stats`, partials for `tiles` row tiles) and lays out the kernel's
    arguments. Shared by the launch and tests/test_triton_conv_sm90.py, which compiles the kernel at the
    specializations (integers equal to 1 or divisible by 16) that real arguments give it."""
    batch, _, in_h, in_w = x.shape
    out_channels, in_per_group, kh, kw = weight.shape
    groups = x.shape[1] // in_per_group
    out_h, out_w = out_size
    y = empty_dense_like(x, (batch, out_channels, out_h, out_w))
    mean_partial = m2_partial = count_partial = None
    if stats:
        mean_partial = torch.empty((tiles, out_channels), dtype=torch.float64, device=x.device)
        m2_partial = torch.empty_like(mean_partial)
        count_partial = torch.empty(tiles, dtype=torch.int32, device=x.device)
    r = residual if residual is not None else x
    args = (
        x, weight, bias, input_mean, input_scale, input_shift, residual, y, mean_partial, m2_partial, count_partial,
        in_h, in_w, out_h, out_w, batch * out_h * out_w, in_per_group, out_channels, out_channels // groups,
        *x.stride(), *weight.stride(), *r.stride(), *y.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        r.shape[1], residual_stride, residual_channel_offset,
    )
    precision = "tf32" if x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"
    # The interpreter keeps bfloat16 as raw uint16 bits and multiplies those as integers in tl.dot: there the
    # operands go up to fp32 first, which is exact (a product of two bf16 values fits fp32's mantissa) and
    # accumulates in fp32 as the tensor cores do.
    flags = dict(KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_PROLOGUE=input_scale is not None,
                 HAS_RESIDUAL=residual is not None, RELU=relu, STATS=stats, INPUT_PRECISION=precision,
                 DOT_IN_FP32=interpreted() and x.dtype == torch.bfloat16)
    return KernelArguments(args, flags, y, mean_partial, m2_partial, count_partial)


def _launch(x: Tensor, weight: Tensor, bias: Tensor | None, out_size: tuple[int, int], stride: tuple[int, int],
            padding: tuple[int, int], dilation: tuple[int, int], groups: int, input_mean: Tensor | None,
            input_scale: Tensor | None, input_shift: Tensor | None, residual: Tensor | None, residual_stride: int,
            residual_channel_offset: int, relu: bool, stats: bool, config: ConvConfig | None
            ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Runs the kernel; returns the output and, with `stats`, the per-tile (mean, M2) [T, Cout] and counts [T].
    `config` None: the heuristic's choice, or the search when FUSED_RESNET_TRITON_AUTOTUNE is set."""
    out_channels, in_per_group = weight.shape[:2]
    out_per_group = out_channels // groups
    rows = x.shape[0] * out_size[0] * out_size[1]
    search = config is None and autotune_enabled()
    if config is None and not search:
        config = choose_config(out_per_group, in_per_group, is_channels_last(x))
    # Partials sized for the smallest BLOCK_M a launch may use (the search tries them all); the rows past the
    # tiles of the configuration that ran are cut off below.
    min_block_m = min(c.block_m for c in SEARCHED) if config is None else config.block_m
    launch = kernel_arguments(x, weight, bias, out_size, stride, padding, dilation, input_mean, input_scale,
                              input_shift, residual, residual_stride, residual_channel_offset, relu, stats,
                              triton.cdiv(rows, min_block_m))
    launched_block_m = []

    def grid(meta):
        # The search evaluates the grid of each configuration it times and, last, of the one it launches: the
        # launch itself says which BLOCK_M tiled the statistics, where the autotuner's best_config (shared by
        # every thread) might already hold another launch's choice.
        launched_block_m.append(meta["BLOCK_M"])
        return (triton.cdiv(rows, meta["BLOCK_M"]), groups * triton.cdiv(out_per_group, meta["BLOCK_N"]))

    with launch_guard(x):
        if config is None:
            _conv_kernel_autotuned[grid](*launch.args, **launch.flags)
        else:
            _conv_kernel[grid](*launch.args, **launch.flags, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                               BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages)
    if not stats:
        return launch.y, None, None, None
    tiles = triton.cdiv(rows, launched_block_m[-1])
    return launch.y, launch.mean_partial[:tiles], launch.m2_partial[:tiles], launch.count_partial[:tiles]


def conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    *,
    input_mean: Tensor | None = None,
    input_scale: Tensor | None = None,
    input_shift: Tensor | None = None,
    residual: Tensor | None = None,
    residual_stride: int = 1,
    residual_channel_offset: int = 0,
    relu: bool = False,
    stats: bool = False,
    config: ConvConfig | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """F.conv2d(p(x), weight, bias, stride, padding, dilation, groups) (+ R), then ReLU if `relu`, where
    p(x) = relu((x - input_mean) * input_scale + input_shift) per input channel when those are given (else x) and
    R is `residual` (the output's shape) or, with residual_stride/residual_channel_offset, option A's shortcut
    R[n, c, h, w] = residual[n, c - residual_channel_offset, h*residual_stride, w*residual_stride] (0 outside
    residual's channels). The zero padding pads p(x).

    x: [N, Cin, H, W] float32/float16/bfloat16, NCHW or channels_last (the output follows); weight:
    [Cout, Cin/groups, KH, KW] in x's dtype; bias: [Cout] float32 or x's dtype; input_mean, input_scale,
    input_shift: [Cin] float32, all three or none. With `stats`, returns (y, mean, var): the per-channel mean and
    biased variance (float32) of y as stored. `config` forces a launch configuration (one of SEARCHED's, or
    INTERPRETER_CONFIG) instead of the heuristic's or the search's. Forward only: no autograd graph is recorded.

    The arguments are trusted: this is the body of the registered op fused_resnet_triton::conv2d, which the Triton
    kernel set calls with what fused_resnet.ops has checked. Only what the kernel has no version for is refused: a
    device it cannot run on, and float64, which it would silently accumulate in fp32.
    """
    check_launch_device(_OP, x)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{_OP}: the Triton convolution runs float32, float16 and bfloat16 (its tensor-core GEMM has "
                        f"no fp64); got x as a {describe(x)}. Use the cpu or torch backend for float64")
    out_size = conv_output_size(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    # The kernel indexes per-channel vectors by channel; activations and the weight it reads through their strides.
    bias, input_mean, input_scale, input_shift = (None if t is None else t.contiguous()
                                                  for t in (bias, input_mean, input_scale, input_shift))
    y, mean_partial, m2_partial, count_partial = _launch(
        x, weight, bias, out_size, stride, padding, dilation, groups, input_mean, input_scale, input_shift, residual,
        residual_stride, residual_channel_offset, relu, stats, config)
    if not stats:
        return y
    mean, var = merge_partial_stats(mean_partial, m2_partial, count_partial)
    return y, mean.float(), var.float()
