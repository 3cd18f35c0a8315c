"""The BatchNorm ops of every kernel set (tests/kernel_cases.py) where kernels go wrong: NaN through the ReLU and
its mask, statistics of a large mean or a constant channel, inputs that are not dense, in another layout or at a
storage offset, bitwise determinism of the reductions, and more than 2^31 elements."""

from __future__ import annotations

import math

import pytest
import torch

import primitives
from kernel_cases import (
    DETERMINISM_SETS,
    DTYPES,
    GPU_TENSOR_SETS,
    SETS_WITHOUT_ALIGNMENT_CASES,
    accumulation,
    activation,
    activations,
    assert_close,
    assert_dense_like,
    assert_within,
    channel_vectors,
    gradient_clear_of_relu_threshold,
    kernel_set_params,
    kernels,  # noqa: F401 (a fixture)
    parametrize_dtypes,
    parametrize_layouts,
    poisoned_outputs,  # noqa: F401 (a fixture)
    pytest_generate_tests,  # noqa: F401 (parametrizes `kernels`)
)

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

@parametrize_dtypes()
def test_bn_act_keeps_nan_like_torch_relu(kernels, dtype):
    x = activation(kernels, (2, 8, 4, 4), dtype)
    x[0, 1, 2, 3] = x[1, 7, 0, 0] = float("nan")
    x[1, 2] = torch.tensor([-1.0, -0.0, 0.0, 2.0], dtype=dtype, device=x.device)
    one = torch.ones(8, dtype=accumulation(dtype), device=x.device)
    zero = torch.zeros_like(one)
    out = kernels.ops.bn_act(x, zero, one, zero, None, None, None, None, True)
    expected = torch.relu(x)
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.nan_to_num(), expected.nan_to_num())


@parametrize_layouts
def test_bn_act_normalizes_a_large_mean_without_cancellation(kernels, channels_last):
    """bn_act centers before it scales, (x - mean) * scale + shift: at a mean of 1e4 and a spread of 0.1, x - mean
    is exact (Sterbenz) and the output is within fp32 rounding of O(1) values, for the main input and a projection's
    residual alike. Folding the mean into the shift (x * scale + (shift - mean * scale), mean * scale ~ 1e5) would be
    off by ~4e-3, three orders above the bound."""
    fp32 = torch.float32
    shape = (2, 6, 5, 7)
    x, r = activations(kernels, 2, shape, fp32, channels_last, mean=1e4, std=0.1)
    mean, r_mean = (t.double().mean((0, 2, 3)).float() for t in (x, r))
    scale, r_scale = (torch.rand(6, device=x.device) * 5 + 5 for _ in range(2))
    shift, r_shift = channel_vectors(kernels, 2, 6, fp32)
    out = kernels.ops.bn_act(x, mean, scale, shift, r, r_mean, r_scale, r_shift, False)
    assert_close(out, primitives.bn_act(x, mean, scale, shift, r, r_mean, r_scale, r_shift, relu=False), fp32,
                 "elementwise", "bn_act at a large mean")


def test_backward_mask_is_threshold_backward(kernels):
    """gm = grad where output > 0: zero for output <= 0 (0 and -0 included), grad for a NaN output."""
    output = torch.tensor([float("nan"), -1.0, -0.0, 0.0, 1e-30, 3.0], device=kernels.device).view(1, 6, 1, 1)
    output = output.expand(2, 6, 2, 2).contiguous()
    grad = torch.full_like(output, 2.0)
    x = torch.zeros_like(output)
    zeros = torch.zeros(6, device=kernels.device)
    sum_dy, _, _ = kernels.ops.bn_act_backward_reduce(grad, output, x, zeros, None, None)
    assert sum_dy.tolist() == [16.0, 0.0, 0.0, 0.0, 16.0, 16.0]
    _, gm = kernels.ops.bn_act_backward_elemt(grad, output, x, zeros, zeros, zeros, zeros, None, None, None, None, None,
                                              True)
    assert torch.equal(gm, torch.ops.aten.threshold_backward(grad, output, 0))


