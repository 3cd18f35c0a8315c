"""conv_gemm, conv_input_grad_gemm and conv_weight_grad_gemm (a convolution, its input gradient and its weight
gradient as GEMMs with the input's patches) against float64, their argument errors, and the cpu backend's measured
choice between them and oneDNN's direct convolutions in training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import fused_resnet
from conftest import assert_rel, randomize_batchnorms, rel_err
from fused_resnet import _native, use_backend
from fused_resnet.kernels import kernels_for
from fused_resnet.kernels import native
from fused_resnet.kernels.native import CONVOLUTION_CHOICES
from fused_resnet.params import ConvParams
from fused_resnet.tensors import memory_format_of
from kernel_cases import poisoned_outputs  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(not _native.has_extension(), reason="the compiled extension is not built")

ops = torch.ops.fused_resnet
# float32 against float64, relative to the result's largest magnitude: sums of up to a few thousand products,
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
KINDS = ["forward", "input_grad", "weight_grad"]
# The GEMMs multiply bfloat16 and float16 in float32 and round each output once, as oneDNN does: relative to the
# largest value, one rounding of the output (measured 2-4e-3 in bfloat16, 2-5e-4 in float16).
LOW_PRECISION_TOLERANCE = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


# The test layouts: (the activations', the weight's). An NCHW model's blocks train with channels_last activations and
# NCHW weights (models.py, enter_blocks).
LAYOUTS = {"channels_last": (torch.channels_last, torch.channels_last),
           "nchw": (torch.contiguous_format, torch.contiguous_format),
           "nchw_weight": (torch.channels_last, torch.contiguous_format)}


def random_case(case, memory_format, dtype, weight_format=None):
    """(input, weight, output gradient), fresh random values laid out in `memory_format` (the weight in
    `weight_format`, by default the same)."""
    N, C, K, H, W, kernel, stride, padding, dilation = case
    x = torch.randn(N, C, H, W, dtype=dtype).contiguous(memory_format=memory_format)
    weight = torch.randn(K, C, kernel, kernel, dtype=dtype).contiguous(memory_format=weight_format or memory_format)
    out_h = (H + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    out_w = (W + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    grad = torch.randn(N, K, out_h, out_w, dtype=dtype).contiguous(memory_format=memory_format)
    return x, weight, grad


def run_op(kind, x, weight, grad, case, weight_format=None):
    """The op of `kind`; the weight gradient laid out as `weight_format` where given, else by default (x's)."""
    *_, kernel, stride, padding, dilation = case
    geometry = ([stride] * 2, [padding] * 2, [dilation] * 2)
    if kind == "forward":
        return ops.conv_gemm(x, weight, *geometry)
    if kind == "input_grad":
        return ops.conv_input_grad_gemm(grad, weight, list(x.shape), *geometry)
    if weight_format is None:
        return ops.conv_weight_grad_gemm(x, grad, [kernel] * 2, *geometry)
    return ops.conv_weight_grad_gemm(x, grad, [kernel] * 2, *geometry, weight_format)


def reference(kind, x, weight, grad, case):
    """The float64 result, by ATen."""
    return onednn(kind, x.double(), weight.double(), grad.double(), case)


def onednn(kind, x, weight, grad, case):
    """ATen's result (oneDNN's, below float64) in the operands' dtype."""
    *_, stride, padding, dilation = case
    if kind == "forward":
        return F.conv2d(x, weight, None, stride, padding, dilation)
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, [stride] * 2, [padding] * 2, [dilation] * 2, False, [0, 0], 1, [True, True, False])
    return grad_x if kind == "input_grad" else grad_w


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("kind", KINDS)
def test_matches_float64(kind, case, layout, dtype):
    """Laid out as the first argument (channels_last gives channels_last, a tensor that is NCHW too an NCHW one, as
    the kernel sets lay out outputs), every element written; with channels_last activations and an NCHW weight
    (the patches then in the weight's order), the weight gradient asked for NCHW. bfloat16 and float16 round as
    oneDNN's convolutions do where the cpu backend lets the GEMM run (forward, weight gradient, 1x1 input
    gradient): each output once, from float32 sums."""
    memory_format, weight_format = LAYOUTS[layout]
    x, weight, grad = random_case(case, memory_format, dtype, weight_format)
    out = run_op(kind, x, weight, grad, case, weight_format if layout == "nchw_weight" else None)
    expected = reference(kind, x, weight, grad, case)
    assert out.dtype == dtype
    first = grad if kind == "input_grad" else x
    asked = kind == "weight_grad" and layout == "nchw_weight"  # the weight gradient's layout asked for
    assert out.is_contiguous(memory_format=weight_format if asked else memory_format_of(first))
    assert_rel(out, expected, LOW_PRECISION_TOLERANCE.get(dtype, TOLERANCE if dtype == torch.float32 else 1e-12),
               f"{kind} {case} {layout}")
    if dtype in LOW_PRECISION_TOLERANCE and (kind != "input_grad" or case[5] == 1):
        onednn_error = rel_err(onednn(kind, x, weight, grad, case), expected)
        assert rel_err(out, expected) <= 1.1 * onednn_error + 1e-6, f"rounds more than oneDNN's ({onednn_error:.1e})"


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_larger_than_one_piece_is_computed_piece_by_piece(kind, layout):
    """The patches are made a few images at a time (16 MB each): 64 channels at 40x40 are 3.7 MB of patches an
    image, so 6 images take two pieces, the second a partial one."""
    memory_format, weight_format = LAYOUTS[layout]
    case = (6, 64, 8, 40, 40, 3, 1, 1, 1)
    x, weight, grad = random_case(case, memory_format, torch.float32, weight_format)
    out = run_op(kind, x, weight, grad, case, weight_format if layout == "nchw_weight" else None)
    assert_rel(out, reference(kind, x, weight, grad, case), TOLERANCE, "two pieces")


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_layouts_follow_the_first_argument(kind):
    case = CASES[0]
    x, weight, grad = random_case(case, torch.channels_last, torch.float32)
    expected = reference(kind, x, weight, grad, case)
    for args in ((x, weight.contiguous(), grad.contiguous()), (x.contiguous(), weight, grad)):
        out = run_op(kind, *args, case)
        first = args[2] if kind == "input_grad" else args[0]
        assert out.is_contiguous(memory_format=memory_format_of(first))
        assert_rel(out, expected, TOLERANCE, f"{kind}, mixed layouts")


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("call, expected", [
    (lambda: ops.conv_gemm(torch.ones(2, 4, 5, 5, dtype=torch.int64), _t(6, 4, 3, 3), [1, 1], [1, 1], [1, 1]),
     r"conv_gemm: expected input of a floating-point dtype \(float32, float64, bfloat16 or float16\), got Long"),
    (lambda: ops.conv_gemm(_t(2, 4, 5, 5), _t(6, 4, 3, 3).double(), [1, 1], [1, 1], [1, 1]),
     "conv_gemm: expected weight of the same dtype as the first argument, Float, got Double"),
    (lambda: ops.conv_gemm(_t(2, 4, 5, 5), _t(6, 3, 3, 3), [1, 1], [1, 1], [1, 1]),
     r"conv_gemm: expected weight of shape \(K, 4, kh, kw\) for the input's 4 channels, got \[6, 3, 3, 3\]"),
    (lambda: ops.conv_gemm(_t(4, 5, 5), _t(6, 4, 3, 3), [1, 1], [1, 1], [1, 1]),
     r"conv_gemm: expected input to be 4-D, got shape \[4, 5, 5\]"),
    (lambda: ops.conv_gemm(_t(2, 4, 5, 5), _t(6, 4, 3, 3), [0, 1], [1, 1], [1, 1]),
     r"conv_gemm: expected stride values >= 1, got \[0, 1\]"),
    (lambda: ops.conv_gemm(_t(2, 4, 2, 2), _t(6, 4, 5, 5), [1, 1], [0, 0], [1, 1]),
     r"conv_gemm: the input \[2, 4, 2, 2\] is smaller than the kernel \[5, 5\]"),
    (lambda: ops.conv_input_grad_gemm(_t(2, 6, 5, 5), _t(6, 4, 3, 3), [2, 3, 5, 5], [1, 1], [1, 1], [1, 1]),
     r"conv_input_grad_gemm: expected input_size \(N, 4, H, W\) for the weight's 4 input channels, got \[2, 3, 5, 5\]"),
    (lambda: ops.conv_input_grad_gemm(_t(2, 6, 5, 4), _t(6, 4, 3, 3), [2, 4, 5, 5], [1, 1], [1, 1], [1, 1]),
     r"conv_input_grad_gemm: expected grad_output of shape \[2, 6, 5, 5\] \(the convolution's output\), got "
     r"\[2, 6, 5, 4\]"),
    (lambda: ops.conv_input_grad_gemm(_t(2, 6, 5, 5), _t(6, 4, 3, 3), [2, 4, 5, 5], [1, 1], [-1, 1], [1, 1]),
     r"conv_input_grad_gemm: expected padding values >= 0, got \[-1, 1\]"),
    (lambda: ops.conv_weight_grad_gemm(_t(2, 4, 5, 5), _t(2, 6, 5, 5).double(), [3, 3], [1, 1], [1, 1], [1, 1]),
     "conv_weight_grad_gemm: expected grad_output of the same dtype as the first argument, Float, got Double"),
    (lambda: ops.conv_weight_grad_gemm(_t(2, 4, 5, 5), _t(2, 6, 5, 4), [3, 3], [1, 1], [1, 1], [1, 1]),
     r"conv_weight_grad_gemm: expected grad_output of shape \[2, K, 5, 5\] \(the convolution's output\), got "
     r"\[2, 6, 5, 4\]"),
    (lambda: ops.conv_weight_grad_gemm(_t(2, 4, 5, 5), _t(2, 6, 5, 5), [3], [1, 1], [1, 1], [1, 1]),
     r"conv_weight_grad_gemm: expected kernel_size of 2 values, got \[3\]"),
    (lambda: ops.conv_weight_grad_gemm(_t(2, 4, 5, 5), _t(2, 6, 5, 5), [3, 3], [1, 1], [1, 1], [1, 1],
                                       torch.channels_last),
     "conv_weight_grad_gemm: expected weight_format torch.contiguous_format, or torch.channels_last for a "
     "channels_last input or a 1x1 kernel, got ChannelsLast for a Contiguous input"),
])
def test_names_the_bad_argument(call, expected):
    with pytest.raises(RuntimeError, match=expected):
        call()


