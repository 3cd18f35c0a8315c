"""The CUDA kernels of the fused_resnet ops (csrc/cuda), against the CPU ops of the same extension.

Each CUDA op runs on data of the tested dtype; the reference is the CPU op on the same values in float64. The
GPU tests need a CUDA device and an extension built with the CUDA kernels, and are skipped otherwise; the
registration test runs wherever a CUDA toolkit is present, GPU or not, and fails if the build dropped CUDA.
These tests import fused_resnet._C directly and use the ops through torch.ops.fused_resnet.
"""

import itertools
import math
import os
import re
import shutil

import pytest
import torch

import fused_resnet._C as _C

ops = torch.ops.fused_resnet
OPS = ("batch_stats", "bn_act", "bn_act_backward_reduce", "bn_act_backward_elemt")


def _cuda_toolkit_present():
    return shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))


@pytest.mark.skipif(not _cuda_toolkit_present(), reason="no CUDA toolkit (no nvcc on PATH, CUDA_HOME unset)")
@pytest.mark.skipif(os.environ.get("FUSED_RESNET_BUILD_CUDA") == "0",
                    reason="FUSED_RESNET_BUILD_CUDA=0 asks for a CPU-only build")
def test_cuda_kernels_built_and_registered():
    assert _C.built_with_cuda, (
        "a CUDA toolkit is present but fused_resnet._C was built without the CUDA kernels "
        "(see the 'fused_resnet setup:' lines of the build log)")
    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_resnet::{op}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for {missing}"


if not _C.built_with_cuda:
    _gpu_skip_reason = "fused_resnet._C was built without the CUDA kernels"
elif not torch.cuda.is_available():
    _gpu_skip_reason = "no CUDA device"
else:
    _gpu_skip_reason = None
requires_gpu = pytest.mark.skipif(_gpu_skip_reason is not None, reason=_gpu_skip_reason or "")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ACC = {torch.float32: torch.float32, torch.float16: torch.float32, torch.bfloat16: torch.float32,
       torch.float64: torch.float64}
# Relative error allowed by an output's dtype: rounding to it (half an ulp) plus the accumulation's error.
OUT_TOL = {torch.float32: 1e-5, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float64: 1e-12}
# Error of the accumulation type (fp32 for fp16/bf16/fp32, fp64 for fp64), relative to the size of the terms.
ACC_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}

# Shapes: odd channel counts and planes (no 16-byte vectors), vectorizable ones, HW = 1, N = 1, and sizes that
# split each layout's reduction into several chunks: NCHW runs of whole planes (16x4x32x32), NCHW segments of
# one plane (1x2x96x96), many NHWC row tiles (8x67x7x9, 4x64x56x56), several 256-channel NHWC slices.
SHAPES = [
    (2, 3, 7, 9),
    (1, 67, 7, 9),
    (8, 67, 7, 9),
    (4, 64, 8, 8),
    (3, 16, 1, 1),
    (5, 96, 5, 5),
    (16, 4, 32, 32),
    (1, 2, 96, 96),
    (2, 512, 14, 14),
    (4, 64, 56, 56),
]
# Which activations of a call are offset by one element from a 16-byte boundary: none, all, or only the second
# (the kernels must fall back to single elements when any pointer is misaligned). Tensors fresh from the caching
# allocator (outputs, workspaces) are always aligned; the inputs here are views with a storage offset.
ALIGNMENTS = ["aligned", "misaligned", "one_misaligned"]


def _ids(values):
    return ["x".join(map(str, v)) if isinstance(v, tuple) else str(v).replace("torch.", "") for v in values]