def test_backward_mask_from_the_input_is_threshold_backward(kernels):
    """With the mask from the input (mask_scale, mask_shift), gm = grad where the normalized input > 0, as
    threshold_backward masks by bn_act's output: zero where it is <= 0 (-0 included), grad where it is NaN or tiny."""
    x = torch.tensor([float("nan"), -1.0, -0.0, 0.0, 1e-30, 3.0], device=kernels.device).view(1, 6, 1, 1)
    x = x.expand(2, 6, 2, 2).contiguous()
    grad = torch.full_like(x, 2.0)
    zeros, ones = torch.zeros(6, device=kernels.device), torch.ones(6, device=kernels.device)
    sum_dy, _, _ = kernels.ops.bn_act_backward_reduce(grad, None, x, zeros, None, None, ones, zeros)
    assert sum_dy.tolist() == [16.0, 0.0, 0.0, 0.0, 16.0, 16.0]
    _, gm = kernels.ops.bn_act_backward_elemt(grad, None, x, zeros, zeros, zeros, zeros, None, None, None, None, None,
                                              True, ones, zeros)
    output = kernels.ops.bn_act(x, zeros, ones, zeros, None, None, None, None, True)
    assert torch.equal(gm, torch.ops.aten.threshold_backward(grad, output, 0))


@parametrize_layouts
def test_batch_stats_large_mean_keeps_its_variance(kernels, stats_shape, channels_last):
    """float32 values around 1e4 with spread 1: sum and sum-of-squares would cancel to noise of order
    1e8 * 2^-24 ~ 6, and running means of the values themselves (held to ~1e-3 at 1e4) would leave errors of ~1e-3
    in the variance; moments of blocks merged with Chan's update keep it."""
    x = activation(kernels, stats_shape, torch.float32, channels_last, mean=1e4, std=1.0)
    mean, var = kernels.ops.batch_stats(x)
    exact_mean, exact_var = (e.value for e in primitives.batch_stats(x))
    assert_within(var, exact_var, 1e-5 * exact_var, "var")
    assert_within(mean, exact_mean, 2e-7 * exact_mean.abs(), "mean")  # two ulps of float32
    naive = x.float().pow(2).mean((0, 2, 3)) - x.float().mean((0, 2, 3)).pow(2)
    assert (naive.double() - exact_var).abs().max() > 1e-2, "the naive formula should fail here (test too easy)"


def test_batch_stats_constant_channel_has_zero_variance(kernels):
    x = torch.full((4, 3, 5, 5), 7.25, device=kernels.device)
    mean, var = kernels.ops.batch_stats(x)
    assert torch.equal(mean.cpu(), torch.full((3,), 7.25)) and torch.equal(var.cpu(), torch.zeros(3))


NON_DENSE_VIEWS = {
    "strided": ((4, 6, 10, 12), lambda t: t[:, :, ::2, 1:]),
    "transposed": ((2, 6, 7, 5), lambda t: t.transpose(2, 3)[:, ::2]),
}


@pytest.mark.parametrize("view", list(NON_DENSE_VIEWS))
def test_non_dense_inputs_are_made_dense(kernels, view):
    """Neither NCHW- nor channels_last-dense activations are computed as contiguous NCHW, by every op."""
    base_shape, make = NON_DENSE_VIEWS[view]
    fp32 = torch.float32
    g, x, out, r = (make(t) for t in activations(kernels, 4, base_shape, fp32, False))
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    out = out.relu_()
    scale, shift, mean, k_dy, k_xmu, k_0 = channel_vectors(kernels, 6, x.shape[1], fp32)
    y = kernels.ops.bn_act(x, mean, scale, shift, r, None, None, None, False)
    assert y.is_contiguous()
    assert_close(y, primitives.bn_act(x, mean, scale, shift, r, relu=False), fp32, "elementwise", "bn_act")
    for got, exact, name in zip(kernels.ops.batch_stats(x), primitives.batch_stats(x), ["mean", "var"]):
        assert_close(got, exact, fp32, "reduction", name)
    sums = kernels.ops.bn_act_backward_reduce(g, out, x, mean, None, None)
    for got, exact, name in zip(sums[:2], primitives.backward_reduce(g, out, x, mean)[:2], ["sum_dy", "sum_dy_xmu"]):
        assert_close(got, exact, fp32, "reduction", name)
    assert sums[2].numel() == 0
    grad_x, grad_r = kernels.ops.bn_act_backward_elemt(g, out, x, mean, k_dy, k_xmu, k_0, None, None, None, None,
                                                       None, True)
    exact_x, exact_r = primitives.backward_elemt(g, out, x, mean, (k_dy, k_xmu, k_0), residual_grad=True)
    assert grad_x.is_contiguous() and grad_r.is_contiguous()
    assert_close(grad_x, exact_x, fp32, "elementwise", "grad_input")
    assert_close(grad_r, exact_r, fp32, "elementwise", "grad_residual")


