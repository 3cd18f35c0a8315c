"""The four BatchNorm ops of every kernel set (tests/kernel_cases.py: compiled CPU with each kernel table, CUDA,
Triton) against their float64 formulas (tests/primitives.py), and Triton's against the compiled ops: every dtype,
layout, shape and alignment of the case table, each optional input and flag, option A's residuals."""

from __future__ import annotations

import pytest
import torch

import fused_resnet
import primitives
from fused_resnet.kernels.native import NativeKernels
from fused_resnet.ops.nodes import run_bn_relu_conv
from fused_resnet.params import BatchNormParams, ConvParams
from kernel_cases import (
    accumulation,
    activation,
    activations,
    assert_channel_vector,
    assert_close,
    assert_dense_like,
    channel_vectors,
    gradient_clear_of_relu_threshold,
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
    masked, second = reduce_inputs.startswith("masked"), reduce_inputs.endswith("second")
    g, x, out, x2 = activations(kernels, 4, shape, dtype, channels_last, alignment)
    out = out.relu_() if masked else None  # a ReLU's output: about half the gradient masked off
    mean, mean2 = channel_vectors(kernels, 2, shape[1], dtype)
    x2, mean2 = (x2, mean2) if second else (None, None)
    mask_scale = mask_shift = None
    if reduce_inputs.startswith("input_masked"):  # the mask of bn_act(x, mean, mask_scale, mask_shift)
        mask_scale, mask_shift = channel_vectors(kernels, 2, shape[1], dtype)
        gradient_clear_of_relu_threshold(g, x, mean, mask_scale, mask_shift)
    sums, theirs = kernels.run("bn_act_backward_reduce", g, out, x, mean, x2, mean2, mask_scale, mask_shift)
    exact = primitives.backward_reduce(g, out, x, mean, x2, mean2, mask_scale, mask_shift)
    for i, name in enumerate(["sum_dy", "sum_dy_xmu", "sum_dy_xmu2"]):
        if exact[i] is None:
            assert sums[i].numel() == 0 and sums[i].dtype == accumulation(dtype) and sums[i].device == x.device
            continue
        assert_channel_vector(sums[i], x, accumulation(dtype))
        assert_close(sums[i], exact[i], accumulation(dtype), "reduction", name, theirs and theirs[i])


@pytest.mark.parametrize("other", ["none", "residual", "second"])
@pytest.mark.parametrize("mask", ["output", "input", "none"], ids=["masked", "input_masked", "unmasked"])
@parametrize_layouts
@parametrize_dtypes()
def test_bn_act_backward_elemt(kernels, shape, alignment, dtype, channels_last, mask, other):
    g, x, out, x2 = activations(kernels, 4, shape, dtype, channels_last, alignment)
    out = out if mask == "output" else None
    mean, k_dy, k_xmu, k_0, mean2, k2_dy, k2_xmu, k2_0 = channel_vectors(kernels, 8, shape[1], dtype)
    second = (x2, mean2, k2_dy, k2_xmu, k2_0) if other == "second" else (None,) * 5
    mask_scale = mask_shift = None
    if mask == "input":  # the mask of bn_act(x, mean, mask_scale, mask_shift)
        mask_scale, mask_shift = channel_vectors(kernels, 2, shape[1], dtype)
        gradient_clear_of_relu_threshold(g, x, mean, mask_scale, mask_shift)
    (grad_x, grad_other), theirs = kernels.run("bn_act_backward_elemt", g, out, x, mean, k_dy, k_xmu, k_0, *second,
                                               other == "residual", mask_scale, mask_shift)
    exact_x, exact_other = primitives.backward_elemt(g, out, x, mean, (k_dy, k_xmu, k_0), second[0], second[1],
                                                     second[2:], other == "residual", mask_scale, mask_shift)
    assert_dense_like(grad_x, x, dtype)
    assert_close(grad_x, exact_x, dtype, "elementwise", "grad_input", theirs and theirs[0])
    if exact_other is None:
        assert grad_other.numel() == 0 and grad_other.dtype == dtype and grad_other.device == x.device
        assert theirs is None or theirs[1].shape == grad_other.shape
    else:
        assert_dense_like(grad_other, x, dtype)
        assert_close(grad_other, exact_other, dtype, "elementwise", "grad_other", theirs and theirs[1])


@parametrize_layouts
@parametrize_dtypes()
def test_backward_mask_from_the_input_is_that_of_bn_acts_output(kernels, shape, dtype, channels_last):
    """The backward ops' mask from the input (mask_scale, mask_shift) is the ReLU mask of bn_act's output on the same
    vectors, bit for bit: each kernel set recomputes it with its bn_act's arithmetic, so the BN-ReLU -> conv node's
    gradients do not change when it stops reading that output. Compared through every result, gm itself included
    (the residual gradient). In 16-bit dtypes a positive value below the dtype's smallest one rounds to 0 in the
    output and passes the gradient here (the exact ReLU derivative): the gradient is zeroed near the threshold there,
    nowhere in float32 and float64, where the two masks agree everywhere."""
    g, x = activations(kernels, 2, shape, dtype, channels_last)
    mean, scale, shift, k_dy, k_xmu, k_0 = channel_vectors(kernels, 6, shape[1], dtype)
    if dtype in (torch.float16, torch.bfloat16):
        gradient_clear_of_relu_threshold(g, x, mean, scale, shift)
    out = kernels.ops.bn_act(x, mean, scale, shift, None, None, None, None, True)
    by_output = kernels.ops.bn_act_backward_reduce(g, out, x, mean, None, None)
    by_input = kernels.ops.bn_act_backward_reduce(g, None, x, mean, None, None, scale, shift)
    for name, old, new in zip(["sum_dy", "sum_dy_xmu"], by_output, by_input):
        assert torch.equal(old, new), f"{name}: the input's mask differs from the output's"
    by_output = kernels.ops.bn_act_backward_elemt(g, out, x, mean, k_dy, k_xmu, k_0, None, None, None, None, None,
                                                  True)
    by_input = kernels.ops.bn_act_backward_elemt(g, None, x, mean, k_dy, k_xmu, k_0, None, None, None, None, None,
                                                 True, scale, shift)
    for name, old, new in zip(["grad_input", "masked gradient"], by_output, by_input):
        assert torch.equal(old, new), f"{name}: the input's mask differs from the output's"


class _MaskRecordingKernels(NativeKernels):
    """The compiled kernels, recording which ReLU mask each backward call asks for; with `by_output`, a mask from the
    input is taken from bn_act's output instead (output=bn_act(y, mean, mask_scale, mask_shift)), as the BN-ReLU ->
    conv node did before it passed mask_scale and mask_shift."""

    def __init__(self, by_output: bool):
        super().__init__()
        self.by_output = by_output
        self.masks: list[str] = []

    def _mask(self, output, y, mean, mask_scale, mask_shift):
        self.masks.append("output" if output is not None else "input" if mask_scale is not None else "none")
        if self.by_output and mask_scale is not None:
            return self.bn_act(y, mean, mask_scale, mask_shift, relu=True), None, None
        return output, mask_scale, mask_shift

    def backward_reduce(self, grad, output, y, mean, y2=None, mean2=None, mask_scale=None, mask_shift=None):
        output, mask_scale, mask_shift = self._mask(output, y, mean, mask_scale, mask_shift)
        return super().backward_reduce(grad, output, y, mean, y2, mean2, mask_scale, mask_shift)

    def backward_elemt(self, grad, output, y, mean, coefs, y2=None, mean2=None, coefs2=None, residual_grad=False,
                       mask_scale=None, mask_shift=None):
        output, mask_scale, mask_shift = self._mask(output, y, mean, mask_scale, mask_shift)
        return super().backward_elemt(grad, output, y, mean, coefs, y2, mean2, coefs2, residual_grad, mask_scale,
                                      mask_shift)


@pytest.mark.skipif(fused_resnet.backend_status()["cpu"] != "available", reason="the compiled CPU ops are missing")
@parametrize_layouts
def test_bn_relu_conv_node_masks_by_its_input_with_unchanged_gradients(channels_last):
    """The BN-ReLU -> conv node's backward takes its ReLU mask from y (mask_scale, mask_shift), not from the
    recomputed activation a (two fewer passes over it), and its gradients (y, the BN's weight and bias, the conv's
    weight and bias) are bitwise those of masking by a, as it did before: cpu backend, float32."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    y = torch.randn(4, 16, 9, 9).contiguous(memory_format=memory_format).requires_grad_()
    weight, bias = (1 + 0.1 * torch.randn(16)).requires_grad_(), (0.1 * torch.randn(16)).requires_grad_()
    conv = ConvParams(torch.randn(8, 16, 3, 3).requires_grad_(), torch.randn(8).requires_grad_(), padding=(1, 1))
    bn = BatchNormParams(weight, bias, torch.zeros(16), torch.ones(16))
    grad_out = torch.randn(4, 8, 9, 9).contiguous(memory_format=memory_format)
    gradients = {}
    for by_output in (False, True):
        kernels = _MaskRecordingKernels(by_output)
        stats = kernels.batch_stats(y.detach())
        (out,) = run_bn_relu_conv(kernels, bn, y, stats, conv, False)
        gradients[by_output] = torch.autograd.grad(out, (y, weight, bias, conv.weight, conv.bias), grad_out)
        assert kernels.masks == ["input", "input"], kernels.masks
    for name, new, old in zip(["y", "weight", "bias", "conv weight", "conv bias"], gradients[False], gradients[True]):
        assert torch.equal(new, old), f"the gradient of {name} changed"