@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(kind):
    """Schema, fake implementation (its layout the real one's) and dispatch."""
    op = {"forward": ops.conv_gemm, "input_grad": ops.conv_input_grad_gemm,
          "weight_grad": ops.conv_weight_grad_gemm}[kind].default
    for memory_format, weight_format in LAYOUTS.values():
        x, weight, grad = random_case(CASES[1], memory_format, torch.float32, weight_format)
        args = {"forward": (x, weight, [2, 2], [1, 1], [1, 1]),
                "input_grad": (grad, weight, list(x.shape), [2, 2], [1, 1], [1, 1]),
                "weight_grad": (x, grad, [3, 3], [2, 2], [1, 1], [1, 1], weight_format)}[kind]
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------------------------
# The measured choice in training


GEMM_OPS = ("fused_resnet::conv_gemm", "fused_resnet::conv_input_grad_gemm", "fused_resnet::conv_weight_grad_gemm")


def layout_strides(t):
    """t's strides in its dimensions longer than 1: what AccumulateGrad's layout contract compares (a 1x1 weight's
    size-1 dimensions may have any stride)."""
    return tuple(stride for stride, size in zip(t.stride(), t.shape) if size != 1)


def gemm_calls(block, x):
    """How many times a training step of `block` on `x` (fresh output gradient) runs each GEMM op, all together."""
    with use_backend("cpu"), torch.profiler.profile() as profile:
        out = block(x)
        out.backward(torch.randn_like(out))
    return sum(e.count for e in profile.key_averages() if e.key in GEMM_OPS)