@parametrize_layouts
def test_grad_output_in_another_layout_is_read_correctly(kernels, channels_last):
    """Autograd may hand a channels_last gradient to an NCHW activation, and the reverse."""
    x = activation(kernels, (2, 16, 5, 5), torch.float32, channels_last)
    g = activation(kernels, (2, 16, 5, 5), torch.float32, not channels_last)
    mean, k_dy, k_xmu, k_0 = channel_vectors(kernels, 4, 16, torch.float32)
    grad_x, _ = kernels.ops.bn_act_backward_elemt(g, None, x, mean, k_dy, k_xmu, k_0, None, None, None, None, None,
                                                  False)
    assert_dense_like(grad_x, x, torch.float32)
    exact_x, _ = primitives.backward_elemt(g, None, x, mean, (k_dy, k_xmu, k_0))
    assert_close(grad_x, exact_x, torch.float32, "elementwise", "grad_input")
    sums = kernels.ops.bn_act_backward_reduce(g, None, x, mean, None, None)
    for got, exact, name in zip(sums[:2], primitives.backward_reduce(g, None, x, mean)[:2], ["sum_dy", "sum_dy_xmu"]):
        assert_close(got, exact, torch.float32, "reduction", name)


@parametrize_layouts
@parametrize_dtypes([torch.float16])  # a 2-byte offset: the least aligned view
@pytest.mark.parametrize("kernels", kernel_set_params(SETS_WITHOUT_ALIGNMENT_CASES), indirect=True)
def test_ops_read_views_at_a_storage_offset(kernels, dtype, channels_last):
    """Every activation of every op a view one element into its buffer (whose poisoned element before it would show
    a kernel that ignores the offset), for the sets whose table has no alignment cases (KernelSet.alignments)."""
    shape = (2, 5, 7, 9)
    g, x, out, x2 = activations(kernels, 4, shape, dtype, channels_last, "misaligned")
    out = out.relu_()
    scale, shift, mean, k_dy, k_xmu, k_0 = channel_vectors(kernels, 6, shape[1], dtype)
    acc = accumulation(dtype)
    y = kernels.ops.bn_act(x, mean, scale, shift, x2, None, None, None, True)
    assert_dense_like(y, x, dtype)
    assert_close(y, primitives.bn_act(x, mean, scale, shift, x2), dtype, "elementwise", "bn_act")
    for got, exact, name in zip(kernels.ops.batch_stats(x), primitives.batch_stats(x), ["mean", "var"]):
        assert_close(got, exact, acc, "reduction", name)
    sums = kernels.ops.bn_act_backward_reduce(g, out, x, mean, x2, mean)
    for got, exact, name in zip(sums, primitives.backward_reduce(g, out, x, mean, x2, mean), ["dy", "xmu", "xmu2"]):
        assert_close(got, exact, acc, "reduction", f"sum_{name}")
    grad_x, grad_x2 = kernels.ops.bn_act_backward_elemt(g, out, x, mean, k_dy, k_xmu, k_0, x2, mean, k_0, k_dy, k_xmu,
                                                        False)
    exact_x, exact_x2 = primitives.backward_elemt(g, out, x, mean, (k_dy, k_xmu, k_0), x2, mean, (k_0, k_dy, k_xmu))
    assert_close(grad_x, exact_x, dtype, "elementwise", "grad_input")
    assert_close(grad_x2, exact_x2, dtype, "elementwise", "grad_input2")
    # The mask from the input instead of the output.
    gradient_clear_of_relu_threshold(g, x, mean, scale, shift)
    sums = kernels.ops.bn_act_backward_reduce(g, None, x, mean, None, None, scale, shift)
    exact_sums = primitives.backward_reduce(g, None, x, mean, mask_scale=scale, mask_shift=shift)
    for got, exact, name in zip(sums[:2], exact_sums[:2], ["dy", "xmu"]):
        assert_close(got, exact, acc, "reduction", f"sum_{name} masked by the input")
    grad_x, _ = kernels.ops.bn_act_backward_elemt(g, None, x, mean, k_dy, k_xmu, k_0, None, None, None, None, None,
                                                  False, scale, shift)
    exact_x, _ = primitives.backward_elemt(g, None, x, mean, (k_dy, k_xmu, k_0), mask_scale=scale, mask_shift=shift)
    assert_close(grad_x, exact_x, dtype, "elementwise", "grad_input masked by the input")


