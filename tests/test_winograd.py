"""winograd_conv3x3 and winograd_conv3x3_weight_grad (F(4x4, 3x3), the cpu backend's convolution for 3x3 stride-1
layers): the ops with each CPU kernel table against float64, their argument errors, and the fused modules'
inference and training through them."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fused_resnet
from conftest import assert_rel, randomize_batchnorms
from fused_resnet import _native, use_backend
from fused_resnet.kernels import kernels_for
from fused_resnet.kernels.choices import ROUNDS, Choice, MeasuredChoices, measure_seconds
from kernel_cases import KERNEL_SETS, _install_cpu_table, poisoned_outputs  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(not _native.has_extension(), reason="the compiled extension is not built")

ops = torch.ops.fused_resnet
CPU_TABLES = ["cpu_default", "cpu_avx2"]
# F(4x4, 3x3) in float32 against the exact convolution, relative to the output's largest magnitude: measured
# 0.4-6e-6 on these cases (the transforms' 1/6 and 1/24 and sums of 36 products), cuDNN's Winograd alike.
TOLERANCE = 3e-5

# N, C, K, H, W: channel counts that are and are not multiples of the 8-lane vectors, images smaller than a tile,
# rows and columns that leave a partial last tile, one pixel, one row.
SHAPES = [(2, 8, 16, 8, 8), (1, 3, 5, 1, 1), (2, 17, 9, 9, 13), (3, 16, 24, 6, 3), (1, 11, 8, 1, 10),
          (2, 24, 19, 12, 12)]


@pytest.fixture(params=CPU_TABLES)
def cpu_table(request):
    """The op runs with the named kernel table; the one the loader chose is restored after."""
    kernel_set = KERNEL_SETS[request.param]
    if kernel_set.unavailable_reason is not None:
        pytest.skip(f"kernel set {kernel_set.name}: {kernel_set.unavailable_reason}")
    _install_cpu_table(kernel_set.cpu_table)
    yield request.param
    _install_cpu_table(_native.cpu_kernel_capability)


def reference(x, weight, bias, residual, relu):
    out = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    if residual is not None:
        out = out + residual.double()
    return torch.relu(out) if relu else out


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_winograd_conv3x3_matches_a_float64_convolution(cpu_table, shape, layout, with_bias, with_residual, relu):
    N, C, K, H, W = shape
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(N, C, H, W).contiguous(memory_format=memory_format)
    weight = torch.randn(K, C, 3, 3) / (3 * C**0.5)
    bias = torch.randn(K) if with_bias else None
    residual = torch.randn(N, K, H, W).contiguous(memory_format=memory_format) if with_residual else None
    out = ops.winograd_conv3x3(x, ops.winograd_weight_transform(weight), bias, residual, relu)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == torch.float32
    expected = reference(x, weight, bias, residual, relu)
    assert_rel(out, expected, TOLERANCE, f"winograd_conv3x3 {shape}")


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_winograd_conv3x3_weight_grad_matches_a_float64_one(cpu_table, shape, layout):
    N, C, K, H, W = shape
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(N, C, H, W).contiguous(memory_format=memory_format)
    grad = torch.randn(N, K, H, W).contiguous(memory_format=memory_format)
    expected = torch.ops.aten.convolution_backward(grad.double(), x.double(), torch.empty(K, C, 3, 3).double(), None,
                                                   [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False])[1]
    assert_rel(ops.winograd_conv3x3_weight_grad(x, grad), expected, TOLERANCE, f"weight grad {shape}")


def test_winograd_conv3x3_weight_grad_names_the_bad_argument():
    with pytest.raises(RuntimeError, match=r"expected grad_output of shape \[2, K, 5, 5\] like the input's"):
        ops.winograd_conv3x3_weight_grad(torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 4))
    with pytest.raises(RuntimeError, match="expected grad_output of dtype float32"):
        ops.winograd_conv3x3_weight_grad(torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5).double())


def test_winograd_weight_transform_is_g_g_gt(cpu_table):
    """u[p] = (G g G^T)[p] for every filter g, p = 6 * row + column, laid out 36 x C x K; from a channels_last weight
    too."""
    weight = torch.randn(5, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    G = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                      [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)
    expected = torch.einsum("ai,kcij,bj->abck", G, weight.double(), G).reshape(36, 3, 5)
    assert_rel(ops.winograd_weight_transform(weight), expected, 1e-7, "the weight transform")


@pytest.mark.parametrize(("argument", "expected"), [
    ("input", "expected input of dtype float32"),
    ("weight_transform", r"expected weight_transform of shape \(36, 4, K\)"),
    ("bias", r"expected bias of shape \(6\)"),
    ("residual", r"expected residual of the output's shape \[2, 6, 5, 5\]"),
])
def test_winograd_conv3x3_names_the_bad_argument(argument, expected):
    args = {"input": torch.randn(2, 4, 5, 5), "bias": torch.randn(6), "residual": torch.randn(2, 6, 5, 5),
            "weight_transform": ops.winograd_weight_transform(torch.randn(6, 4, 3, 3))}
    args[argument] = {"input": args["input"].double(), "weight_transform": torch.randn(36, 5, 6),
                      "bias": torch.randn(7), "residual": torch.randn(2, 6, 5, 4)}[argument]
    with pytest.raises(RuntimeError, match=expected):
        ops.winograd_conv3x3(args["input"], args["weight_transform"], args["bias"], args["residual"], True)


def test_winograd_weight_transform_names_the_bad_argument():
    with pytest.raises(RuntimeError, match=r"expected weight of shape \(K, C, 3, 3\)"):
        ops.winograd_weight_transform(torch.randn(4, 4, 1, 1))


def test_a_converted_resnet_infers_through_winograd_as_torchvision_does(winograd_measured_faster):
    """The cpu backend's inference of a converted resnet18 in channels_last float32 runs its 3x3 stride-1 layers
    through winograd_conv3x3 where it suits them (made from the folded weights, transformed once), and matches
    torchvision's eval forward."""
    torch.manual_seed(0)
    model = randomize_batchnorms(torchvision.models.resnet18(num_classes=10)).eval()
    model = model.to(memory_format=torch.channels_last)
    fused = fused_resnet.convert(copy.deepcopy(model)).eval()
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with use_backend("cpu"), torch.no_grad(), torch.profiler.profile() as profile:
        out = fused(x)
    calls = sum(e.count for e in profile.key_averages() if e.key == "fused_resnet::winograd_conv3x3")
    # layer1's four at 16x16, layer2's three of stride 1 at 8x8, layer3's three at 4x4 (one tile per image, but a
    # 256x256 weight); not layer4's, at 2x2 pixels (a quarter of a tile)
    assert calls == 10
    transforms = kernels_for("cpu")._winograd_transforms
    folded = [entry[2][0] for m in fused.modules() if "_folded" in m.__dict__ for entry in m._folded._entries.values()]
    assert sum(weight in transforms for weight in folded) == 10  # each made from its folded weight, kept with it
    with torch.no_grad():
        assert_rel(out, model(x), 1e-4, "resnet18 logits")


