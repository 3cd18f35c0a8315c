"""What differs between x86-64 CPUs: the ISA report, the probe for PyTorch's oneDNN weight-gradient crash, and the
cpu backend's way around that crash (README, Known issues)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import fused_resnet
from conftest import CPU_BACKENDS, assert_rel, fused_copy, randomize_batchnorms, run_model, to_layout
from fused_resnet import cpu_info, use_backend
from fused_resnet.kernels import kernels_for
from fused_resnet.kernels.base import _onednn_low_precision_weight_grad_fails, onednn_weight_grad_may_crash
from fused_resnet.params import ConvParams


def test_cpu_isa_names_what_torch_sees():
    isa = cpu_info.cpu_isa()
    expected = {"AVX512": "AVX-512", "AVX2": "AVX2"}.get(torch.backends.cpu.get_cpu_capability())
    assert isa.startswith(expected or ""), isa
    if torch.cpu._is_amx_tile_supported():
        assert "AMX" in isa


@pytest.mark.parametrize("program,expected", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", True),
    ("import os; os.abort()", True),
    ("pass", False),
    ("raise SystemExit(3)", None),
])
def test_the_crash_probe_tells_a_signal_from_an_exit(monkeypatch, program, expected):
    monkeypatch.setattr(cpu_info, "ONEDNN_CRASH_REPRODUCER", program)
    cpu_info.onednn_weight_grad_crashes.cache_clear()
    try:
        assert cpu_info.onednn_weight_grad_crashes() is expected
        assert ("PRESENT" in cpu_info.onednn_crash_report()) is (expected is True)
    finally:
        cpu_info.onednn_weight_grad_crashes.cache_clear()


def conv(in_channels: int, kernel: int, stride: int, padding: int = 0, groups: int = 1) -> ConvParams:
    return ConvParams(torch.randn(16, in_channels // groups, kernel, kernel), None, (stride, stride),
                      (padding, padding), (1, 1), groups)


def test_which_weight_gradients_go_around_onednn():
    """1x1 strided convolutions without padding and with fewer than 16 input channels; nothing else."""
    assert onednn_weight_grad_may_crash(conv(8, 1, 2))
    assert onednn_weight_grad_may_crash(conv(15, 1, 3))
    assert onednn_weight_grad_may_crash(conv(2, 1, 2))
    assert not onednn_weight_grad_may_crash(conv(16, 1, 2))
    assert not onednn_weight_grad_may_crash(conv(8, 1, 1))
    assert not onednn_weight_grad_may_crash(conv(8, 3, 2, padding=1))
    assert not onednn_weight_grad_may_crash(conv(8, 1, 2, padding=1))
    assert not onednn_weight_grad_may_crash(conv(16, 1, 2, groups=2))


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the cpu backend is not available here")
@pytest.mark.parametrize("stride", [2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [16, 15])
def test_the_subsampled_weight_gradient_is_atens(stride, channels_last, size):
    """In float64 (ATen's own convolution, no oneDNN) the cpu backend's weight gradient of the subsampled input
    equals the strided convolution's, with odd and even sizes; the input gradient and the bias's stay ATen's."""
    x = to_layout(torch.randn(3, 8, size, size, dtype=torch.float64), channels_last)
    params = ConvParams(torch.randn(16, 8, 1, 1, dtype=torch.float64), torch.randn(16, dtype=torch.float64),
                        (stride, stride))
    y = torch.nn.functional.conv2d(x, params.weight, params.bias, params.stride)
    grad_y = to_layout(torch.randn_like(y), channels_last)
    ours = kernels_for("cpu").conv_backward(grad_y, x, params, True, True, True)
    theirs = torch.ops.aten.convolution_backward(grad_y, x, params.weight, [16], list(params.stride), [0, 0],
                                                 [1, 1], False, [0, 0], 1, [True, True, True])
    for what, a, b in zip(("input", "weight", "bias"), ours, theirs):
        assert_rel(a, b, 1e-12, f"grad {what}")


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the cpu backend is not available here")
def test_a_fused_network_trains_where_plain_pytorch_crashes():
    """The issue's reproducer inside a fused Bottleneck: its 8-channel input downsampled by a 1x1 stride-2
    convolution, channels_last, batch 3 (on an AVX-512 CPU PyTorch's own backward of that convolution segfaults).
    Every gradient and running statistic matches the float64 model's; float64 runs ATen's convolutions, which do not
    crash."""
    downsample = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    model = randomize_batchnorms(nn.Sequential(torchvision.models.resnet.Bottleneck(8, 4, 2, downsample)))
    fused, exact = fused_copy(model), copy.deepcopy(model).double()
    assert fused_resnet.unfused_modules(fused) == {}
    x = to_layout(torch.randn(3, 8, 16, 16), True)
    with use_backend("cpu"):
        out, grad_x, grads, buffers = run_model(fused, x, train=True)
    ref, ref_grad_x, ref_grads, ref_buffers = run_model(exact, x.double(), train=True)
    assert_rel(out, ref, 2e-5, "output")
    assert_rel(grad_x, ref_grad_x, 2e-5, "grad x")
    for name, grad in ref_grads.items():
        assert_rel(grads[name], grad, 2e-5, f"grad {name}")
    for name, buffer in ref_buffers.items():
        assert_rel(buffers[name], buffer, 2e-5, name)


def test_which_low_precision_weight_gradients_go_through_float32():
    bf16 = torch.randn(2, 3, 5, 1, dtype=torch.bfloat16)
    assert _onednn_low_precision_weight_grad_fails(bf16, conv(3, 3, 2, padding=1))
    assert _onednn_low_precision_weight_grad_fails(bf16.transpose(2, 3), conv(3, 3, 2, padding=1))
    assert not _onednn_low_precision_weight_grad_fails(bf16, conv(3, 3, 1, padding=1))
    assert not _onednn_low_precision_weight_grad_fails(bf16.float(), conv(3, 3, 2, padding=1))
    assert not _onednn_low_precision_weight_grad_fails(torch.randn(2, 3, 5, 2, dtype=torch.bfloat16),
                                                       conv(3, 3, 2, padding=1))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_bf16_weight_gradient_of_a_one_pixel_wide_image_is_finite_and_right(backend):
    """oneDNN's AMX kernels return NaN or garbage here in about one call in four (1 input channel, 5x1 pixels, 3x3
    stride 2); the kernel sets compute it in float32. Ten calls, each within bf16 rounding of float64."""
    kernels = kernels_for(backend)
    for _ in range(10):
        x = torch.randn(2, 1, 5, 1, dtype=torch.float64)
        params = ConvParams(torch.randn(5, 1, 3, 3, dtype=torch.float64), None, (2, 2), (1, 1))
        grad_y = torch.randn(2, 5, 3, 1, dtype=torch.float64)
        low = ConvParams(params.weight.bfloat16(), None, (2, 2), (1, 1))
        grad_weight = kernels.conv_backward(grad_y.bfloat16(), x.bfloat16(), low, False, True, False)[1]
        expected = kernels.conv_backward(grad_y.bfloat16().double(), x.bfloat16().double(),
                                         ConvParams(low.weight.double(), None, (2, 2), (1, 1)), False, True, False)[1]
        assert grad_weight.dtype == torch.bfloat16
        assert_rel(grad_weight, expected, 2e-2, "grad weight")