class Measured:
    """CONVOLUTION_CHOICES's measure: runs each candidate once, checks that they agree (values and layout), and
    gives the candidate named `winner` the smaller time (1 ms, the others 2), the GEMM where there is no such
    candidate; `calls` lists the measurements."""

    def __init__(self) -> None:
        self.winner = "gemm"
        self.calls: list[list[str]] = []

    def __call__(self, candidates):
        self.calls.append(sorted(candidates))
        results = {name: run() for name, run in candidates.items()}
        tolerance = LOW_PRECISION_TOLERANCE.get(results["gemm"].dtype, TOLERANCE)
        for name, result in results.items():
            assert_rel(result, results["gemm"], tolerance, f"{name} computes what the GEMM does")
            assert layout_strides(result) == layout_strides(results["gemm"]), name
        winner = self.winner if self.winner in candidates else "gemm"
        return {name: 1e-3 if name == winner else 2e-3 for name in candidates}


@pytest.fixture
def measured(monkeypatch):
    """Every choice made afresh inside the test by a Measured, and forgotten after it."""
    measure = Measured()
    CONVOLUTION_CHOICES.clear()
    monkeypatch.setattr(CONVOLUTION_CHOICES, "measure", measure)
    yield measure
    CONVOLUTION_CHOICES.clear()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_runs_each_convolution_as_measured_faster_once(measured, monkeypatch, layout):
    """Each configuration (forward, input gradient, weight gradient) is measured at its first call and computed as
    chosen from then on; cpu_convolution_choices() names each with its times (an NCHW weight with channels_last
    activations as such: its own configuration)."""
    memory_format, weight_format = LAYOUTS[layout]
    block = randomize_batchnorms(fused_resnet.BasicBlock(8, 16, stride=2, downsample=torch.nn.Sequential(
        torch.nn.Conv2d(8, 16, 1, stride=2, bias=False), torch.nn.BatchNorm2d(16)))).to(memory_format=weight_format)
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=memory_format)
    suffix = " channels_last" if memory_format == torch.channels_last else ""
    nchw = " NCHW" if layout == "nchw_weight" else ""  # the 3x3 weights' (a 1x1 weight is both)
    threads = torch.get_num_threads()
    expected_names = [
        f"forward 2x8x12x12{suffix} -> 16x8x3x3{nchw}, stride 2, padding 1",  # conv1
        f"forward 2x16x6x6{suffix} -> 16x16x3x3{nchw}, stride 1, padding 1",  # conv2
        f"forward 2x8x12x12{suffix} -> 16x8x1x1, stride 2, padding 0",  # the projection
        f"input gradient 2x16x6x6{suffix} -> 16x16x3x3{nchw}, stride 1, padding 1",  # conv2's (x needs none)
        f"weight gradient 2x16x6x6{suffix} -> 16x16x3x3{nchw}, stride 1, padding 1",
        f"weight gradient 2x8x12x12{suffix} -> 16x8x3x3{nchw}, stride 2, padding 1",
        # the projection's: oneDNN's may crash at 8 channels, so it is the stride-1 gradient of the subsampled
        # input, itself a candidate
        f"weight gradient 2x8x6x6{suffix} -> 16x8x1x1, stride 1, padding 0",
    ]
    # oneDNN's channels_last forward of an NCHW weight is never a candidate here (its rounding is still measured)
    monkeypatch.setattr(native, "ROUNDING_ALLOWANCE", -1.0)
    # each measurement runs the GEMM once, then the step runs it
    assert gemm_calls(block, x) == 2 * 7 and len(measured.calls) == 7
    assert gemm_calls(block, x) == 7 and len(measured.calls) == 7
    choices = fused_resnet.cpu_convolution_choices()
    roundings = {name: choice.pop("channels_last rounding") for name, choice in choices.items()
                 if "channels_last rounding" in choice}
    assert choices == {
        f"{name}, {threads} threads": {"algorithm": "gemm", "ms": {"direct": 2.0, "gemm": 1.0}}
        for name in expected_names}
    # measured for the forwards of NCHW 3x3 weights with channels_last activations, and only those
    assert sorted(roundings) == sorted(name for name in choices if name.startswith("forward") and " NCHW" in name)
    assert len(roundings) == (2 if layout == "nchw_weight" else 0)
    assert all(0 < ratio < math.inf for ratio in roundings.values())
    measured.winner = "direct"  # a new batch size: new configurations, measured, then run directly
    assert gemm_calls(block, torch.randn(3, 8, 12, 12).contiguous(memory_format=memory_format)) == 7
    assert len(measured.calls) == 14
    assert gemm_calls(block, torch.randn(3, 8, 12, 12).contiguous(memory_format=memory_format)) == 0