@parametrize_layouts
@parametrize_dtypes([torch.float32, torch.float16])
@pytest.mark.parametrize("kernels", kernel_set_params(DETERMINISM_SETS), indirect=True)
def test_reductions_are_bitwise_deterministic(kernels, dtype, channels_last):
    """Tile bounds depend on the shape alone and tiles merge in order: the same bits on every run, with 1 or 2 CPU
    threads."""
    shape = kernels.determinism_shape
    g, x = activations(kernels, 2, shape, dtype, channels_last)
    mean, mean2 = channel_vectors(kernels, 2, shape[1], dtype)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            # x for the ReLU's output too (the mask) and for the second BN's input: every sum the op has; then the
            # mask from the input.
            runs.append((*kernels.ops.batch_stats(x), *kernels.ops.bn_act_backward_reduce(g, x, x, mean, x, mean2),
                         *kernels.ops.bn_act_backward_reduce(g, None, x, mean, None, None, mean2, mean)))
    finally:
        torch.set_num_threads(threads)
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)


@pytest.mark.slow
@parametrize_layouts
@pytest.mark.parametrize("kernels", kernel_set_params(GPU_TENSOR_SETS), indirect=True)
def test_more_than_2_31_elements(kernels, channels_last):
    shape = (1025, 64, 128, 256)  # 2^31 + 2^21 elements, 4.3 GB in fp16: element 2^31 starts image 1024
    need = 2 * math.prod(shape) * 2 + (4 << 30)
    if torch.cuda.get_device_properties(0).total_memory < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of GPU memory")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(shape, device="cuda", dtype=torch.float16, memory_format=fmt).normal_()
    mean, scale, shift = (torch.randn(64, device="cuda") for _ in range(3))
    out = kernels.ops.bn_act(x, mean, scale, shift, None, None, None, None, False)
    for n in (0, 1023, 1024):
        expected = ((x[n].float() - mean.view(-1, 1, 1)) * scale.view(-1, 1, 1) + shift.view(-1, 1, 1)).half()
        assert torch.allclose(out[n].float(), expected.float(), rtol=DTYPES[torch.float16].rounding, atol=1e-3), n
    del out
    mean, var = kernels.ops.batch_stats(x)
    for c in range(0, 64, 8):  # the reference in fp32, 8 channels (1 GiB) at a time
        ref_var, ref_mean = torch.var_mean(x[:, c:c + 8].float(), dim=(0, 2, 3), correction=0)
        assert torch.allclose(mean[c:c + 8], ref_mean, rtol=0, atol=1e-5)
        assert torch.allclose(var[c:c + 8], ref_var, rtol=1e-4, atol=0)
