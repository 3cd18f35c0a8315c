"""conv_weight_grad_gemm (a convolution's weight gradient as one GEMM over the input's patches) against float64,
its argument errors, and the cpu backend's measured choice between it and oneDNN's weight gradient in training."""

from __future__ import annotations

import copy

import pytest
import torch

import fused_resnet
from conftest import assert_rel, randomize_batchnorms
from fused_resnet import _native, use_backend
from fused_resnet.kernels.native import CONVOLUTION_CHOICES
from fused_resnet.tensors import memory_format_of
from kernel_cases import poisoned_outputs  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(not _native.has_extension(), reason="the compiled extension is not built")

ops = torch.ops.fused_resnet
# float32 against float64, relative to the gradient's largest magnitude: sums of up to a few thousand products,
# measured 1-7e-7 on these cases (oneDNN's own: 1-30e-7).
TOLERANCE = 1e-5

# N, C, K, H, W, kernel, stride, padding, dilation: ResNet's 3x3, strided 3x3, 1x1 and strided 1x1 layers and its
# 7x7 stem; padding wider than the kernel's reach, dilation, non-square images, one pixel, one image, channel
# counts off the vector width.
CASES = [
    (2, 8, 16, 8, 8, 3, 1, 1, 1),
    (3, 5, 4, 7, 6, 3, 2, 1, 1),
    (2, 7, 3, 9, 9, 1, 2, 0, 1),
    (2, 16, 24, 5, 5, 1, 1, 0, 1),
    (2, 3, 8, 17, 15, 7, 2, 3, 1),
    (2, 4, 6, 8, 8, 3, 1, 2, 2),
    (1, 11, 5, 1, 1, 3, 1, 1, 1),
    (1, 6, 9, 4, 11, 3, 2, 1, 1),
]


def reference_weight_grad(x, grad, K, kernel, stride, padding, dilation):
    weight = torch.empty(K, x.shape[1], kernel, kernel, dtype=torch.float64)
    return torch.ops.aten.convolution_backward(
        grad.double(), x.double(), weight, None, [stride] * 2, [padding] * 2, [dilation] * 2, False, [0, 0], 1,
        [False, True, False])[1]


def random_case(case, memory_format, dtype):
    N, C, K, H, W, kernel, stride, padding, dilation = case
    x = torch.randn(N, C, H, W, dtype=dtype).contiguous(memory_format=memory_format)
    out_h = (H + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    out_w = (W + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    grad = torch.randn(N, K, out_h, out_w, dtype=dtype).contiguous(memory_format=memory_format)
    return x, grad


def run_op(x, grad, case):
    *_, kernel, stride, padding, dilation = case
    return ops.conv_weight_grad_gemm(x, grad, [kernel] * 2, [stride] * 2, [padding] * 2, [dilation] * 2)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_a_float64_weight_gradient(case, layout, dtype):
    """In the input's layout (a channels_last input gives a channels_last gradient, one that is NCHW too an NCHW
    one, as the kernel sets lay out outputs), every element written."""
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x, grad = random_case(case, memory_format, dtype)
    out = run_op(x, grad, case)
    N, C, K, H, W, kernel, stride, padding, dilation = case
    assert out.dtype == dtype and out.shape == (K, C, kernel, kernel)
    assert out.is_contiguous(memory_format=memory_format_of(x))
    expected = reference_weight_grad(x, grad, K, kernel, stride, padding, dilation)
    assert_rel(out, expected, TOLERANCE if dtype == torch.float32 else 1e-12, f"weight grad {case} {layout}")


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_a_batch_larger_than_one_piece_accumulates_every_piece(layout):
    """The patches are made a few images at a time (16 MB each): 64 channels at 40x40 are 3.7 MB of patches an
    image, so 6 images take two pieces, the second a partial one."""
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    case = (6, 64, 8, 40, 40, 3, 1, 1, 1)
    x, grad = random_case(case, memory_format, torch.float32)
    expected = reference_weight_grad(x, grad, 8, 3, 1, 1, 1)
    assert_rel(run_op(x, grad, case), expected, TOLERANCE, "two pieces")


def test_mixed_layouts_follow_the_input():
    x, grad = random_case(CASES[0], torch.channels_last, torch.float32)
    out = run_op(x, grad.contiguous(), CASES[0])
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_rel(out, reference_weight_grad(x, grad, 16, 3, 1, 1, 1), TOLERANCE, "channels_last input, NCHW grad")
    out = run_op(x.contiguous(), grad, CASES[0])
    assert out.is_contiguous()
    assert_rel(out, reference_weight_grad(x, grad, 16, 3, 1, 1, 1), TOLERANCE, "NCHW input, channels_last grad")


@pytest.mark.parametrize("arguments, expected", [
    ((torch.randn(2, 4, 5, 5, dtype=torch.bfloat16), torch.randn(2, 6, 5, 5, dtype=torch.bfloat16), [3, 3], [1, 1],
      [1, 1], [1, 1]), "expected input of dtype float32 or float64, got BFloat16"),
    ((torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5).double(), [3, 3], [1, 1], [1, 1], [1, 1]),
     "expected grad_output of the input's dtype Float, got Double"),
    ((torch.randn(4, 5, 5), torch.randn(2, 6, 5, 5), [3, 3], [1, 1], [1, 1], [1, 1]),
     r"expected input to be 4-D \(N, C, H, W\), got shape \[4, 5, 5\]"),
    ((torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 4), [3, 3], [1, 1], [1, 1], [1, 1]),
     r"expected grad_output of shape \[2, K, 5, 5\] \(the convolution's output\), got \[2, 6, 5, 4\]"),
    ((torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5), [3, 3], [0, 1], [1, 1], [1, 1]),
     r"expected stride values >= 1, got \[0, 1\]"),
    ((torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5), [3, 3], [1, 1], [-1, 1], [1, 1]),
     r"expected padding values >= 0, got \[-1, 1\]"),
    ((torch.randn(2, 4, 2, 2), torch.randn(2, 6, 1, 1), [5, 5], [1, 1], [0, 0], [1, 1]),
     r"the input \[2, 4, 2, 2\] is smaller than the kernel \[5, 5\]"),
])
def test_names_the_bad_argument(arguments, expected):
    with pytest.raises(RuntimeError, match=expected):
        ops.conv_weight_grad_gemm(*arguments)


