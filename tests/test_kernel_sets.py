"""The four BatchNorm ops of every kernel set (tests/kernel_cases.py: compiled CPU with each kernel table, CUDA,
Triton) against their float64 formulas (tests/primitives.py), and Triton's against the compiled ops: every dtype,
layout, shape and alignment of the case table, each optional input and flag, option A's residuals."""

from __future__ import annotations

import pytest

import primitives
from kernel_cases import (
    accumulation,
    activation,
    activations,
    assert_channel_vector,
    assert_close,
    assert_dense_like,
    channel_vectors,
    kernels,  # noqa: F401 (a fixture)
    parametrize_dtypes,
    parametrize_layouts,
    poisoned_outputs,  # noqa: F401 (a fixture)
    pytest_generate_tests,  # noqa: F401 (parametrizes `kernels`)
)

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


@parametrize_layouts
@parametrize_dtypes()
def test_batch_stats(kernels, shape, input_alignment, dtype, channels_last):
    (x,) = activations(kernels, 1, shape, dtype, channels_last, input_alignment, mean=3.0, std=2.0)
    (mean, var), theirs = kernels.run("batch_stats", x)
    exact = primitives.batch_stats(x)
    # Statistics accumulate in fp32/fp64 whatever the input dtype and come back in it: judged at its precision.
    for i, (name, got) in enumerate([("mean", mean), ("var", var)]):
        assert_channel_vector(got, x, accumulation(dtype))
        assert_close(got, exact[i], accumulation(dtype), "reduction", name, theirs and theirs[i])


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("residual", ["none", "identity", "affine"])
@parametrize_layouts
@parametrize_dtypes()
def test_bn_act(kernels, shape, alignment, dtype, channels_last, residual, relu):
    x, r = activations(kernels, 2, shape, dtype, channels_last, alignment)
    mean, scale, shift, rm, rs, rb = channel_vectors(kernels, 6, shape[1], dtype)
    r = r if residual != "none" else None
    rm, rs, rb = (rm, rs, rb) if residual == "affine" else (None, None, None)
    out, theirs = kernels.run("bn_act", x, mean, scale, shift, r, rm, rs, rb, relu)
    assert_dense_like(out, x, dtype)
    assert_close(out, primitives.bn_act(x, mean, scale, shift, r, rm, rs, rb, relu), dtype, "elementwise", "bn_act",
                 theirs)


@parametrize_layouts
@parametrize_dtypes()
def test_bn_act_without_means_centers_nothing(kernels, dtype, channels_last):
    """A None mean (and residual_mean) is 0: what the inference fallback passes, its BN folded into the convolution
    (NativeKernels.conv_bias_act). With and without the projection's affine residual in one test."""
    shape = (2, 5, 3, 7)
    x, r = activations(kernels, 2, shape, dtype, channels_last)
    scale, shift, rs, rb = channel_vectors(kernels, 4, shape[1], dtype)
    for residual, rs_, rb_ in ((None, None, None), (r, rs, rb)):
        out, theirs = kernels.run("bn_act", x, None, scale, shift, residual, None, rs_, rb_, True)
        assert_dense_like(out, x, dtype)
        assert_close(out, primitives.bn_act(x, None, scale, shift, residual, None, rs_, rb_), dtype, "elementwise",
                     f"bn_act without means, residual_scale={rs_ is not None}", theirs)


@parametrize_layouts
@parametrize_dtypes()
def test_bn_act_with_a_zero_padded_residual(kernels, padded_residual, dtype, channels_last):
    """Option A's residual: subsampled by the stride, zero channels around its own. With and without the ReLU in one
    test: the ReLU acts on the sum whatever its terms, and a test each would double the interpreted cases for no new
    path."""
    shape, (res_c, res_h, res_w), stride, before = padded_residual
    x = activation(kernels, shape, dtype, channels_last)
    res = activation(kernels, (shape[0], res_c, res_h, res_w), dtype, channels_last)
    mean, scale, shift = channel_vectors(kernels, 3, shape[1], dtype)
    padded = primitives.zero_pad_identity(res, shape[1], stride, before)
    for relu in (True, False):
        out, theirs = kernels.run("bn_act", x, mean, scale, shift, res, None, None, None, relu, stride, before)
        assert_dense_like(out, x, dtype)
        assert_close(out, primitives.bn_act(x, mean, scale, shift, padded, relu=relu), dtype, "elementwise",
                     f"bn_act with a zero-padded residual, relu={relu}", theirs)


@parametrize_layouts
@parametrize_dtypes()
def test_bn_act_backward_reduce(kernels, shape, alignment, reduce_inputs, dtype, channels_last):
    masked, second = "masked" in reduce_inputs, "second" in reduce_inputs
    g, x, out, x2 = activations(kernels, 4, shape, dtype, channels_last, alignment)
    out = out.relu_() if masked else None  # a ReLU's output: about half the gradient masked off
    mean, mean2 = channel_vectors(kernels, 2, shape[1], dtype)
    x2, mean2 = (x2, mean2) if second else (None, None)
    sums, theirs = kernels.run("bn_act_backward_reduce", g, out, x, mean, x2, mean2)
    exact = primitives.backward_reduce(g, out, x, mean, x2, mean2)
    for i, name in enumerate(["sum_dy", "sum_dy_xmu", "sum_dy_xmu2"]):
        if exact[i] is None:
            assert sums[i].numel() == 0 and sums[i].dtype == accumulation(dtype) and sums[i].device == x.device
            continue
        assert_channel_vector(sums[i], x, accumulation(dtype))
        assert_close(sums[i], exact[i], accumulation(dtype), "reduction", name, theirs and theirs[i])


@pytest.mark.parametrize("other", ["none", "residual", "second"])
@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
@parametrize_layouts
@parametrize_dtypes()
def test_bn_act_backward_elemt(kernels, shape, alignment, dtype, channels_last, masked, other):
    g, x, out, x2 = activations(kernels, 4, shape, dtype, channels_last, alignment)
    out = out if masked else None
    mean, k_dy, k_xmu, k_0, mean2, k2_dy, k2_xmu, k2_0 = channel_vectors(kernels, 8, shape[1], dtype)
    second = (x2, mean2, k2_dy, k2_xmu, k2_0) if other == "second" else (None,) * 5
    (grad_x, grad_other), theirs = kernels.run("bn_act_backward_elemt", g, out, x, mean, k_dy, k_xmu, k_0, *second,
                                               other == "residual")
    exact_x, exact_other = primitives.backward_elemt(g, out, x, mean, (k_dy, k_xmu, k_0), second[0], second[1],
                                                     second[2:], other == "residual")
    assert_dense_like(grad_x, x, dtype)
    assert_close(grad_x, exact_x, dtype, "elementwise", "grad_input", theirs and theirs[0])
    if exact_other is None:
        assert grad_other.numel() == 0 and grad_other.dtype == dtype and grad_other.device == x.device
        assert theirs is None or theirs[1].shape == grad_other.shape
    else:
        assert_dense_like(grad_other, x, dtype)
        assert_close(grad_other, exact_other, dtype, "elementwise", "grad_other", theirs and theirs[1])
