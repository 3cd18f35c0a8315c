"""The Triton BatchNorm/residual/ReLU kernels (fused_resnet/triton/bn.py, stats.py) against the float64 formulas of
tests/primitives.py and against the compiled ops (torch.ops.fused_resnet.*) where the extension is built: every op,
dtype and layout, odd shapes, option A and projection residuals, every tiling path, robustness of the statistics
and determinism.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (tests/conftest.py switches it on before
anything defines a kernel); with one they run compiled, on CUDA tensors.

Every output buffer the launchers allocate starts out NaN (deterministic mode's fill of uninitialized memory), so
an element or a partial a kernel forgets to write fails the comparison instead of passing on stale zeros.
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
from conftest import to_layout  # noqa: E402
from fused_resnet import _native  # noqa: E402
from fused_resnet.triton import bn, stats  # noqa: E402

INTERPRETED = stats.kernels_are_interpreted()
DEVICES = ["cpu"] if INTERPRETED else ["cuda"]

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Element-wise tolerances: the kernels compute in fp32 (fp64 for fp64) and round once to the output dtype.
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-6, atol=2e-6),
       torch.bfloat16: dict(rtol=8e-3, atol=8e-3), torch.float16: dict(rtol=1e-3, atol=1e-3)}
# N, C, H, W: C not a power of two (nor a multiple of a vector width), odd H and W, one image, 1x1 planes.
SHAPES = [(2, 3, 5, 7), (3, 13, 7, 9), (1, 67, 6, 6), (4, 64, 1, 1), (2, 33, 17, 1)]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cpu" and not INTERPRETED:
        pytest.skip("CPU tensors need Triton's interpreter (TRITON_INTERPRET=1 when the kernels are defined)")
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    """torch.empty* fills floating-point memory with NaN (and integers with their maximum) in this mode."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def compiled_op(device: torch.device):
    """torch.ops.fused_resnet where it can run on `device`, else None."""
    if not _native.has_extension():
        return None
    if device.type == "cuda" and not _native.built_with_cuda():
        return None
    return torch.ops.fused_resnet


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def activation(shape, dtype, channels_last, device, mean=0.0, std=1.0):
    return to_layout(torch.randn(shape, dtype=torch.float64) * std + mean, channels_last).to(dtype).to(device)


def channel_vector(C, dtype, device):
    return torch.randn(C, dtype=acc(dtype), device=device)


def memory_format(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def close(actual, expected, dtype, what):
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), **TOL[dtype],
                               msg=lambda m: f"{what}: {m}")


def close_to_compiled(actual, compiled, dtype, what):
    """Against the compiled op: each is within TOL of the exact result, so they are within twice of each other."""
    tol = {k: 2 * v for k, v in TOL[dtype].items()}
    torch.testing.assert_close(actual.cpu().double(), compiled.cpu().double(), **tol,
                               msg=lambda m: f"{what} against the compiled op: {m}")


# ---------------------------------------------------------------------------------------------------------------
# batch_stats


def stats_tolerance(dtype):
    # Statistics accumulate in fp32/fp64 whatever the input dtype: judged against the float64 statistics of the
    # rounded input at the accumulation type's precision.
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_stats(device, shape, channels_last, dtype):
    x = activation(shape, dtype, channels_last, device, mean=3.0, std=2.0)
    mean, var = bn.batch_stats(x)
    assert mean.dtype == var.dtype == acc(dtype) and mean.shape == var.shape == (shape[1],)
    assert mean.device == x.device
    ref_mean, ref_var = primitives.batch_stats(x.cpu())
    torch.testing.assert_close(mean.cpu().double(), ref_mean, **stats_tolerance(dtype))
    torch.testing.assert_close(var.cpu().double(), ref_var, **stats_tolerance(dtype))
    if (ops := compiled_op(device)) is not None:
        for got, theirs in zip((mean, var), ops.batch_stats(x)):
            torch.testing.assert_close(got, theirs, **stats_tolerance(dtype))


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_stats_large_mean_keeps_its_variance(device, channels_last):
    """A channel whose mean is 1e4 times its spread: sum and sum-of-squares in fp32 lose the variance
    (E[x^2] - E[x]^2 cancels 8 digits of 1e8); two-pass blocks merged with Chan's update do not."""
    x = activation((8, 5, 16, 16), torch.float32, channels_last, device, mean=1e4, std=1.0)
    mean, var = bn.batch_stats(x)
    ref_mean, ref_var = primitives.batch_stats(x.cpu())
    torch.testing.assert_close(var.cpu().double(), ref_var, rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.cpu().double(), ref_mean, rtol=2e-7, atol=0)
    naive = x.float().pow(2).mean((0, 2, 3)) - x.float().mean((0, 2, 3)).pow(2)
    assert (naive.cpu().double() - ref_var).abs().max() > 1e-2, "the naive formula should fail here (test too easy)"


