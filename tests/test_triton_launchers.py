"""What only the Triton kernel set has (fused_resnet/triton/bn.py, stats.py): its launchers' tiling, taken down every
path on small tensors; the launch geometry at ResNet-50's sizes; the device every launch runs on; the merge of
per-tile statistics on its own; and every kernel variant compiled for an H100. The ops themselves are tested with
the other kernel sets (tests/test_kernel_sets.py, tests/test_kernel_set_robustness.py).

Without a GPU the kernels run under Triton's interpreter on CPU tensors (tests/conftest.py switches it on before
anything defines a kernel); with one they run compiled, on CUDA tensors.
"""

from __future__ import annotations

import contextlib
import math
import textwrap
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed: the Triton kernels cannot run")

import primitives  # noqa: E402
import sm90  # noqa: E402
from fused_resnet.triton import bn, conv, stats  # noqa: E402
from triton.runtime.jit import KernelInterface  # noqa: E402
from kernel_cases import (  # noqa: E402
    activation,
    assert_close,
    channel_vectors,
    gradient_clear_of_relu_threshold,
    kernel_set_params,
    kernels,  # noqa: F401 (a fixture)
    poisoned_outputs,  # noqa: F401 (a fixture)
)

pytestmark = pytest.mark.usefixtures("poisoned_outputs")
on_triton = pytest.mark.parametrize("kernels", kernel_set_params(["triton"]), indirect=True)


# ---------------------------------------------------------------------------------------------------------------
# Tiling: the block and tile geometry of small tensors is one block; shrinking the size constants makes small
# tensors take every path big ones do (several row blocks folded into a tile, several tiles, several channel
# blocks, pixel blocks that split a plane, several merge chunks and programs, several elementwise programs per axis).


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(bn, "REDUCE_BLOCK", 64)
    monkeypatch.setattr(bn, "REDUCE_BLOCK_C", 4)
    monkeypatch.setattr(bn, "TARGET_PROGRAMS", 2)
    monkeypatch.setattr(bn, "MAX_BLOCKS_PER_TILE", 4)
    monkeypatch.setattr(bn, "ELEMENTWISE_BLOCK", 32)
    monkeypatch.setattr(bn, "ELEMENTWISE_BLOCK_C", 8)
    monkeypatch.setattr(bn, "SUM_BLOCK_COLUMNS", 8)
    monkeypatch.setattr(bn, "SUM_BLOCK_T", 2)
    monkeypatch.setattr(stats, "MAX_BLOCK_C", 8)
    monkeypatch.setattr(stats, "MAX_BLOCK_T", 2)
    monkeypatch.setattr(stats, "MAX_ONE_LEVEL_BLOCKS", 1)
    monkeypatch.setattr(stats, "MERGE_TARGET_PROGRAMS", 4)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@on_triton