def test_opcheck():
    """Schema, fake implementation (its layout the real one's) and dispatch."""
    for memory_format in (torch.channels_last, torch.contiguous_format):
        x, grad = random_case(CASES[1], memory_format, torch.float32)
        torch.library.opcheck(ops.conv_weight_grad_gemm.default, (x, grad, [3, 3], [2, 2], [1, 1], [1, 1]))


# ---------------------------------------------------------------------------------------------------------------
# The measured choice in training


def gemm_calls(block, x):
    with use_backend("cpu"), torch.profiler.profile() as profile:
        out = block(x)
        out.backward(torch.randn_like(out))
    return sum(e.count for e in profile.key_averages() if e.key == "fused_resnet::conv_weight_grad_gemm")


@pytest.fixture
def measured(monkeypatch):
    """CONVOLUTION_CHOICES measures with `measured.timings(candidates)` (each choice afresh inside the test): the
    candidates are run once, their results compared, and the GEMM given the smaller time where `gemm_wins`."""
    class Measured:
        gemm_wins = True
        calls: list[list[str]] = []

        def __call__(self, candidates):
            self.calls.append(sorted(candidates))
            results = {name: run() for name, run in candidates.items()}
            assert_rel(results["gemm"], results["direct"], TOLERANCE, "the candidates compute the same")
            assert results["gemm"].stride() == results["direct"].stride()
            return {"gemm": 1e-3, "direct": 2e-3} if self.gemm_wins else {"gemm": 2e-3, "direct": 1e-3}

    measure = Measured()
    CONVOLUTION_CHOICES.clear()
    monkeypatch.setattr(CONVOLUTION_CHOICES, "measure", measure)
    yield measure
    CONVOLUTION_CHOICES.clear()


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_training_computes_each_weight_gradient_as_measured_faster_once(measured, layout):
    """Each configuration's weight gradient is measured at its first backward and computed as chosen from then on;
    cpu_convolution_choices() names each with its times."""
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    block = randomize_batchnorms(fused_resnet.BasicBlock(8, 16, stride=2, downsample=torch.nn.Sequential(
        torch.nn.Conv2d(8, 16, 1, stride=2, bias=False), torch.nn.BatchNorm2d(16)))).to(memory_format=memory_format)
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=memory_format)
    # conv1 (3x3 stride 2), conv2 (3x3) and the projection (1x1 stride 2 of 8 channels, whose oneDNN gradient may
    # crash: computed as the stride-1 one of the subsampled input, itself a candidate)
    assert gemm_calls(block, x) == 3 + 3 and len(measured.calls) == 3  # each measurement runs the GEMM once
    assert gemm_calls(block, x) == 3 and len(measured.calls) == 3
    threads = torch.get_num_threads()
    suffix = " channels_last" if layout == "channels_last" else ""
    assert fused_resnet.cpu_convolution_choices() == {
        f"weight gradient 2x8x12x12{suffix} -> 16x8x3x3, stride 2, padding 1, {threads} threads":
            {"algorithm": "gemm", "ms": {"direct": 2.0, "gemm": 1.0}},
        f"weight gradient 2x16x6x6{suffix} -> 16x16x3x3, stride 1, padding 1, {threads} threads":
            {"algorithm": "gemm", "ms": {"direct": 2.0, "gemm": 1.0}},
        f"weight gradient 2x8x6x6{suffix} -> 16x8x1x1, stride 1, padding 0, {threads} threads":
            {"algorithm": "gemm", "ms": {"direct": 2.0, "gemm": 1.0}}}
    measured.gemm_wins = False
    assert gemm_calls(block, torch.randn(3, 8, 12, 12).contiguous(memory_format=memory_format)) == 3  # measuring
    assert len(measured.calls) == 6
    assert gemm_calls(block, torch.randn(3, 8, 12, 12).contiguous(memory_format=memory_format)) == 0