def test_batch_stats_constant_channel_has_zero_variance(device):
    x = torch.full((4, 3, 5, 5), 7.25, device=device)
    mean, var = bn.batch_stats(x)
    assert torch.equal(mean.cpu(), torch.full((3,), 7.25)) and torch.equal(var.cpu(), torch.zeros(3))


# ---------------------------------------------------------------------------------------------------------------
# bn_act


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", ["none", "identity", "affine"])
@pytest.mark.parametrize("relu", [True, False])
def test_bn_act(device, shape, channels_last, dtype, residual, relu):
    C = shape[1]
    x = activation(shape, dtype, channels_last, device)
    scale, shift = channel_vector(C, dtype, device), channel_vector(C, dtype, device)
    r = activation(shape, dtype, channels_last, device) if residual != "none" else None
    rs, rb = ((channel_vector(C, dtype, device), channel_vector(C, dtype, device)) if residual == "affine"
              else (None, None))
    out = bn.bn_act(x, scale, shift, r, rs, rb, relu)
    assert out.dtype == dtype and out.device == x.device
    assert out.is_contiguous(memory_format=memory_format(channels_last))
    cpu = [t.cpu() if t is not None else None for t in (x, scale, shift, r, rs, rb)]
    close(out, primitives.bn_act(*cpu, relu), dtype, "bn_act")
    if (ops := compiled_op(device)) is not None:
        close_to_compiled(out, ops.bn_act(x, scale, shift, r, rs, rb, relu), dtype, "bn_act")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("case", [
    # (input shape, residual channels, stride, zero channels before): the CIFAR stage changes, odd sizes, an odd
    # residual size that subsampling rounds up, no padding, a residual with fewer channels and no offset
    ((2, 32, 8, 8), 16, 2, 8), ((3, 16, 5, 4), 8, 2, 3), ((2, 13, 7, 9), 13, 1, 0), ((2, 10, 3, 3), 7, 3, 0),
    ((1, 24, 4, 4), 8, 2, 16),
])
def test_bn_act_with_a_zero_padded_residual(device, channels_last, dtype, relu, case):
    (N, C, H, W), res_channels, stride, before = case
    x = activation((N, C, H, W), dtype, channels_last, device)
    # An odd residual height where the stride allows it: (2H - 1 - 1) // 2 + 1 == H still.
    res_h = H * stride - (1 if stride > 1 else 0)
    res = activation((N, res_channels, res_h, W * stride), dtype, channels_last, device)
    scale, shift = channel_vector(C, dtype, device), channel_vector(C, dtype, device)
    out = bn.bn_act(x, scale, shift, res, None, None, relu, stride, before)
    assert out.is_contiguous(memory_format=memory_format(channels_last))
    padded = primitives.zero_pad_identity(res.cpu(), C, stride, before)
    expected = primitives.bn_act(x.cpu(), scale.cpu(), shift.cpu(), padded, relu=relu)
    close(out, expected, dtype, "bn_act with a zero-padded residual")
    if (ops := compiled_op(device)) is not None:
        close_to_compiled(out, ops.bn_act(x, scale, shift, res, None, None, relu, stride, before), dtype,
                          "bn_act with a zero-padded residual")


def test_bn_act_keeps_nan_like_torch_relu(device):
    x = torch.randn(2, 8, 4, 4, device=device)
    x[0, 1, 2, 3] = float("nan")
    out = bn.bn_act(x, torch.ones(8, device=device), torch.zeros(8, device=device))
    assert torch.equal(out.isnan(), torch.relu(x).isnan())
    assert torch.equal(out.nan_to_num(), torch.relu(x).nan_to_num())