def winograd_calls(block: nn.Module, x: torch.Tensor) -> int:
    with use_backend("cpu"), torch.no_grad(), torch.profiler.profile() as profile:
        block(x.contiguous(memory_format=torch.channels_last))
    return sum(e.count for e in profile.key_averages() if e.key == "fused_resnet::winograd_conv3x3")


def test_a_fused_block_runs_direct_convolutions_where_winograd_does_not_suit(winograd_measured_faster):
    """A block's two 3x3 stride-1 convolutions run through winograd_conv3x3 with 32 channels at 16x16 pixels in
    float32, and as direct convolutions at 2x2 pixels (however many images), with 16 channels, and in float64."""
    block = randomize_batchnorms(fused_resnet.BasicBlock(32, 32)).eval().to(memory_format=torch.channels_last)
    assert winograd_calls(block, torch.randn(4, 32, 16, 16)) == 2
    assert winograd_calls(block, torch.randn(64, 32, 2, 2)) == 0
    assert winograd_calls(block.double(), torch.randn(4, 32, 16, 16).double()) == 0
    narrow = randomize_batchnorms(fused_resnet.BasicBlock(16, 16)).eval().to(memory_format=torch.channels_last)
    assert winograd_calls(narrow, torch.randn(4, 16, 16, 16)) == 0


