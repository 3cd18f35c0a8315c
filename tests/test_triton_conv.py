"""fused_resnet.triton.conv2d against F.conv2d in float64: geometry, layouts, dtypes, the BN-ReLU prologue, the
bias/residual/ReLU epilogue, the BN statistics, every shipped launch configuration, the search, and the refusal of a
device or dtype the kernel has no version for (the launcher trusts its other arguments: fused_resnet.ops checks
them, tests/test_errors.py tests that).

Runs on CUDA tensors where a GPU is visible (compiled), else on CPU tensors under the Triton interpreter, which
tests/conftest.py turns on (TRITON_INTERPRET=1) before any kernel is defined."""

import os
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

pytest.importorskip("triton", reason="the Triton backend needs the triton package")

from conftest import TRITON_ON_CPU, assert_rel, rel_err, to_layout  # noqa: E402
from fused_resnet.triton import conv as triton_conv  # noqa: E402
from fused_resnet.triton.conv import (  # noqa: E402
    CONFIGS,
    INTERPRETER_CONFIG,
    NCHW_CONFIGS,
    SEARCHED,
    ConvConfig,
    conv2d,
)

DEVICES = ["cpu"] if TRITON_ON_CPU else ["cuda"]
LOW_PRECISION = [torch.float16, torch.bfloat16]


class Geometry:
    """A convolution problem: input [batch, cin, h, w], a k x k kernel to cout channels."""

    def __init__(self, batch, cin, h, w, cout, k, stride=1, padding=0, dilation=1, groups=1):
        self.batch, self.cin, self.h, self.w, self.cout, self.k = batch, cin, h, w, cout, k
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def __repr__(self):
        return (f"n{self.batch}c{self.cin}x{self.h}x{self.w}-k{self.k}o{self.cout}s{self.stride}p{self.padding}"
                f"d{self.dilation}g{self.groups}")

    def conv_args(self):
        """conv2d's geometry arguments, as the registered op hands them: pairs."""
        return dict(stride=(self.stride,) * 2, padding=(self.padding,) * 2, dilation=(self.dilation,) * 2,
                    groups=self.groups)

    def out_size(self):
        def size(n):
            return (n + 2 * self.padding - self.dilation * (self.k - 1) - 1) // self.stride + 1
        return size(self.h), size(self.w)


GEOMETRIES = [
    Geometry(2, 13, 7, 9, 16, 1),                               # 1x1, odd Cin, odd H/W
    Geometry(2, 8, 9, 9, 16, 1, stride=2),                      # option B's projection shortcut
    Geometry(2, 16, 9, 9, 13, 3, padding=1),                    # 3x3, odd Cout
    Geometry(1, 8, 9, 7, 16, 3, stride=2, padding=1),           # 3x3 stride 2, N=1
    Geometry(1, 3, 9, 9, 8, 7, stride=2, padding=3),            # the stem: 7x7 stride 2, 3 channels
    Geometry(2, 8, 9, 9, 8, 3, padding=2, dilation=2),          # dilation 2
    Geometry(2, 8, 7, 7, 12, 3, padding=1, groups=2),           # groups 2
    Geometry(1, 16, 7, 9, 16, 3, stride=2, padding=1, groups=4),  # groups 4, 4 channels a group
]
GEOMETRY_3X3_S2 = GEOMETRIES[3]
GEOMETRY_1X1 = GEOMETRIES[0]


def tolerance(dtype, device):
    """Relative error allowed against float64. The interpreter multiplies fp32 exactly in numpy; on a GPU fp32
    runs on TF32 tensor cores by default (10-bit mantissa). 16-bit formats round the output (and the prologue's
    normalized input) to 11 or 8 significant bits: PyTorch's own fp16/bf16 conv of the same data measures about
    3.5e-4 and 2.5e-3 here. The interpreter converts fp32 to bf16 by truncation, not to nearest, which doubles
    bf16's error (5e-3 at worst over these shapes), hence the bf16 bound is about 2x that."""
    if dtype == torch.float16:
        return 1e-3
    if dtype == torch.bfloat16:
        return 1.2e-2
    if device == "cuda" and torch.backends.cudnn.allow_tf32:
        return 2e-3
    return 2e-5


