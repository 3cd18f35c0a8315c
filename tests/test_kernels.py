"""The compiled CPU kernels (torch.ops.fused_resnet.*) against their float64 formulas (tests/primitives.py):
every op, dtype, layout and CPU kernel table (default and AVX2), odd shapes, robustness and determinism."""

from __future__ import annotations

import pytest
import torch

import primitives
from conftest import to_layout
from fused_resnet import _native

pytestmark = pytest.mark.skipif(not _native.has_extension(), reason=str(_native.load_error))

ops = torch.ops.fused_resnet if _native.has_extension() else None

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Element-wise tolerances: the kernels compute in fp32 (fp64 for fp64) and round once to the output dtype.
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-6, atol=2e-6),
       torch.bfloat16: dict(rtol=8e-3, atol=8e-3), torch.float16: dict(rtol=1e-3, atol=1e-3)}
# N, C, H, W: C not a multiple of any vector width, H*W not either, single-pixel planes, one image.
SHAPES = [(2, 3, 5, 7), (3, 13, 7, 9), (1, 67, 6, 6), (4, 64, 1, 1), (2, 33, 17, 1)]

TABLES = ["default"] + (["avx2"] if _native.cpu_kernel_capability == "avx2" else [])


@pytest.fixture(params=TABLES)
def kernel_table(request):
    """Runs the test on each CPU kernel table compiled for this machine, restoring the installed one after."""
    from fused_resnet import _C

    if request.param == "default":
        _C.use_cpu_kernels(None)
    else:
        from fused_resnet import _C_avx2

        _C.use_cpu_kernels(_C_avx2.kernels)
    yield request.param
    if _native.cpu_kernel_capability == "avx2":
        from fused_resnet import _C_avx2

        _C.use_cpu_kernels(_C_avx2.kernels)
    else:
        _C.use_cpu_kernels(None)


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def activation(shape, dtype, channels_last, mean=0.0, std=1.0):
    return to_layout(torch.randn(shape, dtype=torch.float64) * std + mean, channels_last).to(dtype)


def close(actual, expected, dtype, what):
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype], msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_stats(kernel_table, shape, channels_last, dtype):
    x = activation(shape, dtype, channels_last, mean=3.0, std=2.0)
    mean, var = ops.batch_stats(x)
    assert mean.dtype == var.dtype == acc(dtype)
    ref_mean, ref_var = primitives.batch_stats(x)
    # Statistics accumulate in fp32/fp64 whatever the input dtype: judge against the float64 statistics of the
    # rounded input at the accumulation type's precision.
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), ref_mean, **tol)
    torch.testing.assert_close(var.double(), ref_var, **tol)


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_stats_large_mean_keeps_its_variance(kernel_table, channels_last):
    """A channel whose mean is 1e4 times its spread: sum and sum-of-squares in fp32 would lose the variance
    (E[x^2] - E[x]^2 cancels 8 digits of 1e8); per-tile two-pass moments merged with Chan's update do not."""
    x = activation((8, 5, 16, 16), torch.float32, channels_last, mean=1e4, std=1.0)
    mean, var = ops.batch_stats(x)
    ref_mean, ref_var = primitives.batch_stats(x)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-7, atol=0)
    naive = (x.float().pow(2).mean((0, 2, 3)) - x.float().mean((0, 2, 3)).pow(2))
    assert (naive.double() - ref_var).abs().max() > 1e-2, "the naive formula should fail here (test too easy)"


def test_batch_stats_constant_channel_has_zero_variance(kernel_table):
    x = torch.full((4, 3, 5, 5), 7.25)
    mean, var = ops.batch_stats(x)
    assert torch.equal(mean, torch.full((3,), 7.25)) and torch.equal(var, torch.zeros(3))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", ["none", "identity", "affine"])