def test_use_cpu_convolutions_direct_turns_winograd_off(winograd_measured_faster):
    block = randomize_batchnorms(fused_resnet.BasicBlock(32, 32)).eval().to(memory_format=torch.channels_last)
    with fused_resnet.use_cpu_convolutions("direct"):
        assert winograd_calls(block, torch.randn(4, 32, 16, 16)) == 0
    assert winograd_calls(block, torch.randn(4, 32, 16, 16)) == 2
    with pytest.raises(ValueError, match="use_cpu_convolutions: unknown cpu convolutions 'fast'; expected one of "
                                         "auto, direct, winograd"):
        fused_resnet.use_cpu_convolutions("fast").__enter__()


def winograd_training_calls(block: nn.Module, x: torch.Tensor) -> dict[str, int]:
    with use_backend("cpu"), torch.profiler.profile() as profile:
        out = block(x.contiguous(memory_format=torch.channels_last).requires_grad_())
        out.backward(torch.randn_like(out))
    return {e.key: e.count for e in profile.key_averages() if e.key.startswith("fused_resnet::winograd_conv3x3")}


def test_training_runs_winograd_only_when_asked():
    """By default a training step runs direct convolutions, whose gradients are as accurate as torchvision's
    (tests/test_training_accuracy.py); use_cpu_convolutions("winograd") opts into Winograd there too."""
    block = randomize_batchnorms(fused_resnet.BasicBlock(32, 32)).to(memory_format=torch.channels_last)
    x = torch.randn(4, 32, 16, 16)
    assert winograd_training_calls(block, x) == {}
    with fused_resnet.use_cpu_convolutions("direct"):
        assert winograd_training_calls(block, x) == {}
    with fused_resnet.use_cpu_convolutions("winograd"):
        assert winograd_training_calls(block, x) == {"fused_resnet::winograd_conv3x3": 4,
                                                     "fused_resnet::winograd_conv3x3_weight_grad": 2}
        assert winograd_calls(block.eval(), x) == 2


@pytest.mark.parametrize("memory", ["default", "min"])
def test_a_training_step_runs_its_3x3_convolutions_and_their_input_gradients_through_winograd(memory):
    """In training under use_cpu_convolutions("winograd"), a block's 3x3 stride-1 convolutions run as
    winograd_conv3x3, and so do their input gradients (a 3x3 convolution of the output gradient with the flipped,
    transposed weight), their weight gradients as winograd_conv3x3_weight_grad. The output, every gradient and the
    running statistics match float64 within Winograd's rounding."""
    torch.manual_seed(0)
    block = randomize_batchnorms(fused_resnet.Bottleneck(128, 32, memory=memory)).to(memory_format=torch.channels_last)
    exact = copy.deepcopy(block).double()
    x = torch.randn(4, 128, 12, 12).contiguous(memory_format=torch.channels_last).requires_grad_()
    xd = x.detach().double().requires_grad_()
    with use_backend("cpu"), fused_resnet.use_cpu_convolutions("winograd"), torch.profiler.profile() as profile:
        out = block(x)
        out.backward(torch.ones_like(out))
    calls = {e.key: e.count for e in profile.key_averages() if e.key.startswith("fused_resnet::winograd_conv3x3")}
    # conv2 and its input gradient ("min" recomputes conv3's output: a 1x1 convolution), and its weight gradient
    assert calls == {"fused_resnet::winograd_conv3x3": 2, "fused_resnet::winograd_conv3x3_weight_grad": 1}
    with use_backend("torch"):
        expected = exact(xd)
        expected.backward(torch.ones_like(expected))
    assert_rel(out, expected, TOLERANCE, "output")
    assert_rel(x.grad, xd.grad, TOLERANCE, "grad x")
    for (name, p), q in zip(block.named_parameters(), exact.parameters()):
        assert_rel(p.grad, q.grad, TOLERANCE, f"grad {name}")
    for (name, b), c in zip(block.named_buffers(), exact.buffers()):
        assert_rel(b, c, TOLERANCE, name)


