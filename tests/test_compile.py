"""torch.compile and torch.library checks: fused models compile with fullgraph=True and match eager; every
compiled op passes torch.library.opcheck (schema, fake implementation, dispatch)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fused_resnet
from conftest import CPU_BACKENDS, assert_rel, randomize_batchnorms
from fused_resnet import _native, ops, use_backend

pytestmark = pytest.mark.skipif(not CPU_BACKENDS, reason="no fused backend runs on the CPU here")


def small_network() -> nn.Module:
    """Every fused module kind in a few layers: a fused stem, option A, a projection, a Bottleneck."""
    return nn.Sequential(
        fused_resnet.ConvBNReLU(3, 8),
        fused_resnet.BasicBlock(8, 16, 2, shortcut="A"),
        fused_resnet.Bottleneck(16, 8, 2, shortcut="B"),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5),
    )


@pytest.mark.parametrize("train", [True, False])
def test_fused_network_compiles_without_graph_breaks_and_matches_eager(train):
    torch._dynamo.reset()
    eager = randomize_batchnorms(small_network()).double().train(train)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    for step in range(2):
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_e, out_c = eager(xe), compiled(xc)
        assert_rel(out_c, out_e, 1e-10, f"output, step {step}")
        out_e.sum().backward()
        out_c.sum().backward()
        assert_rel(xc.grad, xe.grad, 1e-10, "grad x")
    for (name, p), q in zip(compiled_model.named_parameters(), eager.parameters()):
        assert_rel(p.grad, q.grad, 1e-10, f"grad {name}", floor=1.0)
    for (name, b), r in zip(compiled_model.named_buffers(), eager.buffers()):
        assert_rel(b, r, 1e-12, name)


def test_compiled_inference_sees_weights_change_in_place():
    """A compiled graph reads the modules' folded-weight caches at run time: it must not keep stale weights."""
    torch._dynamo.reset()
    eager = randomize_batchnorms(small_network()).double().eval()
    compiled = torch.compile(eager, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        before = compiled(x)
        eager[1].conv1.weight.mul_(1.5)
        eager[2].bn2.running_var.mul_(3.0)
        after = compiled(x)
        with fused_resnet.use_backend("torch"):
            expected = eager(x)
    assert_rel(after, expected, 1e-10)
    assert not torch.allclose(before, after)


needs_extension = pytest.mark.skipif(not _native.has_extension(), reason=str(_native.load_error))


def op_samples(ops=None, device="cpu"):
    """(op, args) covering each BatchNorm op's optional arguments (of torch.ops.fused_resnet, or another namespace
    with the same schemas), on `device`, float32 NCHW and float64 channels_last."""
    ops = ops if ops is not None else torch.ops.fused_resnet
    samples = []
    for dtype, fmt in ((torch.float32, torch.contiguous_format), (torch.float64, torch.channels_last)):
        x = torch.randn(2, 6, 5, 4, dtype=dtype, device=device).contiguous(memory_format=fmt)
        r = torch.randn_like(x)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        v = [torch.randn(6, dtype=acc, device=device) for _ in range(8)]
        out = torch.relu(torch.randn_like(x))
        small = torch.randn(2, 4, 10, 8, dtype=dtype, device=device).contiguous(memory_format=fmt)
        samples += [
            (ops.batch_stats.default, (x,)),
            (ops.bn_act.default, (x, v[0], v[1], v[2], None, None, None, None, True)),
            (ops.bn_act.default, (x, None, v[1], v[2], r, None, None, None, False)),
            (ops.bn_act.default, (x, v[0], v[1], v[2], r, v[3], v[4], v[5], False)),
            (ops.bn_act.default, (x, v[0], v[1], v[2], r, None, v[4], v[5], True)),
            (ops.bn_act.default, (x, v[0], v[1], v[2], small, None, None, None, True, 2, 1)),
            (ops.bn_act_backward_reduce.default, (r, out, x, v[0], None, None)),
            (ops.bn_act_backward_reduce.default, (r, None, x, v[0], out, v[1])),
            (ops.bn_act_backward_elemt.default,
             (r, out, x, v[0], v[1], v[2], v[3], None, None, None, None, None, True)),
            (ops.bn_act_backward_elemt.default,
             (r, out, x, v[0], v[1], v[2], v[3], out, v[4], v[5], v[6], v[7], False)),
            (ops.bn_act_backward_reduce.default, (r, None, x, v[0], None, None, v[1], v[2])),
            (ops.bn_act_backward_elemt.default,
             (r, None, x, v[0], v[1], v[2], v[3], None, None, None, None, None, False, v[4], v[5])),
        ]
    return samples


NATIVE_DEVICES = ["cpu"] + (["cuda"] if fused_resnet.backend_status()["cuda"] == "available" else [])


@needs_extension
@pytest.mark.parametrize("device", NATIVE_DEVICES)
@pytest.mark.parametrize("sample", range(16))
def test_opcheck(sample, device):
    op, args = op_samples(device=device)[sample]
    torch.library.opcheck(op, args)


def folded_entries(model: nn.Module) -> dict[tuple[str, int], torch.Tensor]:
    """{(module name, unit index): the cached folded weight} of every fused module of `model`."""
    return {(name, index): entry[2][0] for name, module in model.named_modules()
            if isinstance(module.__dict__.get("_folded"), ops.FoldedWeights)
            for index, entry in module._folded._entries.items()}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_inference_folds_once_and_refolds_only_what_changed(backend):
    """Under torch.compile each folded unit is one opaque op reading the module's cache: the second call folds
    nothing, and a change refolds only the unit it touches."""
    torch._dynamo.reset()
    model = randomize_batchnorms(small_network()).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 12, 12)
    with use_backend(backend), torch.no_grad():
        compiled(x)
        first = folded_entries(model)
        compiled(x)
        second = folded_entries(model)
        model[2].bn2.running_mean.add_(0.5)
        changed = compiled(x)
        third = folded_entries(model)
        with use_backend("torch"):
            expected = model(x)
    assert len(first) == 7 and all(second[key] is first[key] for key in first)
    assert [key for key in first if third[key] is not first[key]] == [("2", 1)]
    assert_rel(changed, expected, 1e-5)