def _activation(shape, dtype, channels_last, offset, gen, scale=1.0, mean=0.0):
    """Random values of `dtype`, dense in NCHW or channels_last, `offset` elements into a fresh CUDA buffer."""
    N, C, H, W = shape
    values = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + mean).to(dtype)
    strides = (H * W * C, 1, W * C, C) if channels_last else (C * H * W, H * W, W, 1)
    buffer = torch.empty(math.prod(shape) + offset, dtype=dtype, device="cuda")
    t = buffer.as_strided(shape, strides, storage_offset=offset)
    t.copy_(values)
    assert (t.data_ptr() % 16 == 0) == (offset == 0)
    return t


def _activations(count, shape, dtype, channels_last, alignment, gen, **kwargs):
    offsets = {"aligned": [0] * count, "misaligned": [1] * count, "one_misaligned": [0, 1] + [0] * (count - 2)}
    return [_activation(shape, dtype, channels_last, off, gen, **kwargs) for off in offsets[alignment][:count]]


def _channel(C, dtype, gen, scale=1.0):
    return (torch.randn(C, generator=gen, dtype=torch.float64) * scale).to(ACC[dtype]).cuda()


def _ref(t):
    """The CPU float64 copy of a tensor (None stays None) for the reference op."""
    return None if t is None else t.detach().cpu().double()


def _assert_close(actual, expected, out_tol, abs_tol, what):
    """|actual - expected| <= out_tol * |expected| + abs_tol elementwise (abs_tol: a tensor or a number)."""
    actual = actual.detach().cpu().double()
    err = (actual - expected).abs()
    bound = out_tol * expected.abs() + abs_tol
    bad = ~(err <= bound)  # NaN in actual counts as bad
    if bad.any():
        index = tuple(bad.nonzero()[0].tolist())
        pytest.fail(f"{what}: {int(bad.sum())} of {bad.numel()} elements off, e.g. at {index}: got "
                    f"{actual[index].item()!r}, expected {expected[index].item()!r} (allowed error {bound[index].item():.3g})")


def _bcast(v):
    return v.view(1, -1, 1, 1)


def _check_layout(out, like, dtype):
    assert out.dtype == dtype and out.shape == like.shape and out.device == like.device
    fmt = torch.channels_last if like.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


def _acc_tol(dtype):
    return ACC_TOL[ACC[dtype]]


# ---------------------------------------------------------------------------------------------------------------
# Forward


@requires_gpu
@pytest.mark.parametrize("alignment", ["aligned", "misaligned"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_batch_stats(shape, dtype, channels_last, alignment):
    gen = torch.Generator().manual_seed(1)
    (x,) = _activations(1, shape, dtype, channels_last, alignment, gen, scale=2.0, mean=0.5)
    mean, var = ops.batch_stats(x)
    ref_mean, ref_var = ops.batch_stats(_ref(x))
    for got in (mean, var):
        assert got.dtype == ACC[dtype] and got.device == x.device and got.shape == (shape[1],)
    tol = _acc_tol(dtype)
    _assert_close(mean, ref_mean, tol, tol * ref_var.sqrt(), "mean")
    _assert_close(var, ref_var, tol, 0.0, "var")


@requires_gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(8, 16, 32, 32), (2, 67, 7, 9), (1, 3, 96, 96)], ids=_ids)
def test_batch_stats_large_mean_keeps_variance(shape, channels_last):
    # fp32 values around 1e4 with spread 1: a sum of squares would cancel to noise of order 1e8 * 2^-24 ~ 6, and
    # running means of the values themselves (precise to ~1e-3 at 1e4) would leave errors of ~1e-3 in the variance.
    gen = torch.Generator().manual_seed(2)
    x = _activation(shape, torch.float32, channels_last, 0, gen, scale=1.0, mean=1e4)
    mean, var = ops.batch_stats(x)
    ref_mean, ref_var = ops.batch_stats(_ref(x))
    _assert_close(mean, ref_mean, 1e-7, 0.0, "mean")
    _assert_close(var, ref_var, 1e-5, 0.0, "var")