def test_opcheck_the_winograd_ops():
    """Schemas, fake implementations (torch.compile, the benchmarks' byte count on fake tensors) and dispatch."""
    x = torch.randn(2, 8, 9, 7).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(12, 8, 3, 3)
    residual = torch.randn(2, 12, 9, 7).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(ops.winograd_weight_transform.default, (weight,))
    transform = ops.winograd_weight_transform(weight)
    for bias, res in ((torch.randn(12), residual), (None, None)):
        torch.library.opcheck(ops.winograd_conv3x3.default, (x, transform, bias, res, True))
    torch.library.opcheck(ops.winograd_conv3x3_weight_grad.default, (x, residual))


def test_inference_runs_what_was_measured_faster_and_keeps_it(monkeypatch):
    """use_cpu_convolutions("auto"): each inference configuration that Winograd suits is timed both ways once, at
    its first call, on the call's own tensors, and runs the faster from then on; cpu_convolution_choices() says what
    each runs and the times it was chosen by. "winograd" runs Winograd without measuring."""
    from fused_resnet.kernels.native import CONVOLUTION_CHOICES

    measured = []

    def measure(candidates):
        measured.append(sorted(candidates))
        outputs = {name: run() for name, run in candidates.items()}
        assert_rel(outputs["winograd"], outputs["direct"], 1e-5, "the candidates compute the same")
        return {"winograd": 2e-3, "direct": 1e-3} if len(measured) == 1 else {"winograd": 1e-3, "direct": 2e-3}

    CONVOLUTION_CHOICES.clear()
    monkeypatch.setattr(CONVOLUTION_CHOICES, "measure", measure)
    try:
        block = randomize_batchnorms(fused_resnet.BasicBlock(32, 32)).eval().to(memory_format=torch.channels_last)
        x = torch.randn(4, 32, 16, 16)
        # conv1 (+ ReLU) measured faster direct, conv2 (+ residual + ReLU) Winograd: the first forward runs
        # Winograd in each measurement and then in conv2, later ones in conv2 only
        assert winograd_calls(block, x) == 3
        assert measured == [["direct", "winograd"], ["direct", "winograd"]]
        assert winograd_calls(block, x) == 1 and len(measured) == 2  # chosen once, kept
        threads = torch.get_num_threads()
        assert fused_resnet.cpu_convolution_choices() == {
            f"4x32x16x16 -> 32, relu, {threads} threads": {"algorithm": "direct",
                                                          "ms": {"winograd": 2.0, "direct": 1.0}},
            f"4x32x16x16 -> 32 + residual, relu, {threads} threads": {"algorithm": "winograd",
                                                                     "ms": {"winograd": 1.0, "direct": 2.0}}}
        # a new batch size is a new configuration: measured again (Winograd faster in both now), then run
        assert winograd_calls(block, torch.randn(2, 32, 16, 16)) == 4 and len(measured) == 4
        with fused_resnet.use_cpu_convolutions("winograd"):
            assert winograd_calls(block, torch.randn(3, 32, 16, 16)) == 2 and len(measured) == 4
    finally:
        CONVOLUTION_CHOICES.clear()


def test_measured_choices_pick_the_fastest_once():
    choices = MeasuredChoices()
    timings = iter([{"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 1.0}])
    choices.measure = lambda candidates: next(timings)
    assert choices.choose("one", {"a": lambda: None, "b": lambda: None}) == "b"
    assert choices.choose("one", {"a": lambda: None, "b": lambda: None}) == "b"  # not measured again
    assert choices.choose("two", {"a": lambda: None, "b": lambda: None}) == "a"  # a tie goes to the first
    assert choices.made("one") == Choice("b", {"a": 2.0, "b": 1.0}) and choices.made("three") is None
    choices.clear()
    assert choices.items() == []


def test_measure_seconds_times_each_candidate_after_a_warm_up():
    calls = []
    seconds = measure_seconds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")})
    assert calls == ["a", "b"] + ["a", "b"] * ROUNDS  # interleaved
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())