@pytest.mark.parametrize("relu", [True, False])
def test_bn_act(kernel_table, shape, channels_last, dtype, residual, relu):
    C = shape[1]
    x = activation(shape, dtype, channels_last)
    scale, shift = torch.randn(C, dtype=acc(dtype)), torch.randn(C, dtype=acc(dtype))
    r = activation(shape, dtype, channels_last) if residual != "none" else None
    rs, rb = (torch.randn(C, dtype=acc(dtype)), torch.randn(C, dtype=acc(dtype))) if residual == "affine" else (None, None)
    out = ops.bn_act(x, scale, shift, r, rs, rb, relu)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    close(out, primitives.bn_act(x, scale, shift, r, rs, rb, relu), dtype, "bn_act")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("case", [
    # (input shape, residual channels, stride, zero channels before): the CIFAR stage changes, odd sizes, no padding
    ((2, 32, 8, 8), 16, 2, 8), ((3, 16, 5, 4), 8, 2, 3), ((2, 13, 7, 9), 13, 1, 0), ((2, 10, 3, 3), 7, 3, 0),
    ((1, 24, 4, 4), 8, 2, 16),
])
def test_bn_act_with_a_zero_padded_residual(kernel_table, channels_last, dtype, relu, case):
    (N, C, H, W), res_channels, stride, before = case
    x = activation((N, C, H, W), dtype, channels_last)
    res = activation((N, res_channels, H * stride, W * stride), dtype, channels_last)
    scale, shift = torch.randn(C, dtype=acc(dtype)), torch.randn(C, dtype=acc(dtype))
    out = ops.bn_act(x, scale, shift, res, None, None, relu, stride, before)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    expected = primitives.bn_act(x, scale, shift, primitives.zero_pad_identity(res, C, stride, before), relu=relu)
    close(out, expected, dtype, "bn_act with a zero-padded residual")


def test_bn_act_rejects_a_residual_that_does_not_fit(kernel_table):
    x = torch.randn(2, 16, 4, 4)
    s = torch.ones(16)
    with pytest.raises(RuntimeError, match=r"a residual of 8 channels at residual_channel_offset 10 does not fit"):
        ops.bn_act(x, s, s, torch.randn(2, 8, 8, 8), None, None, True, 2, 10)
    with pytest.raises(RuntimeError, match=r"subsampled by 2 does not match the input of shape \[2, 16, 4, 4\]"):
        ops.bn_act(x, s, s, torch.randn(2, 8, 10, 8), None, None, True, 2, 4)
    with pytest.raises(RuntimeError, match=r"takes no residual_scale"):
        ops.bn_act(x, s, s, torch.randn(2, 8, 8, 8), torch.ones(16), torch.ones(16), True, 2, 4)


def test_bn_act_keeps_nan_like_torch_relu(kernel_table):
    x = torch.randn(2, 8, 4, 4)
    x[0, 1, 2, 3] = float("nan")
    out = ops.bn_act(x, torch.ones(8), torch.zeros(8), None, None, None, True)
    assert torch.equal(out.isnan(), torch.relu(x).isnan())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("second", [False, True])