@pytest.mark.parametrize("allowance, candidate", [(math.inf, True), (-1.0, False)])
def test_an_nchw_weights_channels_last_forward_is_a_candidate_where_it_rounds_as_nchw(measured, monkeypatch, allowance,
                                                                                     candidate):
    """oneDNN's channels_last forward of an NCHW weight (channels_last activations) is a candidate where its error
    against float64 on the configuration's first call is within ROUNDING_ALLOWANCE of the NCHW forward's: measured
    once per configuration (the ratio cpu_convolution_choices() shows), then each call either way."""
    monkeypatch.setattr(native, "ROUNDING_ALLOWANCE", allowance)
    monkeypatch.setattr(native, "CHANNELS_LAST_ROUNDING", {})
    measured.winner = "channels_last"
    kernels = kernels_for("cpu")
    conv = ConvParams(torch.randn(8, 5, 3, 3), None, (1, 1), (1, 1), (1, 1), 1)
    x = torch.randn(2, 5, 7, 7).contiguous(memory_format=torch.channels_last)
    exact = F.conv2d(x.double(), conv.weight.double(), padding=1)
    for _ in range(2):
        out = kernels.conv(x, conv)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert_rel(out, exact, TOLERANCE, "forward")
    assert measured.calls == [["channels_last", "direct", "gemm"] if candidate else ["direct", "gemm"]]
    (name, choice), = fused_resnet.cpu_convolution_choices().items()
    assert choice["algorithm"] == ("channels_last" if candidate else "gemm")
    assert choice["channels_last rounding"] == round(next(iter(native.CHANNELS_LAST_ROUNDING.values())), 2) > 0