def test_every_tiling_path_on_small_blocks(kernels, small_blocks, channels_last):
    shape = (3, 13, 9, 11)
    C = shape[1]
    fp32 = torch.float32
    x = activation(kernels, shape, fp32, channels_last, mean=5.0, std=3.0)
    probe = bn._input("test", x)
    if channels_last:
        tiles = bn.RowTiles.of(probe)
        assert tiles.blocks_per_tile == 4 and tiles.count > 2 and tiles.channel_blocks > 1, tiles
        assert probe.rows % (tiles.block_r * tiles.blocks_per_tile) != 0, "the last tile should be a partial one"
    else:
        tiles = bn.PlaneTiles.of(probe)
        assert tiles.hw_blocks > 1 and tiles.count > 2, tiles
    blocks = bn.ElementwiseBlocks.of(probe)
    assert min(blocks.grid) > 1, blocks

    ops = kernels.ops
    for got, exact, name in zip(ops.batch_stats(x), primitives.batch_stats(x), ["mean", "var"]):
        assert_close(got, exact, fp32, "reduction", name)

    g, x2 = activation(kernels, shape, fp32, channels_last), activation(kernels, shape, fp32, channels_last)
    out = activation(kernels, shape, fp32, channels_last).relu_()
    mean, mean2 = channel_vectors(kernels, 2, C, fp32)
    sums = ops.bn_act_backward_reduce(g, out, x, mean, x2, mean2)
    for got, exact, name in zip(sums, primitives.backward_reduce(g, out, x, mean, x2, mean2), ["dy", "xmu", "xmu2"]):
        assert_close(got, exact, fp32, "reduction", f"sum_{name}")

    scale, shift = channel_vectors(kernels, 2, C, fp32)
    res = activation(kernels, (3, 6, 17, 22), fp32, channels_last)
    y = ops.bn_act(x, mean, scale, shift, res, None, None, None, True, 2, 4)
    padded = primitives.zero_pad_identity(res, C, 2, 4)
    assert_close(y, primitives.bn_act(x, mean, scale, shift, padded), fp32, "elementwise", "bn_act")

    coefs, coefs2 = channel_vectors(kernels, 3, C, fp32), channel_vectors(kernels, 3, C, fp32)
    grad_x, grad_x2 = ops.bn_act_backward_elemt(g, out, x, mean, *coefs, x2, mean2, *coefs2, False)
    exact_x, exact_x2 = primitives.backward_elemt(g, out, x, mean, coefs, x2, mean2, coefs2)
    assert_close(grad_x, exact_x, fp32, "elementwise", "grad_input")
    assert_close(grad_x2, exact_x2, fp32, "elementwise", "grad_input2")

    # The mask from the input, on the same tiles and blocks.
    gradient_clear_of_relu_threshold(g, x, mean, scale, shift)
    sums = ops.bn_act_backward_reduce(g, None, x, mean, None, None, scale, shift)
    exact_sums = primitives.backward_reduce(g, None, x, mean, mask_scale=scale, mask_shift=shift)
    for got, exact, name in zip(sums[:2], exact_sums[:2], ["dy", "xmu"]):
        assert_close(got, exact, fp32, "reduction", f"sum_{name} masked by the input")
    grad_x, _ = ops.bn_act_backward_elemt(g, None, x, mean, *coefs, None, None, None, None, None, False, scale, shift)
    exact_x, _ = primitives.backward_elemt(g, None, x, mean, coefs, mask_scale=scale, mask_shift=shift)
    assert_close(grad_x, exact_x, fp32, "elementwise", "grad_input masked by the input")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@on_triton
