"""Numerical robustness of the fused ops on every available backend, through the public ops: BatchNorm statistics
stay accurate when a channel's mean dwarfs its spread, huge float16/bfloat16 values give no inf or NaN where
PyTorch gives a number, tiny (1e-30) values keep their relative precision, and a constant channel (zero variance)
normalizes with eps alone.

The large-mean test proves its power: the same check applied to statistics from a naive fp32 sum and sum of
squares fails it by orders of magnitude. Statistics are observed through the running statistics of a training
step with momentum 1 (running_mean = the batch mean, running_var = the unbiased batch variance)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_resnet
from conftest import CPU_TENSOR_BACKENDS, rel_err, to_layout
from fused_resnet import ops
from fused_resnet.kernels import kernels_for
from fused_resnet.modules import conv_bn
from fused_resnet.params import ConvParams

BACKENDS = CPU_TENSOR_BACKENDS


def batch_stats_through_op(x: torch.Tensor, backend: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, batch mean, unbiased batch variance) of one training step of batch_norm_act, read back from the
    running statistics (momentum 1 replaces them)."""
    c = x.shape[1]
    running_mean = torch.randn(c, dtype=torch.float32) + 3.0
    running_var = torch.rand(c, dtype=torch.float32) + 2.0
    out = ops.batch_norm_act(x, running_mean, running_var, training=True, momentum=1.0, backend=backend, **kwargs)
    return out, running_mean, running_var