def test_what_is_not_a_candidate(measured):
    """use_cpu_convolutions("direct") keeps oneDNN's; grouped convolutions, autocast, a channels_last 3x3 weight with
    NCHW activations and a bfloat16 3x3 input gradient are not measured."""
    block = fused_resnet.BasicBlock(8, 8)
    x = torch.randn(2, 8, 6, 6)
    with fused_resnet.use_cpu_convolutions("direct"):
        assert gemm_calls(block, x) == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm_calls(copy.deepcopy(block), x) == 0
    assert measured.calls == []
    # a channels_last 3x3 weight with NCHW activations (one operand would be converted)
    kernels = kernels_for("cpu")
    conv = ConvParams(torch.randn(8, 8, 3, 3).contiguous(memory_format=torch.channels_last), None, (1, 1), (1, 1),
                      (1, 1), 1)
    out = kernels.conv(x, conv)
    kernels.conv_backward(torch.randn_like(out), x, conv, True, True, False)
    assert measured.calls == []
    # the grouped 3x3 is not a candidate; the two 1x1s are, forward and weight gradient, and conv3's input
    # gradient (x needs none): 5 measurements, each running the GEMM once, then the step running it
    assert gemm_calls(fused_resnet.Bottleneck(16, 4, groups=2, base_width=64), torch.randn(2, 16, 6, 6)) == 10
    assert len(measured.calls) == 5
    # in bfloat16: the forward and the weight gradient of conv1 and conv2 (one configuration each, measured once,
    # then run by both), not conv2's input gradient
    CONVOLUTION_CHOICES.clear()
    assert gemm_calls(copy.deepcopy(block).to(torch.bfloat16), x.to(torch.bfloat16)) == 2 * (1 + 2)
    assert sorted(name.split(" 2x")[0] for name in fused_resnet.cpu_convolution_choices()) == [
        "forward", "weight gradient"]