def make_inputs(g, dtype, device, channels_last):
    x = to_layout(torch.randn(g.batch, g.cin, g.h, g.w, dtype=dtype, device=device), channels_last)
    weight = torch.randn(g.cout, g.cin // g.groups, g.k, g.k, dtype=dtype, device=device)
    weight = (weight / (g.cin // g.groups * g.k * g.k) ** 0.5).to(dtype)
    return x, weight


class Prologue(NamedTuple):
    """A BN the prologue applies to the convolution's input: relu((x - mean) * scale + shift) per channel."""

    mean: Tensor
    scale: Tensor
    shift: Tensor

    def conv_args(self) -> dict:
        return dict(input_mean=self.mean, input_scale=self.scale, input_shift=self.shift)

    def apply(self, x64: Tensor) -> Tensor:
        """On a float64 CPU tensor."""
        mean, scale, shift = (v.double().cpu()[:, None, None] for v in self)
        return torch.relu((x64 - mean) * scale + shift)


def make_prologue(cin, device):
    """A BN's mean, scale and shift with both signs, so the ReLU zeroes a good part of the normalized input."""
    mean = torch.randn(cin, device=device) * 0.5
    scale = torch.randn(cin, device=device) + 0.2
    shift = torch.randn(cin, device=device) * 0.5
    return Prologue(mean, scale, shift)


def reference(x, weight, g, bias=None, prologue=None, residual=None, residual_stride=1, offset=0, relu=False):
    """The unfused computation in float64 on the CPU: conv(relu((x - mean)*scale + shift)) + bias + R, then ReLU."""
    x64 = x.double().cpu()
    if prologue is not None:
        x64 = prologue.apply(x64)
    bias64 = bias.double().cpu() if bias is not None else None
    y = F.conv2d(x64, weight.double().cpu(), bias64, **g.conv_args())
    if residual is not None:
        r = residual.double().cpu()[:, :, ::residual_stride, ::residual_stride]
        y[:, offset:offset + r.shape[1]] += r
    return torch.relu(y) if relu else y


def check_output(y, expected, x, tol, what):
    assert y.dtype == x.dtype and y.device == x.device, f"{what}: {y.dtype} on {y.device}"
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=layout), f"{what}: output strides {y.stride()} do not follow x's layout"
    assert torch.isfinite(y).all(), f"{what}: non-finite values"
    assert_rel(y.cpu(), expected, tol, what)


def check_stats(y, mean, var, what):
    """The statistics are those of y as returned (rounded to its dtype), in fp32: compare in float64."""
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    assert torch.isfinite(mean).all() and torch.isfinite(var).all(), f"{what}: non-finite statistics"
    ref_var, ref_mean = torch.var_mean(y.double().cpu(), dim=(0, 2, 3), unbiased=False)
    assert_rel(mean.cpu(), ref_mean, 1e-5, f"{what} mean", floor=1e-3)
    assert_rel(var.cpu(), ref_var, 1e-5, f"{what} var")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("g", GEOMETRIES, ids=repr)
def test_conv_matches_float64(g, channels_last, device):
    x, weight = make_inputs(g, torch.float32, device, channels_last)
    y = conv2d(x, weight, None, **g.conv_args())
    check_output(y, reference(x, weight, g), x, tolerance(torch.float32, device), repr(g))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("g", [GEOMETRY_1X1, GEOMETRY_3X3_S2, GEOMETRIES[7]], ids=repr)
def test_conv_low_precision(g, channels_last, dtype, device):
    x, weight = make_inputs(g, dtype, device, channels_last)
    bias = torch.randn(g.cout, device=device)
    y = conv2d(x, weight, bias, **g.conv_args())
    check_output(y, reference(x, weight, g, bias), x, tolerance(dtype, device), f"{g} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("g", [GEOMETRY_3X3_S2, GEOMETRIES[7]], ids=repr)
def test_weight_in_any_layout(g, device):
    """Weights are read through their strides: output channels innermost (the coalesced layout a caller may
    cache) and channels_last weights give the same convolution."""
    x, weight = make_inputs(g, torch.float32, device, True)
    expected = reference(x, weight, g)
    for layout in (weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1),
                   weight.contiguous(memory_format=torch.channels_last)):
        check_output(conv2d(x, layout, **g.conv_args()), expected, x, tolerance(torch.float32, device),
                     f"weight strides {layout.stride()}")


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_ieee_when_tf32_is_off(device, monkeypatch):
    """allow_tf32 False: full fp32 products (on a GPU TF32 would miss this tolerance by about 100x)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    g = GEOMETRY_3X3_S2
    x, weight = make_inputs(g, torch.float32, device, False)
    y = conv2d(x, weight, **g.conv_args())
    check_output(y, reference(x, weight, g), x, 2e-5, "ieee")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("g", [GEOMETRIES[2], GEOMETRY_3X3_S2, GEOMETRIES[5], GEOMETRIES[6]], ids=repr)
def test_prologue(g, channels_last, dtype, device):
    x, weight = make_inputs(g, dtype, device, channels_last)
    prologue = make_prologue(g.cin, device)
    y = conv2d(x, weight, **prologue.conv_args(), **g.conv_args())
    check_output(y, reference(x, weight, g, prologue=prologue), x, tolerance(dtype, device), f"{g} prologue")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_prologue_keeps_the_padding_zero(channels_last, device):
    """conv(relu(bn(y))) pads the normalized activation with zeros: a kernel that normalized the padded zeros
    too would add relu(-mean * scale + shift) > 0 around the border. With negative means and positive scales and
    shifts the two differ, and the test says so."""
    g = Geometry(2, 8, 7, 9, 16, 3, stride=2, padding=2)
    x, weight = make_inputs(g, torch.float32, device, channels_last)
    mean = -torch.rand(g.cin, device=device) - 0.5
    scale = torch.rand(g.cin, device=device) + 0.5
    shift = torch.rand(g.cin, device=device) + 0.5
    prologue = Prologue(mean, scale, shift)
    y = conv2d(x, weight, **prologue.conv_args(), **g.conv_args())
    expected = reference(x, weight, g, prologue=prologue)

    padded_then_normalized = prologue.apply(F.pad(x.double().cpu(), [g.padding] * 4))
    wrong = F.conv2d(padded_then_normalized, weight.double().cpu(), stride=g.stride)
    border = torch.ones_like(expected, dtype=torch.bool)
    border[:, :, 1:-1, 1:-1] = False
    assert rel_err(wrong[border], expected[border]) > 0.05, "the border test cannot tell the two paddings apart"
    check_output(y, expected, x, tolerance(torch.float32, device), "prologue border")
    assert_rel(y.cpu()[border], expected[border], tolerance(torch.float32, device), "prologue border pixels")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("fusion", ["prologue", "epilogue"])
def test_relu_keeps_nan(fusion, channels_last, device):
    """A NaN activation stays NaN through the fused ReLUs, as through torch.relu (and the cpu and cuda backends):
    tl.maximum(v, 0) would return 0 for it. A 1x1 convolution carries the NaN pixel to every output channel."""
    g = GEOMETRY_1X1
    x, weight = make_inputs(g, torch.float32, device, channels_last)
    x[1, 3, 2, 4] = float("nan")
    if fusion == "prologue":
        prologue = make_prologue(g.cin, device)
        y = conv2d(x, weight, **prologue.conv_args(), **g.conv_args())
        expected = reference(x, weight, g, prologue=prologue)
    else:
        y = conv2d(x, weight, relu=True, **g.conv_args())
        expected = reference(x, weight, g, relu=True)
    nan = torch.isnan(expected)
    assert nan[1, :, 2, 4].all() and nan.sum() == g.cout, "the reference carries the NaN to one pixel's channels"
    assert torch.equal(torch.isnan(y.cpu()), nan), f"{fusion}: NaN positions differ from torch's"
    assert_rel(y.cpu()[~nan], expected[~nan], tolerance(torch.float32, device), f"{fusion}: the other values")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("g", [GEOMETRY_1X1, GEOMETRIES[2], GEOMETRIES[7]], ids=repr)
def test_epilogue_bias_residual_relu(g, channels_last, dtype, device):
    """Inference: BN folded into weight and bias, + the block's identity, ReLU; the residual in the other layout."""
    x, weight = make_inputs(g, dtype, device, channels_last)
    bias = torch.randn(g.cout, device=device)
    residual = to_layout(torch.randn(g.batch, g.cout, *g.out_size(), dtype=dtype, device=device), not channels_last)
    y = conv2d(x, weight, bias, residual=residual, relu=True, **g.conv_args())
    expected = reference(x, weight, g, bias, residual=residual, relu=True)
    assert (expected == 0).any() and (expected > 0).any(), "the ReLU must bite"
    check_output(y, expected, x, tolerance(dtype, device), f"{g} epilogue")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("offset", [0, 3, 8])
def test_epilogue_option_a_shortcut(offset, channels_last, device):
    """Option A: the block input (8 channels, 9x9) subsampled by 2 and zero-padded to 16 channels, read in place."""
    g = Geometry(2, 8, 9, 9, 16, 3, stride=2, padding=1)
    x, weight = make_inputs(g, torch.float32, device, channels_last)
    shortcut = to_layout(torch.randn(2, 8, 9, 9, device=device), channels_last)
    y = conv2d(x, weight, residual=shortcut, residual_stride=2, residual_channel_offset=offset, relu=True,
               **g.conv_args())
    expected = reference(x, weight, g, residual=shortcut, residual_stride=2, offset=offset, relu=True)
    check_output(y, expected, x, tolerance(torch.float32, device), f"option A at offset {offset}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("relu", [False, True], ids=["raw", "relu"])
@pytest.mark.parametrize("g", [GEOMETRY_1X1, GEOMETRIES[4], GEOMETRIES[6]], ids=repr)
def test_stats(g, relu, channels_last, dtype, device):
    """Training: the raw output (or, for the check, a ReLU'd one) and its per-channel mean and biased variance.
    A mean offset of 20 against a spread near 1 catches a naive sum of squares in fp32."""
    x, weight = make_inputs(g, dtype, device, channels_last)
    bias = torch.randn(g.cout, device=device) + 20.0
    y, mean, var = conv2d(x, weight, bias, relu=relu, stats=True, **g.conv_args())
    check_output(y, reference(x, weight, g, bias, relu=relu), x, tolerance(dtype, device), f"{g} stats output")
    check_stats(y, mean, var, f"{g} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
def test_everything_fused(device):
    """Prologue, bias, option A residual, ReLU and statistics in one launch, on groups and odd channels."""
    g = Geometry(2, 6, 9, 9, 14, 3, stride=2, padding=1, groups=2)
    x, weight = make_inputs(g, torch.float32, device, True)
    prologue = make_prologue(g.cin, device)
    bias = torch.randn(g.cout, device=device)
    shortcut = torch.randn(2, 5, 9, 9, device=device)
    y, mean, var = conv2d(x, weight, bias, **prologue.conv_args(), residual=shortcut, residual_stride=2,
                          residual_channel_offset=4, relu=True, stats=True, **g.conv_args())
    expected = reference(x, weight, g, bias, prologue, shortcut, 2, 4, relu=True)
    check_output(y, expected, x, tolerance(torch.float32, device), "all fusions")
    check_stats(y, mean, var, "all fusions")


def _every_config():
    return {**{f"m{c.block_m}n{c.block_n}k{c.block_k}w{c.num_warps}s{c.num_stages}": c for c in SEARCHED},
            "interpreter": INTERPRETER_CONFIG}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("g", [GEOMETRY_3X3_S2, Geometry(2, 13, 9, 9, 24, 1)], ids=repr)
@pytest.mark.parametrize("config", list(_every_config().values()), ids=list(_every_config()))
def test_every_shipped_config(config, g, device):
    """Each configuration that can be launched (CONFIGS', NCHW_CONFIGS' and the interpreter's), on a 3x3 stride-2
    padded problem and a 1x1 one (162 rows: more than one row tile for every BLOCK_M), with every fusion on, so that
    each tile size's masks are exercised."""
    x, weight = make_inputs(g, torch.float32, device, False)
    prologue = make_prologue(g.cin, device)
    bias = torch.randn(g.cout, device=device)
    residual = torch.randn(g.batch, g.cout, *g.out_size(), device=device)
    y, mean, var = conv2d(x, weight, bias, **prologue.conv_args(), residual=residual, relu=True, stats=True,
                          config=config, **g.conv_args())
    expected = reference(x, weight, g, bias, prologue, residual, relu=True)
    check_output(y, expected, x, tolerance(torch.float32, device), f"{config}")
    check_stats(y, mean, var, f"{config}")


def test_config_heuristic(monkeypatch):
    """Off the interpreter the heuristic picks a shipped config of the input's layout fitted to the group's
    channels."""
    monkeypatch.setattr(triton_conv, "interpreted", lambda: False)
    for channels_last, table in ((True, CONFIGS), (False, NCHW_CONFIGS)):
        widest = max(n for n, _ in table)
        for cout_g, cin_g in [(4, 4), (64, 3), (64, 64), (256, 64), (512, 2048), (32, 32), (128, 128), (24, 13)]:
            config = triton_conv.choose_config(cout_g, cin_g, channels_last)
            assert config in table.values()
            assert config.block_n >= min(cout_g, widest)
            assert config.block_n < 2 * max(cout_g, 16)
            assert config.block_k < 2 * max(cin_g, 16)
        assert triton_conv.choose_config(4, 4, channels_last).block_n == 16
        assert triton_conv.choose_config(256, 256, channels_last) == table[max(table)]
    assert triton_conv.choose_config(256, 256, True) == ConvConfig(64, 128, 32, 4, 4)
    assert triton_conv.choose_config(256, 256, False) == ConvConfig(32, 64, 16, 4, 3)


@pytest.fixture
def search(monkeypatch):
    """FUSED_RESNET_TRITON_AUTOTUNE=1 with an empty tuning cache and a timer under which the configurations in
    `search.favored` (ConvConfigs) time fastest; the timer still runs each, as the real one does. Also records the
    configuration of every run of the kernel, timed or launched, in `search.runs`."""
    monkeypatch.setenv(triton_conv.AUTOTUNE_ENV_VAR, "1")
    autotuner = triton_conv._conv_kernel_autotuned
    monkeypatch.setattr(autotuner, "cache", {})

    def timer(kernel_call, quantiles):
        kernel_call()
        return [0.0 if timer.runs[-1] in timer.favored else 1.0] * len(quantiles)

    # The interpreter hands the hooks only the kernel's own arguments: the tile sizes tell the configurations apart.
    by_tiles = {(c.block_m, c.block_n, c.block_k): c for c in SEARCHED}
    assert len(by_tiles) == len(SEARCHED)

    def record(*args, BLOCK_M, BLOCK_N, BLOCK_K, **kwargs):
        timer.runs.append(by_tiles[BLOCK_M, BLOCK_N, BLOCK_K])
        for hook in timer.hooks:
            hook()

    timer.favored, timer.runs, timer.hooks = set(), [], []
    monkeypatch.setattr(autotuner, "do_bench", timer)
    monkeypatch.setattr(triton_conv._conv_kernel, "pre_run_hooks", [record])
    return timer


def _stats_problem(device, channels_last):
    """A 1x1 convolution of 162 output rows: 6 row tiles of 32, 3 of 64, 2 of 128, so the merge depends on which
    configuration ran."""
    g = Geometry(2, 5, 9, 9, 12, 1)
    x, weight = make_inputs(g, torch.float32, device, channels_last)
    bias = torch.randn(g.cout, device=device) + 3.0
    return g, x, weight, bias


def _check_stats_run(g, x, weight, bias, what):
    y, mean, var = conv2d(x, weight, bias, stats=True, **g.conv_args())
    check_output(y, reference(x, weight, g, bias), x, tolerance(torch.float32, x.device.type), what)
    check_stats(y, mean, var, what)


def _tuned():
    return [ConvConfig(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
            for c in triton_conv._conv_kernel_autotuned.cache.values()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("winner", list(SEARCHED), ids=list(_every_config())[:-1])
def test_autotune_statistics_whichever_config_wins(winner, search, device):
    """FUSED_RESNET_TRITON_AUTOTUNE=1: the search over the layout's configurations, then the statistics merged over
    the tiles of the one it launched, whichever it is (BLOCK_M 32, 64 or 128: 6, 3 or 2 row tiles here)."""
    search.favored = {winner}
    g, x, weight, bias = _stats_problem(device, winner in CONFIGS.values())
    _check_stats_run(g, x, weight, bias, f"autotuned to {winner}")
    assert _tuned() == [winner] and search.runs[-1] == winner


@pytest.mark.parametrize("device", DEVICES)
def test_autotune_keys_on_the_layout(search, device):
    """NCHW and channels_last inputs of one shape are searched separately, each among its layout's configurations:
    they load differently, and one layout's winner need not be (or even be fit to run as) the other's. Each gets
    its own entry, and its own statistics right."""
    nchw_winner, channels_last_winner = NCHW_CONFIGS[(64, 16)], CONFIGS[(64, 32)]
    search.favored = {nchw_winner, channels_last_winner}
    g, x, weight, bias = _stats_problem(device, False)
    _check_stats_run(g, x, weight, bias, "autotuned NCHW")
    assert set(search.runs) == {*NCHW_CONFIGS.values()}, "an NCHW search tried channels_last tiles"
    x_last, weight_last = (t.contiguous(memory_format=torch.channels_last) for t in (x, weight))
    _check_stats_run(g, x_last, weight_last, bias, "autotuned channels_last")
    assert _tuned() == [nchw_winner, channels_last_winner], "one tuning entry for two layouts"


@pytest.mark.parametrize("device", DEVICES)
def test_autotune_statistics_follow_their_own_launch(search, device):
    """The launch, not the autotuner's best_config (one attribute for every thread), says which BLOCK_M tiled the
    statistics: here another search (standing in for another thread's) runs while the launch is in flight and
    picks BLOCK_M 128 where this one picked 32; this launch's statistics must still merge its own 6 tiles."""
    mine, theirs = NCHW_CONFIGS[(64, 16)], CONFIGS[(64, 32)]
    assert (mine.block_m, theirs.block_m) == (32, 128)
    search.favored = {mine, theirs}
    g, x, weight, bias = _stats_problem(device, False)
    other = Geometry(1, 4, 6, 6, 8, 1)
    other_x, other_weight = make_inputs(other, torch.float32, device, True)

    def another_search_during_the_launch():
        # The NCHW search times each of its configurations once, then launches: its launch is the next run.
        if len(search.runs) == len(NCHW_CONFIGS) + 1:
            conv2d(other_x, other_weight, stats=True)

    search.hooks.append(another_search_during_the_launch)
    _check_stats_run(g, x, weight, bias, "launch with another search in flight")
    assert search.runs[len(NCHW_CONFIGS)] == mine and search.runs[-1] == theirs
    assert triton_conv._conv_kernel_autotuned.best_config.kwargs["BLOCK_M"] == 128


def test_statistics_are_deterministic():
    g = GEOMETRY_1X1
    x, weight = make_inputs(g, torch.float32, "cpu", False)
    first = conv2d(x, weight, stats=True, **g.conv_args())
    second = conv2d(x, weight, stats=True, **g.conv_args())
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_import_needs_no_gpu_and_cpu_tensors_need_the_interpreter():
    """Without the interpreter the module still imports (no GPU needed), and a CPU tensor is a clear error."""
    script = ("import torch\n"
              "from fused_resnet.triton.conv import conv2d\n"
              "try:\n"
              "    conv2d(torch.randn(1, 2, 3, 3), torch.randn(2, 2, 1, 1))\n"
              "except RuntimeError as e:\n"
              "    print(e)\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "run on CUDA tensors" in done.stdout and "TRITON_INTERPRET=1" in done.stdout, done.stdout


def _good_args():
    return torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)


def test_float64_is_refused():
    """The kernel accumulates in fp32 and has no fp64 GEMM: float64 would lose its precision silently."""
    x, weight = _good_args()
    with pytest.raises(TypeError, match=r"fused_resnet.triton.conv2d: the Triton convolution runs float32, float16 "
                                        r"and bfloat16 .* got x as a torch.float64 tensor"):
        conv2d(x.double(), weight.double(), padding=(1, 1))


def test_a_device_the_kernels_cannot_run_on_is_refused():
    x, weight = _good_args()
    with pytest.raises(RuntimeError, match=r"fused_resnet.triton.conv2d: the Triton kernels run on CUDA tensors"):
        conv2d(x.to("meta"), weight.to("meta"), padding=(1, 1))


def test_good_args_run():
    """The baseline of the refusals above runs, so each error comes from the one thing changed."""
    x, weight = _good_args()
    y = conv2d(x, weight, padding=(1, 1))
    assert_rel(y, F.conv2d(x.double(), weight.double(), padding=1), 2e-5, "baseline")