def test_backward_reduce(kernel_table, shape, channels_last, dtype, masked, second):
    C = shape[1]
    g, x = activation(shape, dtype, channels_last), activation(shape, dtype, channels_last, mean=1.0)
    out = ops.bn_act(activation(shape, dtype, channels_last), torch.ones(C, dtype=acc(dtype)),
                     torch.zeros(C, dtype=acc(dtype)), None, None, None, True) if masked else None
    mean = torch.randn(C, dtype=acc(dtype))
    x2, mean2 = (activation(shape, dtype, channels_last), torch.randn(C, dtype=acc(dtype))) if second else (None, None)
    sums = ops.bn_act_backward_reduce(g, out, x, mean, x2, mean2)
    refs = primitives.backward_reduce(g, out, x, mean, x2, mean2)
    count = shape[0] * shape[2] * shape[3]
    # Sums of `count` products: allow the accumulation type's rounding times the magnitude of the terms.
    atol = (1e-12 if dtype == torch.float64 else 1e-5) * count
    for got, ref, name in zip(sums, refs, ("sum_dy", "sum_dy_xmu", "sum_dy_xmu2")):
        if ref is None:
            assert got.numel() == 0, name
        else:
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("other", ["none", "residual", "second"])
def test_backward_elemt(kernel_table, shape, channels_last, dtype, masked, other):
    C = shape[1]
    g, x = activation(shape, dtype, channels_last), activation(shape, dtype, channels_last)
    out = activation(shape, dtype, channels_last) if masked else None
    mean = torch.randn(C, dtype=acc(dtype))
    coefs = tuple(torch.randn(C, dtype=acc(dtype)) for _ in range(3))
    x2 = mean2 = coefs2 = None
    if other == "second":
        x2, mean2 = activation(shape, dtype, channels_last), torch.randn(C, dtype=acc(dtype))
        coefs2 = tuple(torch.randn(C, dtype=acc(dtype)) for _ in range(3))
    k2 = coefs2 or (None, None, None)
    grad_x, grad_other = ops.bn_act_backward_elemt(g, out, x, mean, *coefs, x2, mean2, *k2, other == "residual")
    ref_x, ref_other = primitives.backward_elemt(g, out, x, mean, coefs, x2, mean2, coefs2, other == "residual")
    close(grad_x, ref_x, dtype, "grad_input")
    if ref_other is None:
        assert grad_other.numel() == 0
    else:
        close(grad_other, ref_other, dtype, "grad_other")


def test_grad_output_in_another_layout_is_read_correctly(kernel_table):
    """Autograd may hand a channels_last gradient to an NCHW activation (and the reverse)."""
    x = activation((2, 16, 5, 5), torch.float32, False)
    g = activation((2, 16, 5, 5), torch.float32, True)
    mean, coefs = torch.randn(16), tuple(torch.randn(16) for _ in range(3))
    grad_x, _ = ops.bn_act_backward_elemt(g, None, x, mean, *coefs, None, None, None, None, None, False)
    close(grad_x, primitives.backward_elemt(g, None, x, mean, coefs)[0], torch.float32, "grad_input")
    assert grad_x.is_contiguous()


@pytest.mark.parametrize("channels_last", [False, True])
def test_reductions_are_bitwise_deterministic_across_thread_counts(kernel_table, channels_last):
    """Tile bounds depend on the shape alone and tiles merge in order: 1 or 2 threads, same bits."""
    x = activation((8, 24, 30, 30), torch.float32, channels_last, mean=2.0)
    g = activation((8, 24, 30, 30), torch.float32, channels_last)
    mean = torch.randn(24)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append((*ops.batch_stats(x), *ops.bn_act_backward_reduce(g, x, x, mean, None, None)[:2]))
    finally:
        torch.set_num_threads(threads)
    for later in results[1:]:
        for a, b in zip(results[0], later):
            assert torch.equal(a, b)


def test_ops_reject_bad_arguments_naming_them(kernel_table):
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match=r"fused_resnet::bn_act: expected input to be 4-D"):
        ops.bn_act(x[0], torch.ones(4), torch.zeros(4), None, None, None, True)
    with pytest.raises(RuntimeError, match=r"fused_resnet::bn_act: expected scale to be a vector of 4"):
        ops.bn_act(x, torch.ones(5), torch.zeros(4), None, None, None, True)
    with pytest.raises(RuntimeError, match=r"fused_resnet::bn_act: expected residual of shape"):
        ops.bn_act(x, torch.ones(4), torch.zeros(4), torch.randn(2, 4, 3, 4), None, None, True)
    with pytest.raises(RuntimeError, match=r"fused_resnet::bn_act: expected residual of dtype"):
        ops.bn_act(x, torch.ones(4), torch.zeros(4), x.double(), None, None, True)
    with pytest.raises(RuntimeError, match=r"fused_resnet::batch_stats: expected input to be a floating-point"):
        ops.batch_stats(torch.ones(2, 4, 3, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"fused_resnet::batch_stats: expected a non-empty input"):
        ops.batch_stats(torch.ones(0, 4, 3, 3))
    with pytest.raises(RuntimeError, match=r"input2 and mean2 must be given together"):
        ops.bn_act_backward_reduce(x, None, x, torch.zeros(4), x, None)