def naive_fp32_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance from one fp32 sum and sum of squares per channel: E[x^2] - E[x]^2 cancels."""
    x = x.float()
    count = x.numel() // x.shape[1]
    s, ss = x.sum((0, 2, 3)), (x * x).sum((0, 2, 3))
    mean = s / count
    return mean, (ss / count - mean * mean) * (count / (count - 1))


# Channel mean 1e4 with spread 0.1: in fp32, E[x^2] = 1e8 has an ulp of 8, 800 times the variance (0.01), and the
# naive variance is off by ~1e3 (relative). The fused backends must keep it within 1e-4 (the CPU kernels reach
# ~1e-7); the torch backend is PyTorch's own batch_norm, whose channels_last reduction reaches ~1e-3.
LARGE_MEAN, SMALL_STD = 1e4, 1e-1


def var_tol(backend: str) -> float:
    return 1e-2 if backend == "torch" else 1e-4




def output_tol(backend: str) -> float:
    """The torch backend's output error (PyTorch's batch_norm): 1.4e-3 in NCHW but up to 2.4e-2 in channels_last,
    where its statistics are less accurate. The naive statistics give errors near 20. The fused backends are held to
    the error of their own statistics instead (test_large_mean_keeps_statistics_and_output_accurate)."""
    return 5e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_mean_keeps_statistics_and_output_accurate(backend, channels_last):
    shape = (8, 5, 16, 16)
    x = to_layout((torch.randn(shape, dtype=torch.float64) * SMALL_STD + LARGE_MEAN).float(), channels_last)
    exact = x.double()  # the statistics of the rounded input are what an exact reduction would give
    exact_mean, exact_var = exact.mean((0, 2, 3)), exact.var((0, 2, 3))
    expected = F.batch_norm(exact, None, None, training=True)

    out, mean, var = batch_stats_through_op(x, backend, relu=False)
    assert rel_err(mean, exact_mean) <= 1e-6
    assert rel_err(var, exact_var) <= var_tol(backend), f"variance error {rel_err(var, exact_var):.2e}"
    out_err = rel_err(out, expected)
    if backend == "torch":
        assert out_err <= output_tol(backend), f"output error {out_err:.2e}"
    else:
        # The fused backends normalize centered, (y - mean) * scale + bias: y - mean is exact here (Sterbenz), so the
        # output is as accurate as the fp32 statistics it normalized with (their mean's rounding, ulp(1e4)/2 against
        # a spread of 0.1, is ~3e-3 of the output), plus roundings of O(1) values: at most 1e-9 more, measured over
        # 60 seeds on cpu and triton. The folded form y * scale + (bias - mean * scale) added the rounding of
        # mean * scale = 1e5: 1.7e-3 to 3e-3 more.
        count = x.numel() // x.shape[1]
        with_their_stats = F.batch_norm(exact, mean.double(), var.double() * (count - 1) / count, training=False)
        floor = rel_err(with_their_stats, expected)
        assert out_err <= floor + 1e-7, f"output error {out_err:.3e}, that of the statistics {floor:.3e}"

    # The same checks fail on statistics from a naive fp32 sum of squares: the test can tell them apart.
    naive_mean, naive_var = naive_fp32_stats(x)
    naive_out = F.batch_norm(x, naive_mean, naive_var.clamp_min(0), training=False)
    assert rel_err(naive_var, exact_var) > 100 * var_tol("torch")
    assert rel_err(naive_out, expected) > 10 * output_tol("torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_from_a_convolution_bias_inside_a_block(backend):
    """A conv bias of ~1e4 makes the BN after it see a large mean. The conv output itself is rounded to fp32
    (an ulp of 1e-3 against a spread of ~3), which no BN can undo: outputs and gradients are judged against
    PyTorch's own fp32 conv + BatchNorm, by their error from the float64 computation, the statistics (running stats
    after a step with momentum 1) against the float64 ones. The output within 1.05x of PyTorch's error (+1e-6): the
    centered form (y - mean) * scale + bias gave at most 1.021x on an AVX2 CPU's cpu backend (the same convolution as
    PyTorch's), 0.32x on triton (its own convolution and statistics), over 190 seeds; the folded
    y * scale + (bias - mean * scale) reached 1.14x (the conv output's rounding dominates both), so the fused
    backends' normalization is also judged alone. Gradients (which normalize with y - mean in every form) within 1.2x
    (+2e-5): measured up to 1.16x (triton's BN weight), and up to 3x of PyTorch's ~1e-5 on triton's conv bias, zero in
    exact arithmetic. Where PyTorch's convolution comes close to the unavoidable rounding of its output (an AVX-512
    CPU), each result may instead be within 2.5x of that floor (below)."""
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6, momentum=1.0)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape))
        conv.bias.copy_(torch.rand(6) * 1e4 + 5e3)
        bn.weight.copy_(torch.rand(6) + 0.5)
        bn.bias.copy_(torch.randn(6))
    x = torch.randn(4, 4, 9, 9)
    g = torch.randn(4, 6, 9, 9)
    # The output's fp32 rounding is ~3e-4 here (y*scale and shift are ~5e3 each), so a ReLU input within that of 0
    # may flip on either fp32 path, and its gradient with it (a flip on the triton backend: grad input 1.5e-2 off).
    # No gradient flows back from those few positions: the rest is judged.
    with torch.no_grad():
        pre_relu = copy.deepcopy(bn).double()(copy.deepcopy(conv).double()(x.double()))
    g = torch.where(pre_relu.abs() < 1e-3, 0.0, g)

    def step(conv, bn, x, g, fused, round_conv_output=False):
        x = x.clone().requires_grad_()
        if fused:
            out = ops.conv_bn_relu(x, conv_bn(conv, bn, "conv/bn"), backend=backend)
        else:
            y = conv(x)
            if round_conv_output:  # rounded to fp32 on the way forward, gradients straight through
                y = y + (y.float().to(y.dtype) - y).detach()
            out = torch.relu(bn(y))
        out.backward(g)
        return [out, x.grad, conv.weight.grad, conv.bias.grad, bn.weight.grad, bn.bias.grad], bn

    ours, bn_ours = step(conv, bn, x, g, True)
    # On the cpu backend PyTorch's in channels_last, the layout the backend convolves in, so that both paths run the
    # same convolution: on an AVX-512 CPU oneDNN's channels_last kernels round differently from its NCHW ones, and
    # against PyTorch's NCHW path the fused output measured up to 1.41x its error (3 seeds in ~25 over 1.05x).
    layout = torch.channels_last if backend == "cpu" else torch.contiguous_format
    theirs, _ = step(copy.deepcopy(conv), copy.deepcopy(bn), x.contiguous(memory_format=layout), g, False)
    exact, bn_exact = step(copy.deepcopy(conv).double(), copy.deepcopy(bn).double(), x.double(), g.double(), False)
    assert rel_err(bn_ours.running_mean, bn_exact.running_mean) <= 1e-6
    assert rel_err(bn_ours.running_var, bn_exact.running_var) <= var_tol(backend)
    if backend != "torch":
        # The normalization alone: the output against its own convolution's fp32 output y (the kernel set's, as the
        # block ran it) normalized in float64 with the fp32 statistics it computed of y. The centered form stays
        # within 1.2e-7 of it (37 seeds, cpu and triton); the folded y * scale + (bias - mean * scale), whose shift
        # is a rounded ~5e3, was 1.3e-5 to 8e-5 off.
        with torch.no_grad():
            y = kernels_for(backend).conv_stats(x, ConvParams(conv.weight, conv.bias, padding=(1, 1)), True)[0]
            count = y.numel() // y.shape[1]
            normalized = torch.relu(F.batch_norm(
                y.double(), bn_ours.running_mean.double(), bn_ours.running_var.double() * (count - 1) / count,
                bn.weight.double(), bn.bias.double(), training=False))
        norm_err = rel_err(ours[0], normalized)
        assert norm_err <= 1e-6, f"output error {norm_err:.2e} from its own convolution output, normalized exactly"
    # No fp32 path can be closer than the conv output's own rounding allows: the float64 step with the convolution's
    # output rounded once to fp32 (straight through, the gradients exact). Any fp32 convolution also rounds inside its
    # sum, about as much again (the fused output measured 1.01-1.88x this floor over 1,500 seeds, median 1.39 ~
    # sqrt(2)); PyTorch's, where its convolution sums more exactly, came within 1.06x of it, and two such draws of
    # rounding noise differ by more than the ratios below (the triton backend's output against PyTorch's NCHW
    # convolution on an AVX-512 CPU: over 1.05x in 22 seeds of 150; the cpu backend's BN weight gradient 1.85x in 1
    # of 300). Each result is within its ratio of PyTorch's error or 2.5x this floor.
    floor_step, _ = step(copy.deepcopy(conv).double(), copy.deepcopy(bn).double(), x.double(), g.double(), False,
                         round_conv_output=True)
    names = ["output", "grad input", "grad conv weight", "grad conv bias", "grad bn weight", "grad bn bias"]
    for what, a, t, e, f in zip(names, ours, theirs, exact, floor_step):
        # The conv bias gradient is 0 in exact arithmetic (the BN removes any shift): judged against g's scale.
        floor = g.norm().item()
        ours_err, theirs_err = rel_err(a, e, floor if what == "grad conv bias" else 0.0), \
            rel_err(t, e, floor if what == "grad conv bias" else 0.0)
        rounding_floor = rel_err(f, e, floor if what == "grad conv bias" else 0.0)
        ratio, slack = (1.05, 1e-6) if what == "output" else (1.2, 2e-5)
        assert ours_err <= max(ratio * theirs_err + slack, 2.5 * rounding_floor), \
            f"{what}: error {ours_err:.3e}, PyTorch's {theirs_err:.3e}, fp32 rounding floor {rounding_floor:.3e}"


def pytorch_batch_norm(x, weight, bias, residual, relu):
    """PyTorch's own path in the input's dtype (F.batch_norm accumulates reduced precision in fp32 too)."""
    out = F.batch_norm(x, None, None, weight, bias, training=True)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def run_with_grad(fn, x, weight, bias, residual, grad):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias, residual)]
    out = fn(*leaves)
    out.backward(grad)
    return out, *(t.grad if t is not None else None for t in leaves)


# (dtype, centre, spread): values whose squares overflow the dtype itself (fp16 max 65504; bf16: E[x^2] of 1e18
# nears fp32's 3.4e38), and bf16 values whose variance overflows fp32, where PyTorch's output is finite (zero: an
# infinite variance). The fused ops must give no inf/NaN where PyTorch gives a number.
HUGE = [(torch.float16, 3e4, 1e4), (torch.float16, 6e4, 2e3), (torch.bfloat16, 1e18, 5e17),
        (torch.bfloat16, 3e19, 1e19)]
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", HUGE, ids=[f"{d}-{c:g}" for d, c, _ in HUGE])
@pytest.mark.parametrize("residual", [False, True])
def test_huge_values_give_no_inf_where_pytorch_gives_none(backend, case, residual):
    """The bf16 spread of 5e17 once made ops.batch_norm.backward_coefs form invstd^3 = 8e-54, which underflowed
    fp32 to 0 and dropped the variance term of the input gradient (errors 4-8e-2 against PyTorch's 3e-3)."""
    dtype, centre, spread = case
    limit = torch.finfo(dtype).max
    x = (torch.randn(4, 6, 7, 5, dtype=torch.float64) * spread + centre).clamp(-limit, limit).to(dtype)
    weight, bias = (torch.rand(6) + 0.5).to(dtype), torch.randn(6).to(dtype)
    # A residual near the dtype's maximum: adding the normalized values may overflow, in PyTorch as here.
    r = ((torch.rand(x.shape, dtype=torch.float64) * 0.5 + 0.5) * limit * 0.999).to(dtype) if residual else None
    grad = torch.randn(x.shape).to(dtype)

    # Without the ReLU: which values a bf16 ReLU zeroes differs between paths and would blur the comparison.
    ours = run_with_grad(lambda x, w, b, r: ops.batch_norm_act(x, None, None, w, b, True, residual=r, relu=False,
                                                               backend=backend), x, weight, bias, r, grad)
    theirs = run_with_grad(lambda x, w, b, r: pytorch_batch_norm(x, w, b, r, False), x, weight, bias, r, grad)
    exact = run_with_grad(lambda x, w, b, r: pytorch_batch_norm(x, w, b, r, False), x.double(), weight.double(),
                          bias.double(), r.double() if r is not None else None, grad.double())
    for what, a, t, e in zip(("output", "grad input", "grad weight", "grad bias", "grad residual"), ours, theirs, exact):
        if t is None:
            continue
        assert a.dtype == dtype, what
        extra = ~a.isfinite() & t.isfinite()
        assert not extra.any(), f"{what}: {int(extra.sum())} inf/NaN where PyTorch gives a number"
        if t.isfinite().all():
            ours_err, theirs_err = rel_err(a, e), rel_err(t, e)
            assert ours_err <= 2 * theirs_err + 2 * torch.finfo(dtype).eps, \
                f"{what}: error {ours_err:.2e}, PyTorch's {theirs_err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_tiny_values_keep_their_relative_precision(backend, channels_last):
    """Values of 1e-30 (normal fp32; their variance, 1e-60, underflows to 0 and eps alone normalizes): outputs
    and gradients as accurate as for values of order 1. Without the affine transform the output is the tiny
    normalized value itself, so a kernel that flushed or lost it could not pass."""
    x = to_layout((torch.randn(4, 5, 7, 6, dtype=torch.float64) * 1e-30 + 2e-30).float(), channels_last)
    grad = torch.randn(x.shape)
    x_leaf = x.clone().requires_grad_()
    out = ops.batch_norm_act(x_leaf, None, None, training=True, relu=False, backend=backend)
    out.backward(grad)
    x64 = x.double().requires_grad_()
    ref = F.batch_norm(x64, None, None, training=True)
    ref.backward(grad.double())
    assert ref.abs().max() < 1e-26 and (ref != 0).all()
    assert rel_err(out, ref) <= 2e-5
    assert rel_err(x_leaf.grad, x64.grad) <= 2e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_constant_channel_normalizes_with_eps_alone(backend, dtype):
    """Zero variance: every value of a channel the same (random constants, one per channel). The output is the
    BN bias (plus the rounding of the mean, which 1/sqrt(eps) magnifies; PyTorch's own path has it too), the
    gradients finite, and the running variance moves toward 0."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton backend has no float64")
    c = 5
    constants = torch.randn(c, dtype=torch.float64) * 10
    x = constants.view(1, c, 1, 1).expand(4, c, 6, 7).contiguous().to(dtype)
    weight, bias = (torch.rand(c) + 0.5).to(dtype), torch.randn(c).to(dtype)
    grad = torch.randn(x.shape).to(dtype)
    running_mean, running_var = torch.randn(c).to(dtype), (torch.rand(c) + 1).to(dtype)
    old_var = running_var.clone()

    def fused(x, w, b, r):
        return ops.batch_norm_act(x, running_mean, running_var, w, b, True, 0.5, 1e-5, relu=False, backend=backend)

    ours = run_with_grad(fused, x, weight, bias, None, grad)
    theirs = run_with_grad(lambda x, w, b, r: pytorch_batch_norm(x, w, b, None, False), x, weight, bias, None, grad)
    exact = run_with_grad(lambda x, w, b, r: pytorch_batch_norm(x, w, b, None, False), x.double(), weight.double(),
                          bias.double(), None, grad.double())
    # The mean of a constant rounds by a few ulps of the accumulation type (fp64 for fp64, else fp32); 1/sqrt(eps)
    # magnifies that in y - mean: the slack for a path that rounds where PyTorch's happens to be exact.
    accumulation_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    slack = 16 * accumulation_eps * constants.abs().max().item() / 1e-5 ** 0.5 + 2 * torch.finfo(dtype).eps
    for what, a, t, e in zip(("output", "grad input", "grad weight", "grad bias"), ours, theirs, exact):
        assert a.isfinite().all(), f"{what}: not finite"
        # Errors per element of the natural scale: a normalized output is O(1) per value, and the weight's
        # gradient (0 here: x - mean is) sums the output gradient times O(1) normalized values.
        floor = x.numel() ** 0.5 if what == "output" else grad.double().norm().item()
        ours_err, theirs_err = rel_err(a, e, floor), rel_err(t, e, floor)
        assert ours_err <= 2 * theirs_err + slack, f"{what}: error {ours_err:.2e}, PyTorch's {theirs_err:.2e}"
    # The unbiased variance of a constant channel is 0: momentum 0.5 halves the running variance.
    assert rel_err(running_var, old_var * 0.5) <= 4 * torch.finfo(dtype).eps