def test_inputs_in_other_strides_are_made_contiguous(device):
    """A transposed or sliced input is neither NCHW nor channels_last dense: it is computed as contiguous NCHW."""
    base = activation((2, 6, 7, 5), torch.float32, False, device)
    x = base.transpose(2, 3)[:, ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    scale, shift = channel_vector(3, torch.float32, device), channel_vector(3, torch.float32, device)
    out = bn.bn_act(x, scale, shift, relu=False)
    assert out.is_contiguous()
    close(out, primitives.bn_act(x.cpu(), scale.cpu(), shift.cpu(), relu=False), torch.float32, "bn_act")
    mean, var = bn.batch_stats(x)
    ref_mean, ref_var = primitives.batch_stats(x.cpu())
    torch.testing.assert_close(mean.cpu().double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.cpu().double(), ref_var, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Backward


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
# The ReLU mask and the second BN are independent compile-time branches: each is on in one case and off in the
# other (every combination would double the slowest test here, under the interpreter, for no new path).
@pytest.mark.parametrize("masked, second", [(False, False), (True, True)])
def test_backward_reduce(device, shape, channels_last, dtype, masked, second):
    C = shape[1]
    g = activation(shape, dtype, channels_last, device)
    x = activation(shape, dtype, channels_last, device, mean=1.0)
    # A ReLU output: about half the gradient masked off.
    out = torch.relu(activation(shape, dtype, channels_last, device)) if masked else None
    mean = channel_vector(C, dtype, device)
    x2, mean2 = ((activation(shape, dtype, channels_last, device), channel_vector(C, dtype, device)) if second
                 else (None, None))
    sums = bn.bn_act_backward_reduce(g, out, x, mean, x2, mean2)
    cpu = [t.cpu() if t is not None else None for t in (g, out, x, mean, x2, mean2)]
    refs = primitives.backward_reduce(*cpu)
    count = shape[0] * shape[2] * shape[3]
    # Sums of `count` products: allow the accumulation type's rounding times the magnitude of the terms.
    atol = (1e-12 if dtype == torch.float64 else 1e-5) * count
    theirs = ops.bn_act_backward_reduce(g, out, x, mean, x2, mean2) if (ops := compiled_op(device)) else (None,) * 3
    for got, ref, compiled, name in zip(sums, refs, theirs, ("sum_dy", "sum_dy_xmu", "sum_dy_xmu2")):
        assert got.dtype == acc(dtype) and got.device == x.device, name
        if ref is None:
            assert got.numel() == 0, name
            continue
        torch.testing.assert_close(got.cpu().double(), ref, rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")
        if compiled is not None:
            torch.testing.assert_close(got, compiled, rtol=2e-5, atol=2 * atol,
                                       msg=lambda m: f"{name} against the compiled op: {m}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("other", ["none", "residual", "second"])
def test_backward_elemt(device, shape, channels_last, dtype, masked, other):
    C = shape[1]
    g, x = activation(shape, dtype, channels_last, device), activation(shape, dtype, channels_last, device)
    out = activation(shape, dtype, channels_last, device) if masked else None
    mean = channel_vector(C, dtype, device)
    coefs = tuple(channel_vector(C, dtype, device) for _ in range(3))
    x2 = mean2 = coefs2 = None
    if other == "second":
        x2, mean2 = activation(shape, dtype, channels_last, device), channel_vector(C, dtype, device)
        coefs2 = tuple(channel_vector(C, dtype, device) for _ in range(3))
    k2 = coefs2 or (None, None, None)
    grad_x, grad_other = bn.bn_act_backward_elemt(g, out, x, mean, *coefs, x2, mean2, *k2, other == "residual")
    assert grad_x.dtype == dtype and grad_x.is_contiguous(memory_format=memory_format(channels_last))

    def cpu(t):
        return None if t is None else tuple(v.cpu() for v in t) if isinstance(t, tuple) else t.cpu()

    ref_x, ref_other = primitives.backward_elemt(cpu(g), cpu(out), cpu(x), cpu(mean), cpu(coefs), cpu(x2),
                                                 cpu(mean2), cpu(coefs2), other == "residual")
    close(grad_x, ref_x, dtype, "grad_input")
    if ref_other is None:
        assert grad_other.numel() == 0 and grad_other.dtype == dtype
    else:
        assert grad_other.is_contiguous(memory_format=memory_format(channels_last))
        close(grad_other, ref_other, dtype, "grad_other")
    if (ops := compiled_op(device)) is not None:
        their_x, their_other = ops.bn_act_backward_elemt(g, out, x, mean, *coefs, x2, mean2, *k2, other == "residual")
        close_to_compiled(grad_x, their_x, dtype, "grad_input")
        assert grad_other.shape == their_other.shape
        if ref_other is not None:
            close_to_compiled(grad_other, their_other, dtype, "grad_other")


def test_grad_output_in_another_layout_is_read_correctly(device):
    """Autograd may hand a channels_last gradient to an NCHW activation (and the reverse)."""
    for channels_last in (False, True):
        x = activation((2, 16, 5, 5), torch.float32, channels_last, device)
        g = activation((2, 16, 5, 5), torch.float32, not channels_last, device)
        mean, coefs = channel_vector(16, torch.float32, device), tuple(torch.randn(16, device=device) for _ in range(3))
        grad_x, _ = bn.bn_act_backward_elemt(g, None, x, mean, *coefs)
        ref = primitives.backward_elemt(g.cpu(), None, x.cpu(), mean.cpu(), tuple(c.cpu() for c in coefs))[0]
        close(grad_x, ref, torch.float32, "grad_input")
        assert grad_x.is_contiguous(memory_format=memory_format(channels_last))
        sums = bn.bn_act_backward_reduce(g, None, x, mean)
        refs = primitives.backward_reduce(g.cpu(), None, x.cpu(), mean.cpu())
        for got, ref in zip(sums[:2], refs[:2]):
            torch.testing.assert_close(got.cpu().double(), ref, rtol=1e-5, atol=1e-5 * 50)


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


@pytest.mark.parametrize("channels_last", [False, True])
def test_every_tiling_path_on_small_blocks(device, small_blocks, channels_last):
    shape = (3, 13, 9, 11)
    C = shape[1]
    x = activation(shape, torch.float32, channels_last, device, mean=5.0, std=3.0)
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

    mean, var = bn.batch_stats(x)
    ref_mean, ref_var = primitives.batch_stats(x.cpu())
    torch.testing.assert_close(mean.cpu().double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.cpu().double(), ref_var, rtol=1e-5, atol=1e-5)

    g = activation(shape, torch.float32, channels_last, device)
    x2 = activation(shape, torch.float32, channels_last, device)
    out = torch.relu(activation(shape, torch.float32, channels_last, device))
    mean2 = channel_vector(C, torch.float32, device)
    sums = bn.bn_act_backward_reduce(g, out, x, mean, x2, mean2)
    refs = primitives.backward_reduce(g.cpu(), out.cpu(), x.cpu(), mean.cpu(), x2.cpu(), mean2.cpu())
    for got, ref in zip(sums, refs):
        torch.testing.assert_close(got.cpu().double(), ref, rtol=1e-5, atol=1e-5 * x.numel() / C)

    scale, shift = channel_vector(C, torch.float32, device), channel_vector(C, torch.float32, device)
    res = activation((3, 6, 17, 22), torch.float32, channels_last, device)
    y = bn.bn_act(x, scale, shift, res, None, None, True, 2, 4)
    padded = primitives.zero_pad_identity(res.cpu(), C, 2, 4)
    close(y, primitives.bn_act(x.cpu(), scale.cpu(), shift.cpu(), padded), torch.float32, "bn_act")

    coefs = tuple(channel_vector(C, torch.float32, device) for _ in range(3))
    coefs2 = tuple(channel_vector(C, torch.float32, device) for _ in range(3))
    grad_x, grad_x2 = bn.bn_act_backward_elemt(g, out, x, mean, *coefs, x2, mean2, *coefs2, False)
    ref_x, ref_x2 = primitives.backward_elemt(g.cpu(), out.cpu(), x.cpu(), mean.cpu(), tuple(c.cpu() for c in coefs),
                                              x2.cpu(), mean2.cpu(), tuple(c.cpu() for c in coefs2))
    close(grad_x, ref_x, torch.float32, "grad_input")
    close(grad_x2, ref_x2, torch.float32, "grad_other")


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


@pytest.mark.parametrize("count_dtype", stats.COUNT_DTYPES)
def test_merge_partial_stats_of_many_tiles_some_empty(device, count_dtype):
    T, C = 3001, 7
    counts = torch.randint(1, 40, (T,))
    counts[torch.randperm(T)[:100]] = 0
    values = torch.randn(T, 40, C, dtype=torch.float64) * 3 + torch.randn(C, dtype=torch.float64) * 10
    mean_t, m2_t = partials_of(values, counts)
    # Whatever an empty tile's producer left there (0/0) must not leak into the result.
    mean_t[counts == 0], m2_t[counts == 0] = float("nan"), float("inf")
    mean_partial, m2_partial = mean_t.float(), m2_t.float()
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


def test_merge_partial_stats_keeps_a_small_spread_under_a_large_mean(device):
    """Tiles of values 1e4 +- 1: the merge of their fp32 partials keeps the variance to 1e-5, where fp32 sums of x
    and x^2 over the same values lose it entirely."""
    T, per, C = 2000, 16, 3
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


def test_merge_partial_stats_in_float64(device):
    T, per, C = 300, 9, 4
    values = torch.randn(T, per, C, dtype=torch.float64) * 0.1 + 1e6
    mean_t, m2_t = partials_of(values, torch.full((T,), per))
    mean, var = stats.merge_partial_stats(mean_t.to(device), m2_t.to(device),
                                          torch.full((T,), per, dtype=torch.int64, device=device))
    assert mean.dtype == var.dtype == torch.float64
    data = values.reshape(-1, C)
    torch.testing.assert_close(mean.cpu(), data.mean(0), rtol=1e-14, atol=0)
    torch.testing.assert_close(var.cpu(), data.var(0, unbiased=False), rtol=1e-9, atol=0)


def test_merge_partial_stats_without_any_element_is_nan(device):
    mean, var = stats.merge_partial_stats(torch.randn(3, 2, device=device), torch.rand(3, 2, device=device),
                                          torch.zeros(3, dtype=torch.int32, device=device))
    assert mean.isnan().all() and var.isnan().all()


def test_merge_partial_stats_rejects_bad_arguments():
    m = torch.randn(4, 3)
    op = "fused_resnet.triton.merge_partial_stats"
    with pytest.raises(ValueError, match=rf"{op}: expected mean_partial to be a non-empty \[tiles, channels\] matrix"):
        stats.merge_partial_stats(torch.randn(4), m, torch.ones(4))
    with pytest.raises(TypeError, match=r"expected mean_partial of dtype torch.float32 or torch.float64"):
        stats.merge_partial_stats(m.half(), m.half(), torch.ones(4))
    with pytest.raises(ValueError, match=r"expected m2_partial of shape \[4, 3\] like mean_partial"):
        stats.merge_partial_stats(m, torch.randn(4, 2), torch.ones(4))
    with pytest.raises(TypeError, match=r"expected m2_partial of dtype torch.float32 like mean_partial"):
        stats.merge_partial_stats(m, m.double(), torch.ones(4))
    with pytest.raises(ValueError, match=r"expected count_partial to hold 4 per-tile counts"):
        stats.merge_partial_stats(m, m, torch.ones(3))
    with pytest.raises(TypeError, match=r"expected count_partial of dtype int32, int64, float32 or float64"):
        stats.merge_partial_stats(m, m, torch.ones(4, dtype=torch.int16))
    with pytest.raises(RuntimeError, match=r"expected count_partial on cpu like mean_partial"):
        stats.merge_partial_stats(m, m, torch.ones(4, device="meta"))


# ---------------------------------------------------------------------------------------------------------------
# Determinism and argument checks


@pytest.mark.parametrize("channels_last", [False, True])
def test_reductions_are_bitwise_deterministic(device, small_blocks, channels_last):
    """Tile bounds depend on the shape alone and tiles merge in order: two runs, the same bits."""
    x = activation((4, 6, 10, 10), torch.float32, channels_last, device, mean=2.0)
    g = activation((4, 6, 10, 10), torch.float32, channels_last, device)
    mean = channel_vector(6, torch.float32, device)
    runs = [(*bn.batch_stats(x), *bn.bn_act_backward_reduce(g, x, x, mean, x, mean)) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    counts = torch.randint(0, 9, (50,), device=device)
    partials = (torch.randn(50, 6, device=device) + 100, torch.rand(50, 6, device=device))
    merges = [stats.merge_partial_stats(*partials, counts) for _ in range(2)]
    for first, second in zip(*merges):
        assert torch.equal(first, second)


def test_launchers_reject_bad_arguments_naming_them(device):
    x = torch.randn(2, 4, 3, 3, device=device)
    ones, zeros = torch.ones(4, device=device), torch.zeros(4, device=device)
    with pytest.raises(ValueError, match=r"fused_resnet.triton.bn_act: expected input to be 4-D"):
        bn.bn_act(x[0], ones, zeros)
    with pytest.raises(ValueError, match=r"fused_resnet.triton.bn_act: expected scale to be a vector of 4"):
        bn.bn_act(x, torch.ones(5, device=device), zeros)
    with pytest.raises(TypeError, match=r"expected shift to be floating-point"):
        bn.bn_act(x, ones, torch.zeros(4, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match=r"fused_resnet.triton.bn_act: expected residual of shape"):
        bn.bn_act(x, ones, zeros, torch.randn(2, 4, 3, 4, device=device))
    with pytest.raises(TypeError, match=r"fused_resnet.triton.bn_act: expected residual of dtype"):
        bn.bn_act(x, ones, zeros, x.double())
    with pytest.raises(ValueError, match=r"residual_scale and residual_shift must be given together"):
        bn.bn_act(x, ones, zeros, x, ones)
    with pytest.raises(ValueError, match=r"residual_scale given without a residual"):
        bn.bn_act(x, ones, zeros, None, ones, zeros)
    with pytest.raises(TypeError, match=r"batch_stats: expected input of dtype float16, bfloat16, float32 or float64"):
        bn.batch_stats(torch.ones(2, 4, 3, 3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"fused_resnet.triton.batch_stats: expected a non-empty input"):
        bn.batch_stats(torch.ones(0, 4, 3, 3, device=device))
    with pytest.raises(ValueError, match=r"input2 and mean2 must be given together"):
        bn.bn_act_backward_reduce(x, None, x, zeros, x, None)
    with pytest.raises(ValueError, match=r"input2, mean2 and the coef2_\* tensors must be given together"):
        bn.bn_act_backward_elemt(x, None, x, zeros, ones, ones, ones, x, zeros)
    with pytest.raises(ValueError, match=r"residual_grad and input2 are exclusive"):
        bn.bn_act_backward_elemt(x, None, x, zeros, ones, ones, ones, x, zeros, ones, ones, ones, True)
    with pytest.raises(RuntimeError, match=r"bn_act_backward_elemt: expected grad_output on .* like the input"):
        bn.bn_act_backward_elemt(x.to("meta"), None, x, zeros, ones, ones, ones)
    with pytest.raises(TypeError, match=r"expected input to be a Tensor, got list"):
        bn.batch_stats([1.0])


def test_launchers_reject_an_option_a_residual_that_does_not_fit(device):
    x = torch.randn(2, 16, 4, 4, device=device)
    s = torch.ones(16, device=device)
    op = "fused_resnet.triton.bn_act"
    with pytest.raises(ValueError, match=rf"{op}: a residual of 8 channels at residual_channel_offset 10 does not fit"):
        bn.bn_act(x, s, s, torch.randn(2, 8, 8, 8, device=device), None, None, True, 2, 10)
    with pytest.raises(ValueError, match=r"subsampled by 2 does not match the input of shape \[2, 16, 4, 4\]"):
        bn.bn_act(x, s, s, torch.randn(2, 8, 10, 8, device=device), None, None, True, 2, 4)
    with pytest.raises(ValueError, match=r"takes no residual_scale"):
        bn.bn_act(x, s, s, torch.randn(2, 8, 8, 8, device=device), s, s, True, 2, 4)
    with pytest.raises(ValueError, match=r"residual_stride and residual_channel_offset need a residual"):
        bn.bn_act(x, s, s, None, None, None, True, 2, 0)
    with pytest.raises(ValueError, match=r"expected residual_stride >= 1, got 0"):
        bn.bn_act(x, s, s, torch.randn(2, 8, 8, 8, device=device), None, None, True, 0, 4)
    with pytest.raises(TypeError, match=r"expected residual of dtype torch.float32"):
        bn.bn_act(x, s, s, torch.randn(2, 8, 8, 8, device=device).half(), None, None, True, 2, 4)


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