def test_only_eager_float32_single_group_gradients_are_candidates(measured):
    """use_cpu_convolutions("direct") keeps oneDNN's; bfloat16, grouped convolutions and autocast are not
    measured."""
    block = fused_resnet.BasicBlock(8, 8)
    x = torch.randn(2, 8, 6, 6)
    with fused_resnet.use_cpu_convolutions("direct"):
        assert gemm_calls(block, x) == 0
    assert gemm_calls(copy.deepcopy(block).to(torch.bfloat16), x.to(torch.bfloat16)) == 0
    # the grouped 3x3 is not measured; the two 1x1s are, and run the GEMM in the measurement and after it
    assert gemm_calls(fused_resnet.Bottleneck(16, 4, groups=2, base_width=64), torch.randn(2, 16, 6, 6)) == 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm_calls(copy.deepcopy(block), x) == 0
    assert measured.calls == [["direct", "gemm"]] * 2  # the Bottleneck's two 1x1 convolutions


@pytest.mark.parametrize("gemm_wins", [True, False])
@pytest.mark.parametrize("memory", ["default", "min"])
def test_a_training_step_through_either_weight_gradient_matches_float64(measured, gemm_wins, memory):
    """Output, every gradient and the running statistics against the float64 module, in both memory policies."""
    measured.gemm_wins = gemm_wins
    block = randomize_batchnorms(fused_resnet.Bottleneck(64, 16, stride=2, downsample=torch.nn.Sequential(
        torch.nn.Conv2d(64, 64, 1, stride=2, bias=False), torch.nn.BatchNorm2d(64)), memory=memory))
    block = block.to(memory_format=torch.channels_last)
    exact = copy.deepcopy(block).double()
    x = torch.randn(3, 64, 10, 10).contiguous(memory_format=torch.channels_last).requires_grad_()
    xd = x.detach().double().requires_grad_()
    grad = torch.randn(3, 64, 5, 5)
    assert gemm_calls(block, x) == (4 + 4 if gemm_wins else 4)  # measuring runs each once
    x.grad = None
    block.zero_grad()
    for module in (block, exact):  # the second step's statistics, against the same starting point
        module.load_state_dict(copy.deepcopy(exact.state_dict()))
    with use_backend("cpu"):
        out = block(x)
        out.backward(grad)
    with use_backend("torch"):
        expected = exact(xd)
        expected.backward(grad.double())
    assert_rel(out, expected, TOLERANCE, "output")
    assert_rel(x.grad, xd.grad, TOLERANCE, "grad x")
    for (name, p), q in zip(block.named_parameters(), exact.parameters()):
        assert p.grad.stride() == p.stride(), f"grad {name} in the parameter's layout"
        assert_rel(p.grad, q.grad, TOLERANCE, f"grad {name}")
    for (name, b), c in zip(block.named_buffers(), exact.buffers()):
        assert_rel(b, c, TOLERANCE, name)