@requires_gpu
@pytest.mark.parametrize("alignment", ALIGNMENTS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_bn_act(shape, dtype, channels_last, alignment):
    gen = torch.Generator().manual_seed(3)
    C = shape[1]
    x, residual = _activations(2, shape, dtype, channels_last, alignment, gen)
    scale, shift, residual_scale, residual_shift = (_channel(C, dtype, gen) for _ in range(4))
    for kind, relu in itertools.product(["none", "identity", "affine"], [False, True]):
        res = None if kind == "none" else residual
        rs, rb = (residual_scale, residual_shift) if kind == "affine" else (None, None)
        out = ops.bn_act(x, scale, shift, res, rs, rb, relu)
        _check_layout(out, x, dtype)
        expected = ops.bn_act(_ref(x), _ref(scale), _ref(shift), _ref(res), _ref(rs), _ref(rb), relu)
        # The size of the terms, for the accumulation's error where they cancel.
        terms = (_ref(x) * _bcast(_ref(scale))).abs() + _bcast(_ref(shift)).abs()
        if kind == "identity":
            terms = terms + _ref(res).abs()
        if kind == "affine":
            terms = terms + (_ref(res) * _bcast(_ref(rs))).abs() + _bcast(_ref(rb)).abs()
        _assert_close(out, expected, OUT_TOL[dtype], _acc_tol(dtype) * terms, f"bn_act residual={kind} relu={relu}")


@requires_gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("case", [((2, 32, 8, 8), 16, 2, 8), ((3, 16, 5, 4), 8, 2, 3), ((2, 10, 3, 3), 7, 3, 0),
                                  ((1, 24, 4, 4), 8, 2, 16), ((2, 64, 32, 32), 32, 2, 16)], ids=str)
def test_bn_act_with_a_zero_padded_residual(case, dtype, channels_last):
    """Option A's residual (subsampled by `stride`, zero-padded around its channels) against the CPU op."""
    gen = torch.Generator().manual_seed(5)
    (N, C, H, W), res_channels, stride, before = case
    x = _activation((N, C, H, W), dtype, channels_last, 0, gen)
    residual = _activation((N, res_channels, H * stride, W * stride), dtype, channels_last, 0, gen)
    scale, shift = _channel(C, dtype, gen), _channel(C, dtype, gen)
    for relu in (False, True):
        out = ops.bn_act(x, scale, shift, residual, None, None, relu, stride, before)
        _check_layout(out, x, dtype)
        expected = ops.bn_act(_ref(x), _ref(scale), _ref(shift), _ref(residual), None, None, relu, stride, before)
        terms = (_ref(x) * _bcast(_ref(scale))).abs() + _bcast(_ref(shift)).abs() + 1.0
        _assert_close(out, expected, OUT_TOL[dtype], _acc_tol(dtype) * terms, f"padded residual relu={relu}")


@requires_gpu
def test_bn_act_relu_keeps_nan_and_zeroes_negatives():
    x = torch.tensor([float("nan"), -1.0, 0.0, 2.0], device="cuda").view(1, 4, 1, 1).expand(2, 4, 3, 3).contiguous()
    one, zero = torch.ones(4, device="cuda"), torch.zeros(4, device="cuda")
    out = ops.bn_act(x, one, zero, None, None, None, True)
    assert out[:, 0].isnan().all()
    assert (out[:, 1:3] == 0).all() and (out[:, 3] == 2).all()


# ---------------------------------------------------------------------------------------------------------------
# Backward


@requires_gpu
@pytest.mark.parametrize("alignment", ALIGNMENTS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_bn_act_backward_reduce(shape, dtype, channels_last, alignment):
    gen = torch.Generator().manual_seed(4)
    C = shape[1]
    grad, x, output, x2 = _activations(4, shape, dtype, channels_last, alignment, gen)
    mean, mean2 = _channel(C, dtype, gen), _channel(C, dtype, gen)
    for with_output, with_second in itertools.product([False, True], [False, True]):
        out_arg = output if with_output else None
        x2_arg, mean2_arg = (x2, mean2) if with_second else (None, None)
        sums = ops.bn_act_backward_reduce(grad, out_arg, x, mean, x2_arg, mean2_arg)
        expected = ops.bn_act_backward_reduce(_ref(grad), _ref(out_arg), _ref(x), _ref(mean), _ref(x2_arg),
                                              _ref(mean2_arg))
        gm = _ref(grad) * (_ref(output) > 0) if with_output else _ref(grad)
        magnitudes = [gm.abs().sum((0, 2, 3)), (gm * (_ref(x) - _bcast(_ref(mean)))).abs().sum((0, 2, 3))]
        if with_second:
            magnitudes.append((gm * (_ref(x2) - _bcast(_ref(mean2)))).abs().sum((0, 2, 3)))
        else:
            assert sums[2].numel() == 0
        for name, got, want, magnitude in zip(["sum_dy", "sum_dy_xmu", "sum_dy_xmu2"], sums, expected, magnitudes):
            assert got.dtype == ACC[dtype] and got.device == x.device and got.shape == (C,)
            _assert_close(got, want, 0.0, _acc_tol(dtype) * magnitude,
                          f"{name} output={with_output} input2={with_second}")


@requires_gpu
@pytest.mark.parametrize("alignment", ALIGNMENTS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
def test_bn_act_backward_elemt(shape, dtype, channels_last, alignment):
    gen = torch.Generator().manual_seed(5)
    C = shape[1]
    grad, x, output, x2 = _activations(4, shape, dtype, channels_last, alignment, gen)
    mean, k_dy, k_xmu, k_0, mean2, k2_dy, k2_xmu, k2_0 = (_channel(C, dtype, gen) for _ in range(8))
    cases = [(o, False, rg) for o in (False, True) for rg in (False, True)] + [(o, True, False) for o in (False, True)]
    for with_output, with_second, residual_grad in cases:
        out_arg = output if with_output else None
        second = (x2, mean2, k2_dy, k2_xmu, k2_0) if with_second else (None,) * 5
        args = (grad, out_arg, x, mean, k_dy, k_xmu, k_0, *second, residual_grad)
        grad_input, grad_other = ops.bn_act_backward_elemt(*args)
        expected = ops.bn_act_backward_elemt(*[_ref(a) if isinstance(a, torch.Tensor) else a for a in args])
        what = f"output={with_output} input2={with_second} residual_grad={residual_grad}"
        _check_layout(grad_input, x, dtype)
        gm = _ref(grad) * (_ref(output) > 0) if with_output else _ref(grad)
        terms = (gm * _bcast(_ref(k_dy))).abs() + ((_ref(x) - _bcast(_ref(mean))) * _bcast(_ref(k_xmu))).abs()
        terms = terms + _bcast(_ref(k_0)).abs()
        _assert_close(grad_input, expected[0], OUT_TOL[dtype], _acc_tol(dtype) * terms, f"grad_input {what}")
        if with_second:
            terms2 = (gm * _bcast(_ref(k2_dy))).abs() + ((_ref(x2) - _bcast(_ref(mean2))) * _bcast(_ref(k2_xmu))).abs()
            terms2 = terms2 + _bcast(_ref(k2_0)).abs()
            _check_layout(grad_other, x, dtype)
            _assert_close(grad_other, expected[1], OUT_TOL[dtype], _acc_tol(dtype) * terms2, f"grad_other {what}")
        elif residual_grad:
            _check_layout(grad_other, x, dtype)
            _assert_close(grad_other, expected[1], 0.0, 0.0, f"grad_other {what}")
        else:
            assert grad_other.numel() == 0 and grad_other.dtype == dtype and grad_other.device == x.device


@requires_gpu
def test_backward_mask_is_threshold_backward():
    # gm = grad where output > 0: zero for output <= 0 (0 and -0 included), grad for NaN output.
    output = torch.tensor([float("nan"), -1.0, -0.0, 0.0, 1e-30, 3.0], device="cuda").view(1, 6, 1, 1)
    output = output.expand(2, 6, 2, 2).contiguous()
    grad = torch.full_like(output, 2.0)
    x = torch.zeros_like(output)
    zeros = torch.zeros(6, device="cuda")
    sum_dy, _, _ = ops.bn_act_backward_reduce(grad, output, x, zeros, None, None)
    assert sum_dy.tolist() == [16.0, 0.0, 0.0, 0.0, 16.0, 16.0]
    _, gm = ops.bn_act_backward_elemt(grad, output, x, zeros, zeros, zeros, zeros, None, None, None, None, None, True)
    assert torch.equal(gm, torch.ops.aten.threshold_backward(grad, output, 0))


# ---------------------------------------------------------------------------------------------------------------
# Determinism, non-dense inputs, 64-bit indexing


@requires_gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_reductions_are_deterministic(dtype, channels_last):
    gen = torch.Generator().manual_seed(6)
    shape = (32, 64, 28, 28)
    grad, x, output, x2 = _activations(4, shape, dtype, channels_last, "aligned", gen)
    mean, mean2 = _channel(64, dtype, gen), _channel(64, dtype, gen)
    first = ops.batch_stats(x) + ops.bn_act_backward_reduce(grad, output, x, mean, x2, mean2)
    for _ in range(3):
        again = ops.batch_stats(x) + ops.bn_act_backward_reduce(grad, output, x, mean, x2, mean2)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@requires_gpu
def test_non_dense_inputs_are_made_dense():
    gen = torch.Generator().manual_seed(7)
    base = _activation((4, 6, 10, 12), torch.float32, False, 0, gen)
    x = base[:, :, ::2, 1:]  # strided view: neither NCHW- nor channels_last-contiguous
    scale, shift = _channel(6, torch.float32, gen), _channel(6, torch.float32, gen)
    out = ops.bn_act(x, scale, shift, None, None, None, True)
    _assert_close(out, ops.bn_act(_ref(x), _ref(scale), _ref(shift), None, None, None, True), 1e-6, 1e-6, "bn_act")
    mean, var = ops.batch_stats(x)
    ref_mean, ref_var = ops.batch_stats(_ref(x))
    _assert_close(mean, ref_mean, 1e-5, 1e-6, "mean")
    _assert_close(var, ref_var, 1e-5, 0.0, "var")


@requires_gpu
@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_more_than_2_31_elements(channels_last):
    shape = (1025, 64, 128, 256)  # 2^31 + 2^21 elements, 4.3 GB in fp16: element 2^31 starts image 1024
    need = 2 * math.prod(shape) * 2 + (4 << 30)
    if torch.cuda.get_device_properties(0).total_memory < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of GPU memory")
    torch.manual_seed(8)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(shape, device="cuda", dtype=torch.float16, memory_format=fmt).normal_()
    scale, shift = torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
    out = ops.bn_act(x, scale, shift, None, None, None, False)
    for n in (0, 1023, 1024):
        expected = (x[n].float() * scale.view(-1, 1, 1) + shift.view(-1, 1, 1)).half()
        assert torch.allclose(out[n].float(), expected.float(), rtol=2 ** -10, atol=1e-3), n
    del out
    mean, var = ops.batch_stats(x)
    for c in range(0, 64, 8):  # the reference in fp32, 8 channels (1 GiB) at a time
        ref_var, ref_mean = torch.var_mean(x[:, c:c + 8].float(), dim=(0, 2, 3), correction=0)
        assert torch.allclose(mean[c:c + 8], ref_mean, rtol=0, atol=1e-5)
        assert torch.allclose(var[c:c + 8], ref_var, rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Argument checks: the CPU ops' checks and messages, plus the device of every tensor


def _cpu_error(fn, *args):
    try:
        fn(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    except RuntimeError as e:
        return str(e).splitlines()[0]
    pytest.fail("the CPU op accepted the arguments")


@requires_gpu
def test_argument_errors_match_the_cpu_ops():
    x = torch.randn(2, 3, 4, 4, device="cuda")
    v = torch.ones(3, device="cuda")
    cases = [
        (ops.bn_act, (x[0], v, v, None, None, None, True), "fused_resnet::bn_act: expected input to be 4-D"),
        (ops.bn_act, (x.int(), v, v, None, None, None, True), "expected input to be a floating-point tensor"),
        (ops.bn_act, (x[:, :0], v[:0], v[:0], None, None, None, True), "expected a non-empty input"),
        (ops.bn_act, (x, v[:2], v, None, None, None, True), "fused_resnet::bn_act: expected scale to be a vector of 3"),
        (ops.bn_act, (x, v, v, x.half(), None, None, True), "fused_resnet::bn_act: expected residual of dtype"),
        (ops.bn_act, (x, v, v, x[:1], None, None, True), "fused_resnet::bn_act: expected residual of shape"),
        (ops.bn_act, (x, v, v, x, v, None, True), "residual_scale and residual_shift must be given together"),
        (ops.bn_act, (x, v, v, None, v, v, True), "residual_scale given without a residual"),
        (ops.batch_stats, (x.view(2, 3, 16),), "fused_resnet::batch_stats: expected input to be 4-D"),
        (ops.bn_act_backward_reduce, (x, None, x, v, x, None), "input2 and mean2 must be given together"),
        (ops.bn_act_backward_reduce, (x.double(), None, x, v, None, None),
         "fused_resnet::bn_act_backward_reduce: expected grad_output of dtype"),
        (ops.bn_act_backward_reduce, (x, x, x, v.view(3, 1), None, None),
         "fused_resnet::bn_act_backward_reduce: expected mean to be a vector of 3"),
        (ops.bn_act_backward_elemt, (x, None, x, v, v, v, v, x, v, v, v, None, False),
         "input2, mean2 and the coef2_* tensors must be given together"),
        (ops.bn_act_backward_elemt, (x, None, x, v, v, v, v, x, v, v, v, v, True),
         "residual_grad and input2 are exclusive"),
        (ops.bn_act_backward_elemt, (x, x[:, :2], x, v, v, v, v, None, None, None, None, None, False),
         "fused_resnet::bn_act_backward_elemt: expected output of shape"),
    ]
    for fn, args, message in cases:
        with pytest.raises(RuntimeError, match=re.escape(message)) as info:
            fn(*args)
        assert str(info.value).splitlines()[0] == _cpu_error(fn, *args)


@requires_gpu
def test_tensors_on_other_devices_are_rejected():
    x = torch.randn(2, 3, 4, 4, device="cuda")
    v = torch.ones(3, device="cuda")
    with pytest.raises(RuntimeError, match=r"fused_resnet::bn_act: expected scale on cuda:0, got cpu"):
        ops.bn_act(x, v.cpu(), v, None, None, None, True)
    with pytest.raises(RuntimeError, match=r"fused_resnet::bn_act: expected residual on cuda:0, got cpu"):
        ops.bn_act(x, v, v, x.cpu(), None, None, True)
    with pytest.raises(RuntimeError, match=r"fused_resnet::bn_act: expected input on a CUDA device, got cpu"):
        ops.bn_act(x.cpu(), v, v, None, None, None, True)
    with pytest.raises(RuntimeError, match=r"fused_resnet::bn_act_backward_reduce: expected mean on cuda:0, got cpu"):
        ops.bn_act_backward_reduce(x, None, x, v.cpu(), None, None)
    with pytest.raises(RuntimeError, match=r"fused_resnet::bn_act_backward_elemt: expected coef2_const on cuda:0"):
        ops.bn_act_backward_elemt(x, None, x, v, v, v, v, x, v, v, v, v.cpu(), False)
