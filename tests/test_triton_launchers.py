"""What only the Triton kernel set has (fused_resnet/triton/bn.py, stats.py): its launchers' tiling, taken down every
path on small tensors; the launch geometry at ResNet-50's sizes; the merge of per-tile statistics on its own; and
every kernel variant compiled for an H100. The ops themselves are tested with the other kernel sets
(tests/test_kernel_sets.py, tests/test_kernel_set_robustness.py).

Without a GPU the kernels run under Triton's interpreter on CPU tensors (tests/conftest.py switches it on before
anything defines a kernel); with one they run compiled, on CUDA tensors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed: the Triton kernels cannot run")

import primitives  # noqa: E402
from fused_resnet.triton import bn, stats  # noqa: E402
from kernel_cases import (  # noqa: E402
    activation,
    assert_close,
    channel_vectors,
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
    y = ops.bn_act(x, scale, shift, res, None, None, True, 2, 4)
    padded = primitives.zero_pad_identity(res, C, 2, 4)
    assert_close(y, primitives.bn_act(x, scale, shift, padded), fp32, "elementwise", "bn_act")

    coefs, coefs2 = channel_vectors(kernels, 3, C, fp32), channel_vectors(kernels, 3, C, fp32)
    grad_x, grad_x2 = ops.bn_act_backward_elemt(g, out, x, mean, *coefs, x2, mean2, *coefs2, False)
    exact_x, exact_x2 = primitives.backward_elemt(g, out, x, mean, coefs, x2, mean2, coefs2)
    assert_close(grad_x, exact_x, fp32, "elementwise", "grad_input")
    assert_close(grad_x2, exact_x2, fp32, "elementwise", "grad_input2")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@on_triton
def test_reductions_are_bitwise_deterministic_on_small_blocks(kernels, small_blocks, channels_last):
    """Many tiles even under the interpreter: two runs, the same bits, and the same for the merge on its own."""
    x = activation(kernels, (4, 6, 10, 10), torch.float32, channels_last, mean=2.0)
    g = activation(kernels, (4, 6, 10, 10), torch.float32, channels_last)
    (mean,) = channel_vectors(kernels, 1, 6, torch.float32)
    ops = kernels.ops
    runs = [(*ops.batch_stats(x), *ops.bn_act_backward_reduce(g, x, x, mean, x, mean)) for _ in range(2)]
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


# ---------------------------------------------------------------------------------------------------------------
# The GPU build: the interpreter accepts programs the compiler rejects (and the reverse), so every kernel variant the
# launchers can pick is compiled for an H100 (sm_90) here, without a GPU, by Triton's own ptxas.

COMPILE_FOR_SM90 = textwrap.dedent("""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fused_resnet.triton import bn, stats

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
        triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps))

    SECOND_BN = ("x2_ptr", "mean2_ptr", "coef2_dy_ptr", "coef2_xmu_ptr", "coef2_const_ptr")
    # batch_stats hands float64 partials to the merge; the convolution's epilogue float32 ones.
    FP64_PARTIALS = {"mean_partial_ptr": "*fp64", "m2_partial_ptr": "*fp64"}
    compile_for_sm90(stats._merge_partial_stats_kernel, 4, BLOCK_T=64, BLOCK_C=32)
    compile_for_sm90(stats._merge_partial_stats_kernel, 4, FP64_PARTIALS, BLOCK_T=64, BLOCK_C=32)
    compile_for_sm90(bn._batch_stats_planes_kernel, 8, FP64_PARTIALS, ACC_DTYPE=tl.float32, BLOCK_N=1, BLOCK_HW=4096)
    compile_for_sm90(bn._batch_stats_rows_kernel, 8, FP64_PARTIALS, ACC_DTYPE=tl.float32, BLOCKS_PER_TILE=16,
                     BLOCK_R=64, BLOCK_C=64)
    compile_for_sm90(bn._sum_partials_kernel, 4, BLOCK_T=64, BLOCK_COLS=32)
    for kernel, blocks in ((bn._bn_act_planes_kernel, dict(BLOCK_P=1, BLOCK_HW=2048)),
                           (bn._bn_act_rows_kernel, dict(BLOCK_R=16, BLOCK_C=128))):
        for residual in range(4):
            unused = {name: None for name in (["residual_ptr"] if residual == 0 else [])
                      + (["residual_scale_ptr", "residual_shift_ptr"] if residual != 2 else [])}
            compile_for_sm90(kernel, 4, RESIDUAL=residual, RELU=residual % 2 == 0, **unused, **blocks)
    for kernel, blocks in ((bn._backward_reduce_planes_kernel, dict(BLOCK_N=1, BLOCK_HW=4096)),
                           (bn._backward_reduce_rows_kernel, dict(BLOCKS_PER_TILE=16, BLOCK_R=64, BLOCK_C=64))):
        compile_for_sm90(kernel, 8, MASK=False, SECOND=False, output_ptr=None, x2_ptr=None, mean2_ptr=None, **blocks)
        compile_for_sm90(kernel, 8, MASK=True, SECOND=True, **blocks)
    for kernel, blocks in ((bn._backward_elemt_planes_kernel, dict(BLOCK_P=1, BLOCK_HW=2048)),
                           (bn._backward_elemt_rows_kernel, dict(BLOCK_R=16, BLOCK_C=128))):
        compile_for_sm90(kernel, 4, MASK=False, OTHER=0, output_ptr=None, grad_other_ptr=None,
                         **dict.fromkeys(SECOND_BN), **blocks)
        compile_for_sm90(kernel, 4, MASK=True, OTHER=1, **dict.fromkeys(SECOND_BN), **blocks)
        compile_for_sm90(kernel, 4, MASK=True, OTHER=2, **blocks)
    print("compiled")
""")


def test_every_kernel_variant_compiles_for_an_h100(tmp_path):
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() and not os.environ.get("TRITON_PTXAS_PATH"):
        pytest.skip("Triton's CUDA backend has no ptxas here: the kernels cannot be compiled for a GPU")
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "compiled", result.stderr[-4000:]