@pytest.mark.parametrize("layout", ["nchw", "cl", "cl-one-channel"])
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck_folded_conv_act(residual, layout):
    """opcheck, which compares the outputs' strides with the fake implementation's too. cl-one-channel: an input
    laid out channels_last with one channel (a grayscale NHWC batch, permuted) counts as NCHW, but the convolution
    lays its output out channels_last; the op returns the layout it promises."""
    in_channels = 1 if layout == "cl-one-channel" else 6
    memory_format = torch.contiguous_format if layout == "nchw" else torch.channels_last
    conv = nn.Conv2d(in_channels, 8, 3, padding=1, bias=True)
    bn = randomize_batchnorms(nn.BatchNorm2d(8)).eval()
    x = torch.empty(2, in_channels, 7, 5, memory_format=memory_format).normal_()
    r = torch.randn(2, 8, 7, 5).contiguous(memory_format=memory_format) if residual else None
    folded = ops.FoldedWeights()
    args = (x, r, conv.weight.detach(), conv.bias.detach(), bn.weight.detach(), bn.bias.detach(), bn.running_mean,
            bn.running_var, bn.eps, [1, 1], [1, 1], [1, 1], 1, True, 0, 0, CPU_BACKENDS[0], folded.handle, 0)
    torch.library.opcheck(torch.ops.fused_resnet.folded_conv_act.default, args)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_jit_script_raises_one_clear_error_naming_what_to_use_instead():
    """torch.jit.script of a fused model, converted or the library's, or of a module holding a fused block, raises
    one RuntimeError naming torch.compile, torch.export and torch.jit.trace, the same on every try (it used to
    fail on a missing attribute, then with "Can't redefine method: forward"), and leaves scripting of other
    modules working."""
    torchvision = pytest.importorskip("torchvision")
    models = [fused_resnet.convert(torchvision.models.resnet18()), fused_resnet.convert(torchvision.models.resnet18()),
              fused_resnet.cifar_resnet(8), nn.Sequential(nn.Identity(), fused_resnet.ConvBNReLU(3, 4))]
    for model in models:
        with pytest.raises(RuntimeError) as error:
            torch.jit.script(model)
        message = str(error.value)
        assert message.startswith("torch.jit.script cannot compile fused_resnet's ")
        assert all(alternative in message for alternative in ("torch.compile", "torch.export", "torch.jit.trace"))
    block = torchvision.models.resnet.BasicBlock(4, 4).eval()
    scripted = torch.jit.script(block)
    x = torch.randn(1, 4, 5, 5)
    assert_rel(scripted(x), block(x), 0)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace:FutureWarning")
@pytest.mark.parametrize("mode", [
    "train", "eval", "inference",
])
def test_jit_trace_of_a_converted_model_matches_eager(mode, winograd_measured_faster):
    """torch.jit.trace of a converted torchvision ResNet on the cpu backend: on a new input the traced module
    computes the eager model's output, and (with gradients) its input and parameter gradients and running
    statistics. Traced after an eager call: a first call inside the trace asks oneDNN which dtypes it fuses, a
    query the tracer cannot record. Winograd measured the faster: where eager inference chose oneDNN's fused
    primitive, the trace records conv + one pass instead (1e-6 apart, one CI run in five)."""
    torchvision = pytest.importorskip("torchvision")
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("the cpu backend is not built here")
    reference = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=5)
    model = fused_resnet.convert(randomize_batchnorms(reference)).train(mode == "train")
    eager = copy.deepcopy(model)
    grad = mode != "inference"
    x, new_x = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with use_backend("cpu"), torch.set_grad_enabled(grad):
        eager(x)
        traced = torch.jit.trace(model, x, check_trace=False)
    inputs = [new_x.clone().requires_grad_(grad) for _ in range(2)]
    with use_backend("cpu"), torch.set_grad_enabled(grad):
        out, expected = traced(inputs[0]), eager(inputs[1])
    # Inference: eager runs oneDNN's fused convolution primitives where the trace records conv + one pass (it cannot
    # record their optional scalars): two float32 orders, up to ~1e-6 apart on an AVX-512 CPU (1 run in 6 over it).
    assert_rel(out, expected, 1e-5 if mode == "inference" else 1e-6, "output")
    for name, buffer in eager.named_buffers():
        assert_rel(dict(model.named_buffers())[name].double(), buffer.double(), 1e-6, name)
    if grad:
        weight = torch.randn(out.shape)
        (out * weight).sum().backward()
        (expected * weight).sum().backward()
        assert_rel(inputs[0].grad, inputs[1].grad, 1e-6, "input gradient")
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            assert_rel(p.grad, q.grad, 1e-6, name)