@pytest.mark.parametrize("memory", ["default", "min"])
@pytest.mark.parametrize("layout, winner", [
    (layout, winner) for layout in LAYOUTS
    for winner in ("gemm", "direct", *(("channels_last",) if layout == "nchw_weight" else ()))])
def test_a_training_step_through_either_algorithm_matches_float64(measured, monkeypatch, layout, winner, memory):
    """Output, every gradient (in its parameter's layout, NCHW ones too under channels_last activations) and the
    running statistics against the float64 module, in both memory policies, on a step after the one that chose:
    with the GEMMs chosen, oneDNN's convolutions, or (an NCHW weight with channels_last activations) oneDNN's
    channels_last forward for the 3x3 layer, the GEMMs for the 1x1 ones."""
    measured.winner = winner
    # oneDNN's channels_last forward of an NCHW weight as a candidate (and, by Measured, the winner) wherever asked
    monkeypatch.setattr(native, "ROUNDING_ALLOWANCE", math.inf)
    memory_format, weight_format = LAYOUTS[layout]
    block = randomize_batchnorms(fused_resnet.Bottleneck(64, 16, stride=2, downsample=torch.nn.Sequential(
        torch.nn.Conv2d(64, 64, 1, stride=2, bias=False), torch.nn.BatchNorm2d(64)), memory=memory))
    block = block.to(memory_format=weight_format)
    exact = copy.deepcopy(block).double()
    x = torch.randn(3, 64, 10, 10).contiguous(memory_format=memory_format).requires_grad_()
    xd = x.detach().double().requires_grad_()
    grad = torch.randn(3, 64, 5, 5).contiguous(memory_format=memory_format)
    # 4 convolutions, each forward, input and weight gradient measured; "min" recomputes conv3's and the
    # projection's outputs in backward
    runs = gemm_calls(block, x)
    chosen = [choice["algorithm"] for choice in fused_resnet.cpu_convolution_choices().values()]
    assert len(measured.calls) == 12 and chosen.count(winner) == (1 if winner == "channels_last" else 12)
    # each measurement runs the GEMM once, then the step each chosen one; "min" recomputes the two 1x1 outputs
    assert runs == 12 + chosen.count("gemm") + (2 if memory == "min" and winner != "direct" else 0)
    x.grad = None
    block.zero_grad()
    block.load_state_dict(exact.state_dict())  # the same starting point
    with use_backend("cpu"):
        out = block(x)
        out.backward(grad)
    with use_backend("torch"):
        expected = exact(xd)
        expected.backward(grad.double())
    assert len(measured.calls) == 12
    assert_rel(out, expected, TOLERANCE, "output")
    assert_rel(x.grad, xd.grad, TOLERANCE, "grad x")
    for (name, p), q in zip(block.named_parameters(), exact.parameters()):
        assert layout_strides(p.grad) == layout_strides(p), f"grad {name} in the parameter's layout"
        assert_rel(p.grad, q.grad, TOLERANCE, f"grad {name}")
    for (name, b), c in zip(block.named_buffers(), exact.buffers()):
        assert_rel(b, c, TOLERANCE, name)