def test_reductions_are_bitwise_deterministic_on_small_blocks(kernels, small_blocks, channels_last):
    """Many tiles even under the interpreter: two runs, the same bits, and the same for the merge on its own."""
    x = activation(kernels, (4, 6, 10, 10), torch.float32, channels_last, mean=2.0)
    g = activation(kernels, (4, 6, 10, 10), torch.float32, channels_last)
    (mean,) = channel_vectors(kernels, 1, 6, torch.float32)
    ops = kernels.ops
    runs = [(*ops.batch_stats(x), *ops.bn_act_backward_reduce(g, x, x, mean, x, mean),
             *ops.bn_act_backward_reduce(g, None, x, mean, None, None, mean, mean)) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    counts = torch.randint(0, 9, (50,), device=kernels.device)
    partials = (torch.randn(50, 6, device=kernels.device) + 100, torch.rand(50, 6, device=kernels.device))
    merges = [stats.merge_partial_stats(*partials, counts) for _ in range(2)]
    for first, second in zip(*merges):
        assert torch.equal(first, second)


def test_geometry_fills_an_h100_at_resnet50_shapes_and_stays_small_for_tiny_tensors():
    """Tile and block choices (shape alone, no device needed): thousands of programs at batch 256, few for tiny."""
    def probe(shape, channels_last):
        return bn.Activation(torch.empty(0), channels_last, *shape)

    for shape in [(256, 256, 56, 56), (256, 64, 56, 56), (256, 512, 28, 28), (256, 2048, 7, 7)]:
        rows = bn.RowTiles.of(probe(shape, True))
        assert rows.count * rows.channel_blocks >= 132 * 4, (shape, rows)
        # The partial stays a small fraction of the input: each (tile, channel) summarizes many elements.
        assert shape[0] * shape[2] * shape[3] / rows.count >= 64, (shape, rows)
        planes = bn.PlaneTiles.of(probe(shape, False))
        assert planes.count * shape[1] >= 132 * 4, (shape, planes)
        for channels_last in (False, True):
            grid = bn.ElementwiseBlocks.of(probe(shape, channels_last)).grid
            assert grid[0] * grid[1] >= 132 * 4 and grid[1] < 65536, (shape, grid)
    for channels_last in (False, True):
        tiny = probe((2, 3, 5, 7), channels_last)
        assert bn.ElementwiseBlocks.of(tiny).grid == (1, 1)
        tiles = bn.RowTiles.of(tiny) if channels_last else bn.PlaneTiles.of(tiny)
        assert tiles.count == 1


# ---------------------------------------------------------------------------------------------------------------
# Launches, recorded: every kernel[grid](...) call, with its arguments by name and the launch guard it ran under.


class Launch(NamedTuple):
    kernel: str
    grid: tuple
    args: dict
    guard: torch.device | None  # the device of the innermost open stats.launch_guard; None outside any


class LaunchRecorder:
    def __init__(self):
        self.launches: list[Launch] = []
        self.open_guards: list[torch.device] = []
        self.run_kernels = True  # False: record the launch only (a geometry test of sizes the interpreter is slow at)

    def named(self, kernel: str) -> list[Launch]:
        return [launch for launch in self.launches if launch.kernel == kernel]


@pytest.fixture
def launches(monkeypatch):
    """Records every Triton launch, and replaces stats.launch_guard (where bn and stats look it up) by a recorder of
    the device it is opened for. The recorder switches no device: the test's tensors are all on one."""
    recorder = LaunchRecorder()

    @contextlib.contextmanager
    def recording_guard(t):
        recorder.open_guards.append(t.device)
        try:
            yield
        finally:
            recorder.open_guards.pop()

    # raising=False: a launcher module without the guard still runs, and the test then fails on what it recorded.
    for module in (bn, conv, stats):
        monkeypatch.setattr(module, "launch_guard", recording_guard, raising=False)
    launcher_of = KernelInterface.__getitem__

    def recording_launcher_of(kernel, grid):
        launch = launcher_of(kernel, grid)

        def record(*args, **kwargs):
            guard = recorder.open_guards[-1] if recorder.open_guards else None
            recorder.launches.append(Launch(kernel.__name__, grid, {**dict(zip(kernel.arg_names, args)), **kwargs},
                                            guard))
            return launch(*args, **kwargs) if recorder.run_kernels else None

        return record

    monkeypatch.setattr(KernelInterface, "__getitem__", recording_launcher_of)
    return recorder


def kernels_of(*modules) -> set[str]:
    """The names of the @triton.jit kernels (not the device functions) the modules define."""
    return {name for module in modules for name, value in vars(module).items()
            if isinstance(value, KernelInterface) and name.endswith("_kernel")}


@on_triton
def test_every_launch_runs_under_the_guard_of_its_tensors_device(kernels, small_blocks, launches):
    """Triton launches on the current CUDA device and its current stream, not on its arguments': a model on cuda:1
    without torch.cuda.set_device(1) would launch on cuda:0. Every launch of every launcher (batch_stats, the merge
    of partial statistics on its own, bn_act's residual variants, backward_reduce and its sum, backward_elemt's
    variants, the convolution with its prologue and statistics and with its epilogue, in both layouts) must run
    inside stats.launch_guard opened for the device of the tensors it reads. Without a GPU, as with one: the guard is
    replaced by a recorder of the device it is opened for, and every kernel[grid] launch is wrapped to record the
    innermost open guard and its tensor arguments' devices; together with the set of kernels launched, which must be
    every kernel bn.py, conv.py and stats.py define. What the guard
    does for a CUDA tensor is test_launch_guard_makes_a_cuda_tensors_device_current's."""
    fp32 = torch.float32
    shape, C = (2, 6, 5, 7), 6
    for channels_last in (False, True):
        x, g, x2, out = (activation(kernels, shape, fp32, channels_last) for _ in range(4))
        out.relu_()
        scale, shift, residual_scale, residual_shift, mean, mean2 = channel_vectors(kernels, 6, C, fp32)
        bn.batch_stats(x)
        bn.bn_act(x, mean, scale, shift, relu=False)
        bn.bn_act(x, None, scale, shift, x2)
        bn.bn_act(x, mean, scale, shift, x2, mean2, residual_scale, residual_shift)
        padded = activation(kernels, (2, 4, 10, 14), fp32, channels_last)
        bn.bn_act(x, mean, scale, shift, padded, residual_stride=2, residual_channel_offset=1)
        bn.bn_act_backward_reduce(g, None, x, mean)
        bn.bn_act_backward_reduce(g, out, x, mean, x2, mean2)
        bn.bn_act_backward_reduce(g, None, x, mean, mask_scale=scale, mask_shift=shift)
        coefs, coefs2 = channel_vectors(kernels, 3, C, fp32), channel_vectors(kernels, 3, C, fp32)
        bn.bn_act_backward_elemt(g, None, x, mean, *coefs)
        bn.bn_act_backward_elemt(g, None, x, mean, *coefs, mask_scale=scale, mask_shift=shift)
        bn.bn_act_backward_elemt(g, out, x, mean, *coefs, residual_grad=True)
        bn.bn_act_backward_elemt(g, out, x, mean, *coefs, x2, mean2, *coefs2)
        weight = torch.randn(C, C, 3, 3, device=kernels.device)
        conv.conv2d(x, weight, padding=(1, 1), input_mean=mean, input_scale=scale, input_shift=shift, stats=True)
        conv.conv2d(x, weight, shift, padding=(1, 1), residual=x2, relu=True)
    counts = torch.randint(1, 9, (20,), dtype=torch.int32, device=kernels.device)
    stats.merge_partial_stats(torch.randn(20, C, device=kernels.device), torch.rand(20, C, device=kernels.device),
                              counts)

    assert {launch.kernel for launch in launches.launches} == kernels_of(bn, conv, stats)
    for launch in launches.launches:
        devices = {value.device for value in launch.args.values() if isinstance(value, torch.Tensor)}
        assert launch.guard is not None, f"{launch.kernel} was launched outside any launch guard"
        assert devices == {launch.guard}, f"{launch.kernel}: tensors on {devices}, launched under {launch.guard}"


def test_launch_guard_makes_a_cuda_tensors_device_current():
    """For a CUDA tensor the guard is torch.cuda.device of the tensor's own device (checked on a stand-in for a
    tensor on cuda:1, as this needs no GPU until it is entered); for a CPU tensor a nullcontext, nothing to switch."""
    guard = stats.launch_guard(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1), get_device=lambda: 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(stats.launch_guard(torch.randn(3)), contextlib.nullcontext)


# ---------------------------------------------------------------------------------------------------------------
# merge_partial_stats on its own


def partials_of(values: torch.Tensor, counts: torch.Tensor):
    """Per-tile (mean, M2) in float64 of values [T, max count, C], tile t holding its first counts[t] rows."""
    rows = torch.arange(values.shape[1])[None, :, None] < counts[:, None, None]
    n = counts.double()[:, None]
    mean = torch.where(rows, values, 0).sum(1) / n
    m2 = torch.where(rows, (values - mean[:, None, :]) ** 2, 0).sum(1)
    return mean, m2


def exact_merge(mean_partial, m2_partial, counts):
    """The float64 merge of the given partials (the law of total variance), skipping empty tiles."""
    keep = counts > 0
    n = counts[keep].double()[:, None]
    mean_t, m2_t = mean_partial[keep].double(), m2_partial[keep].double()
    total = n.sum()
    mean = (n * mean_t).sum(0) / total
    return mean, (m2_t.sum(0) + (n * (mean_t - mean) ** 2).sum(0)) / total


@pytest.mark.parametrize("count_dtype", stats.COUNT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@on_triton
def test_merge_partial_stats_of_many_tiles_some_empty(kernels, count_dtype):
    T, C = 3001, 7
    counts = torch.randint(1, 40, (T,))
    counts[torch.randperm(T)[:100]] = 0
    values = torch.randn(T, 40, C, dtype=torch.float64) * 3 + torch.randn(C, dtype=torch.float64) * 10
    mean_t, m2_t = partials_of(values, counts)
    # Whatever an empty tile's producer left there (0/0) must not leak into the result.
    mean_t[counts == 0], m2_t[counts == 0] = float("nan"), float("inf")
    mean_partial, m2_partial = mean_t.float(), m2_t.float()
    device = kernels.device
    mean, var = stats.merge_partial_stats(mean_partial.to(device), m2_partial.to(device),
                                          counts.to(count_dtype).to(device))
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == (C,)
    ref_mean, ref_var = exact_merge(mean_partial, m2_partial, counts)
    # Only the final rounding to float32 is left: the merge itself adds nothing visible.
    torch.testing.assert_close(mean.cpu().double(), ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.cpu().double(), ref_var, rtol=1e-6, atol=0)
    # And the data's own statistics, through the float32 partials.
    keep = torch.arange(40)[None, :] < counts[:, None]
    data = values[keep]
    torch.testing.assert_close(var.cpu().double(), data.var(0, unbiased=False), rtol=1e-5, atol=0)


@on_triton
def test_merge_partial_stats_keeps_a_small_spread_under_a_large_mean(kernels):
    """Tiles of values 1e4 +- 1: the merge of their fp32 partials keeps the variance to 1e-5, where fp32 sums of x
    and x^2 over the same values lose it entirely."""
    T, per, C = 2000, 16, 3
    device = kernels.device
    values = (torch.randn(T, per, C, dtype=torch.float64) + 1e4).float().double()
    mean_t, m2_t = partials_of(values, torch.full((T,), per))
    mean, var = stats.merge_partial_stats(mean_t.float().to(device), m2_t.float().to(device),
                                          torch.full((T,), per, dtype=torch.int32, device=device))
    data = values.reshape(-1, C)
    ref_var = data.var(0, unbiased=False)
    torch.testing.assert_close(var.cpu().double(), ref_var, rtol=1e-5, atol=0)
    torch.testing.assert_close(mean.cpu().double(), data.mean(0), rtol=2e-7, atol=0)
    x = data.float()
    naive = (x * x).sum(0) / x.shape[0] - (x.sum(0) / x.shape[0]) ** 2
    assert ((naive.double() - ref_var).abs() / ref_var).max() > 0.1, "the naive formula should fail here"


@on_triton
def test_merge_partial_stats_in_float64(kernels):
    T, per, C = 300, 9, 4
    device = kernels.device
    values = torch.randn(T, per, C, dtype=torch.float64) * 0.1 + 1e6
    mean_t, m2_t = partials_of(values, torch.full((T,), per))
    mean, var = stats.merge_partial_stats(mean_t.to(device), m2_t.to(device),
                                          torch.full((T,), per, dtype=torch.int64, device=device))
    assert mean.dtype == var.dtype == torch.float64
    data = values.reshape(-1, C)
    torch.testing.assert_close(mean.cpu(), data.mean(0), rtol=1e-14, atol=0)
    # The float64 tile means carry ~1e-10 of rounding at 1e6, against a spread of 0.03 between them: ~1e-9 of the
    # variance comes from the partials themselves (a float32 merge would lose it all).
    torch.testing.assert_close(var.cpu(), data.var(0, unbiased=False), rtol=1e-8, atol=0)


@on_triton
def test_merge_partial_stats_without_any_element_is_nan(kernels):
    device = kernels.device
    mean, var = stats.merge_partial_stats(torch.randn(3, 2, device=device), torch.rand(3, 2, device=device),
                                          torch.zeros(3, dtype=torch.int32, device=device))
    assert mean.isnan().all() and var.isnan().all()


H100_SMS = 132


def test_merge_of_a_resnet_stems_tiles_fills_an_h100(launches):
    """The bf16 ResNet stem's convolution at batch 256 hands the merge 25,088 tiles of 64 channels, which one level
    merged with 2 programs of 392 sequential blocks of tiles each. Two levels: the first runs at least 2 programs
    per SM of an H100, and no program of either level walks more than 4 blocks. A merge of few tiles (layer4's
    convolution: 98 tiles of 2048 channels) stays one launch. Grids and arguments are recorded at the launch; the
    kernels are not run (25,088 tiles take the interpreter minutes)."""
    launches.run_kernels = False
    T, C = 25088, 64
    counts = torch.randint(1, 129, (T,), dtype=torch.int32)
    stats.merge_partial_stats(torch.randn(T, C, dtype=torch.float64), torch.rand(T, C, dtype=torch.float64), counts)
    assert [launch.kernel for launch in launches.launches] == ["_merge_chunks_kernel", "_merge_partial_stats_kernel"]
    first, second = launches.launches
    assert math.prod(first.grid) >= 2 * H100_SMS, first.grid
    assert first.args["chunk_tiles"] <= 4 * first.args["BLOCK_T"], first.args["chunk_tiles"]
    assert second.args["num_tiles"] <= 4 * second.args["BLOCK_T"], second.args["num_tiles"]

    launches.launches.clear()
    T, C = 98, 2048
    counts = torch.randint(1, 129, (T,), dtype=torch.int32)
    stats.merge_partial_stats(torch.randn(T, C), torch.rand(T, C), counts)
    assert [launch.kernel for launch in launches.launches] == ["_merge_partial_stats_kernel"]


@pytest.mark.parametrize("num_tiles", [48, 45], ids=["whole_chunks", "partial_last_chunk"])
@on_triton
def test_two_level_merge_is_repeatable_and_exact_across_chunk_boundaries(kernels, launches, monkeypatch, num_tiles):
    """The two-level merge on small blocks (chunks of 8 tiles, blocks of 4, 5 blocks of 8 channels) of float64
    partials: every chunk whole, or the last one cut short (and not a whole block either), with the second chunk
    all empty tiles and other empty tiles scattered (their NaN/inf partials must not leak). The result matches the
    float64 merge to rounding, where a tile lost or counted twice at a chunk's edge would move it by ~1e-2, and a
    second call gives the same bits."""
    monkeypatch.setattr(stats, "MAX_BLOCK_C", 8)
    monkeypatch.setattr(stats, "MAX_BLOCK_T", 4)
    monkeypatch.setattr(stats, "MAX_ONE_LEVEL_BLOCKS", 1)
    monkeypatch.setattr(stats, "MERGE_TARGET_PROGRAMS", 30)
    C, chunk_tiles, device = 37, 8, kernels.device
    counts = torch.randint(1, 30, (num_tiles,))
    counts[chunk_tiles:2 * chunk_tiles] = 0
    counts[torch.randperm(num_tiles)[:5]] = 0
    values = torch.randn(num_tiles, 30, C, dtype=torch.float64) * 2 + torch.randn(C, dtype=torch.float64) * 1e3
    mean_t, m2_t = partials_of(values, counts)
    mean_t[counts == 0], m2_t[counts == 0] = float("nan"), float("inf")
    args = (mean_t.to(device), m2_t.to(device), counts.to(torch.int32).to(device))
    mean, var = stats.merge_partial_stats(*args)

    first = launches.named("_merge_chunks_kernel")
    assert len(first) == 1 and first[0].args["chunk_tiles"] == chunk_tiles, first
    assert (num_tiles % chunk_tiles != 0) == (num_tiles == 45)
    ref_mean, ref_var = exact_merge(mean_t, m2_t, counts)
    torch.testing.assert_close(mean.cpu(), ref_mean, rtol=1e-13, atol=0)
    torch.testing.assert_close(var.cpu(), ref_var, rtol=1e-12, atol=0)
    again = stats.merge_partial_stats(*args)
    assert torch.equal(mean, again[0]) and torch.equal(var, again[1])


# ---------------------------------------------------------------------------------------------------------------
# The GPU build: the interpreter accepts programs the compiler rejects (and the reverse), so every kernel variant the
# launchers can pick is compiled for an H100 (sm_90) here, without a GPU, by Triton's own ptxas (tests/sm90.py),
# whose report must show no register spills and no stack frame.

COMPILE_FOR_SM90 = textwrap.dedent("""
    import triton.language as tl
    from fused_resnet.triton import bn, stats
    from sm90 import compile_signature_for_sm90

    ACTIVATIONS = {"x_ptr", "residual_ptr", "out_ptr", "g_ptr", "output_ptr", "x2_ptr", "grad_x_ptr", "grad_other_ptr"}

    def compile_for_sm90(kernel, num_warps, pointers=None, **constants):
        signature, constexprs = {}, {}
        for name in kernel.arg_names:
            if name in constants:
                signature[name], constexprs[name] = "constexpr", constants[name]
            elif name in (pointers or {}):
                signature[name] = pointers[name]
            elif name.endswith("_ptr"):
                signature[name] = ("*bf16" if name in ACTIVATIONS else "*i32" if name.startswith("count")
                                   else "*fp32")
            else:
                signature[name] = "i32"
        report = compile_signature_for_sm90(kernel, signature, constexprs, options=dict(num_warps=num_warps))
        assert not (report.spill_stores or report.spill_loads or report.stack_frame), \\
            f"{kernel.__name__} {constants}: {report}"

    SECOND_BN = ("x2_ptr", "mean2_ptr", "coef2_dy_ptr", "coef2_xmu_ptr", "coef2_const_ptr")
    NO_MASK_INPUT = dict(mask_scale_ptr=None, mask_shift_ptr=None)  # the backward kernels' vectors of MASK == 2
    # batch_stats and the convolution's epilogue hand float64 partials to the merge (float32 ones are accepted too);
    # its first level hands float64 partials and counts to its second.
    FP64_PARTIALS = {"mean_partial_ptr": "*fp64", "m2_partial_ptr": "*fp64"}
    CHUNKS = {"chunk_mean_ptr": "*fp64", "chunk_m2_ptr": "*fp64", "chunk_count_ptr": "*fp64"}
    compile_for_sm90(stats._merge_partial_stats_kernel, 4, BLOCK_T=64, BLOCK_C=32)
    compile_for_sm90(stats._merge_partial_stats_kernel, 4, FP64_PARTIALS, BLOCK_T=64, BLOCK_C=32)
    compile_for_sm90(stats._merge_partial_stats_kernel, 4, {**FP64_PARTIALS, "count_partial_ptr": "*fp64"},
                     BLOCK_T=64, BLOCK_C=32)
    compile_for_sm90(stats._merge_chunks_kernel, 4, CHUNKS, BLOCK_T=64, BLOCK_C=32)
    compile_for_sm90(stats._merge_chunks_kernel, 4, {**FP64_PARTIALS, **CHUNKS}, BLOCK_T=64, BLOCK_C=32)
    compile_for_sm90(bn._batch_stats_planes_kernel, 8, FP64_PARTIALS, ACC_DTYPE=tl.float32, BLOCK_N=1, BLOCK_HW=4096)
    compile_for_sm90(bn._batch_stats_rows_kernel, 8, FP64_PARTIALS, ACC_DTYPE=tl.float32, BLOCKS_PER_TILE=16,
                     BLOCK_R=64, BLOCK_C=64)
    compile_for_sm90(bn._sum_partials_kernel, 4, BLOCK_T=64, BLOCK_COLS=32)
    for kernel, blocks in ((bn._bn_act_planes_kernel, dict(BLOCK_P=1, BLOCK_HW=2048)),
                           (bn._bn_act_rows_kernel, dict(BLOCK_R=16, BLOCK_C=128))):
        for residual in range(4):
            unused = {name: None for name in (["residual_ptr"] if residual == 0 else [])
                      + (["residual_mean_ptr", "residual_scale_ptr", "residual_shift_ptr"] if residual != 2 else [])}
            compile_for_sm90(kernel, 4, RESIDUAL=residual, RELU=residual % 2 == 0, **unused, **blocks)
    for kernel, blocks in ((bn._backward_reduce_planes_kernel, dict(BLOCK_N=1, BLOCK_HW=4096)),
                           (bn._backward_reduce_rows_kernel, dict(BLOCKS_PER_TILE=16, BLOCK_R=64, BLOCK_C=64))):
        compile_for_sm90(kernel, 8, MASK=0, SECOND=False, output_ptr=None, x2_ptr=None, mean2_ptr=None, **NO_MASK_INPUT,
                         **blocks)
        compile_for_sm90(kernel, 8, MASK=1, SECOND=True, **NO_MASK_INPUT, **blocks)
        compile_for_sm90(kernel, 8, MASK=2, SECOND=True, output_ptr=None, **blocks)
    for kernel, blocks in ((bn._backward_elemt_planes_kernel, dict(BLOCK_P=1, BLOCK_HW=2048)),
                           (bn._backward_elemt_rows_kernel, dict(BLOCK_R=16, BLOCK_C=128))):
        compile_for_sm90(kernel, 4, MASK=0, OTHER=0, output_ptr=None, grad_other_ptr=None,
                         **dict.fromkeys(SECOND_BN), **NO_MASK_INPUT, **blocks)
        compile_for_sm90(kernel, 4, MASK=1, OTHER=1, **dict.fromkeys(SECOND_BN), **NO_MASK_INPUT, **blocks)
        compile_for_sm90(kernel, 4, MASK=1, OTHER=2, **NO_MASK_INPUT, **blocks)
        compile_for_sm90(kernel, 4, MASK=2, OTHER=2, output_ptr=None, **blocks)
    print("compiled")
""")


def test_every_kernel_variant_compiles_for_an_h100(tmp_path):
    if sm90.ptxas_path() is None:
        pytest.skip("Triton's CUDA backend has no ptxas here: the kernels cannot be compiled for a GPU")
    result = sm90.run_compiler_script(COMPILE_FOR_SM90, tmp_path, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "compiled", result.stderr[-4000:]
