"""The memory policy of training (fused_resnet.memory): what each policy keeps for backward, counted exactly with
saved-tensor hooks, and that the "min" policy computes the same outputs, gradients and running statistics as the
default one (bitwise on the cpu backend in float32: its recomputed convolutions are deterministic) and as
torchvision in float64, on every backend and integration the default policy is tested with."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet

import fused_resnet
from benchmarks.measure import saved_for_backward_bytes
from conftest import (CPU_BACKENDS, TRITON_ON_CPU, assert_rel, every_unit_network, randomize_batchnorms, run_model,
                      to_layout)

POLICIES = ("default", "min")


def nbytes(*shape: int, dtype: torch.dtype = torch.float32) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    return saved_for_backward_bytes(module, lambda: module(x.requires_grad_()))


# (block, input shape, the activations each keeps besides its input x and its output; (N, C, H, W) each).
# Bottleneck(64, 16) with a projection at stride 2, 16x16 inputs: y1 and y2 16 channels, y3 and the projection's
# output 64; BasicBlock(16, 16): y1 and y2 16 channels. Per-channel vectors stay below VECTORS_BYTES.
N = 2
BLOCK_CASES = {
    "bottleneck-projection": (
        lambda: tv_resnet.Bottleneck(64, 16, 2, nn.Sequential(nn.Conv2d(64, 64, 1, 2, bias=False),
                                                              nn.BatchNorm2d(64))),
        (N, 64, 16, 16),
        {"torchvision": [(N, 16, 16, 16)] * 2 + [(N, 16, 8, 8)] * 2 + [(N, 64, 8, 8)] * 3,  # y1 a1 y2 a2 y3 y4 out
         "default": [(N, 16, 16, 16), (N, 16, 8, 8), (N, 64, 8, 8), (N, 64, 8, 8), (N, 64, 8, 8)],  # y1 y2 y3 y4 out
         "min": [(N, 16, 16, 16), (N, 16, 8, 8), (N, 64, 8, 8)]}),  # y1 y2 out
    "basic-identity": (
        lambda: tv_resnet.BasicBlock(16, 16), (N, 16, 16, 16),
        {"torchvision": [(N, 16, 16, 16)] * 4,  # y1 a1 y2 out
         "default": [(N, 16, 16, 16)] * 3,  # y1 y2 out
         "min": [(N, 16, 16, 16)] * 2}),  # y1 out
}
VECTORS_BYTES = 24 * 64 * 4  # at most 24 per-channel float32 vectors of the widest BatchNorm: a sixth of y2


@pytest.mark.parametrize("name", list(BLOCK_CASES))
def test_saved_bytes_of_each_policy(name):
    """Fails when a policy keeps an activation more: e.g. y3 again under "min", or the normalized activation
    between convolutions under the default."""
    build, shape, kept = BLOCK_CASES[name]
    original = randomize_batchnorms(build()).train()
    x = torch.randn(shape)
    measured = {"torchvision": saved_bytes(original, x)}
    for policy in POLICIES:
        block = fused_resnet.convert(copy.deepcopy(original), memory=policy)
        measured[policy] = saved_bytes(block, x)
    for who, activations in kept.items():
        exact = nbytes(*shape) + sum(nbytes(*s) for s in activations)
        assert exact <= measured[who] <= exact + VECTORS_BYTES, (who, measured[who], exact)


@pytest.mark.parametrize(("dtype", "channels_last"), [(torch.float32, True), (torch.bfloat16, False)])
def test_resnet50_min_policy_keeps_at_most_half_of_torchvision(dtype, channels_last):
    """The issue's target, at a small resolution (the ratio depends on the stem's share, about the same at 224:
    benchmarks/test_memory.py reports it there)."""
    torch.manual_seed(0)
    original = torchvision.models.resnet50(num_classes=10).train().to(dtype)
    x = to_layout(torch.randn(2, 3, 64, 64, dtype=dtype), channels_last)
    original = original.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torchvision_bytes = saved_bytes(original, x)
    ratios = {policy: saved_bytes(fused_resnet.convert(copy.deepcopy(original), memory=policy), x)
              / torchvision_bytes for policy in POLICIES}
    assert ratios["min"] <= 0.5, ratios
    assert ratios["default"] <= 0.88, ratios


def resnet_network() -> nn.Module:
    """A narrow torchvision ResNet-50 (every kind of Bottleneck, the stem and its max pool) on small images."""
    return randomize_batchnorms(tv_resnet.ResNet(tv_resnet.Bottleneck, [1, 2, 1, 1], num_classes=5,
                                                 width_per_group=16))


def policy_runs(original: nn.Module, x: torch.Tensor, backend: str, train: bool = True, **autocast):
    """run_model of a converted copy of `original` under each policy (on `backend`, optionally under autocast)."""
    runs = {}
    for policy in POLICIES:
        fused = fused_resnet.convert(copy.deepcopy(original), memory=policy)
        with fused_resnet.use_backend(backend), torch.autocast("cpu", enabled=bool(autocast), **autocast):
            runs[policy] = run_model(fused, x, train)
    return runs


def assert_runs_equal(runs, tol: float = 0.0) -> None:
    """Outputs, input gradients, every parameter gradient and every buffer (running statistics, batch counts) of
    the two policies: bitwise when tol is 0."""
    (out, gx, grads, buffers), (out_min, gx_min, grads_min, buffers_min) = runs["default"], runs["min"]
    pairs = [("output", out, out_min), ("grad x", gx, gx_min)]
    pairs += [(f"grad {n}", g, grads_min[n]) for n, g in grads.items()]
    pairs += [(n, b, buffers_min[n]) for n, b in buffers.items()]
    assert sorted(grads) == sorted(grads_min) and sorted(buffers) == sorted(buffers_min)
    for what, a, b in pairs:
        if tol == 0.0:
            assert torch.equal(a, b), what
        else:
            assert_rel(b, a, tol, what, floor=1e-3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("builder", [resnet_network, every_unit_network])
def test_min_policy_is_bitwise_the_default_on_cpu(backend, channels_last, builder):
    runs = policy_runs(builder(), to_layout(torch.randn(3, 3, 32, 32), channels_last), backend)
    assert_runs_equal(runs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_min_policy_cifar_resnet(backend, shortcut):
    """Option A's zero-padded identity and option B's projection, as the paper's CIFAR networks use them."""
    torch.manual_seed(0)
    model = randomize_batchnorms(fused_resnet.cifar_resnet(8, shortcut))
    x = torch.randn(4, 3, 16, 16)
    runs = {}
    for policy in POLICIES:
        with fused_resnet.use_backend(backend), fused_resnet.use_memory_policy(policy):
            runs[policy] = run_model(copy.deepcopy(model), x, True)
    assert_runs_equal(runs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_min_policy_under_autocast(backend):
    runs = policy_runs(resnet_network(), torch.randn(2, 3, 32, 32), backend, dtype=torch.bfloat16)
    assert runs["min"][0].dtype == torch.bfloat16
    assert_runs_equal(runs)


@pytest.mark.skipif(not TRITON_ON_CPU, reason="needs Triton's CPU interpreter")
def test_min_policy_on_interpreted_triton():
    """The Triton convolution recomputed without its statistics epilogue gives the same y as with it."""
    runs = policy_runs(every_unit_network(), torch.randn(2, 3, 8, 8), "triton")
    assert_runs_equal(runs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_min_policy_matches_torchvision_in_float64(backend):
    original = resnet_network().double()
    x = torch.randn(2, 3, 33, 27, dtype=torch.float64)
    expected = run_model(copy.deepcopy(original), x, True)
    with fused_resnet.use_backend(backend):
        got = run_model(fused_resnet.convert(copy.deepcopy(original), memory="min"), x, True)
    for what, a, b in [("output", got[0], expected[0]), ("grad x", got[1], expected[1])]:
        assert_rel(a, b, 1e-10, what)
    for n, g in expected[2].items():
        assert_rel(got[2][n], g, 1e-10, f"grad {n}", floor=1e-6)
    for n, b in expected[3].items():
        assert_rel(got[3][n], b, 1e-12, n, floor=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_min_policy_with_frozen_batchnorm(backend):
    """A detection backbone's FrozenBatchNorm2d: running statistics, no BN gradients, the convolutions' still."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    original = tv_resnet.ResNet(tv_resnet.Bottleneck, [1, 1, 1, 1], num_classes=5, width_per_group=16,
                                norm_layer=FrozenBatchNorm2d)
    with torch.no_grad():
        for m in original.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2), m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    assert_runs_equal(policy_runs(original, torch.randn(2, 3, 32, 32), backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_min_policy_timm_deep_stem_and_average_down(backend):
    """timm's resnet26d: a deep stem (a residual_block without a shortcut, whose last convolution is recomputed)
    and avg_down projections (the projection's input is the pooled x)."""
    timm = pytest.importorskip("timm")
    original = randomize_batchnorms(timm.create_model("resnet26d", num_classes=5, channels=(8, 16, 24, 32),
                                                      stem_width=8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fused_resnet.FusionWarning)
        runs = policy_runs(original, torch.randn(2, 3, 32, 32), backend)
    assert_runs_equal(runs)


def test_min_policy_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model = fused_resnet.convert(randomize_batchnorms(every_unit_network()), memory="min").train()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 16, 16)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_e, out_c = eager(xe), compiled(xc)
    out_e.square().sum().backward()
    out_c.square().sum().backward()
    assert_rel(out_c, out_e, 1e-6, "output")
    assert_rel(xc.grad, xe.grad, 1e-5, "grad x")
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert_rel(p.grad, q.grad, 1e-5, f"grad {name}", floor=1e-3)


def test_policy_choice_and_precedence(monkeypatch):
    block = fused_resnet.Bottleneck(16, 4)
    assert block.memory is None
    assert fused_resnet.Bottleneck(16, 4, memory="min").memory == "min"
    model = fused_resnet.resnet18(memory="min")
    assert {m.memory for m in model.modules() if hasattr(m, "memory")} == {"min"}
    fused_resnet.set_memory_policy(model, None)
    assert {m.memory for m in model.modules() if hasattr(m, "memory")} == {None}
    assert fused_resnet.cifar_resnet(8, memory="min").layer1[0].memory == "min"

    # The module's own policy, then the context's, then the environment's: counted in bytes kept.
    x = torch.randn(2, 16, 8, 8)
    default = saved_bytes(block, x)
    with fused_resnet.use_memory_policy("min"):
        low = saved_bytes(block, x)
        assert saved_bytes(fused_resnet.Bottleneck(16, 4, memory="default"), x) > low
    assert low < default
    monkeypatch.setenv("FUSED_RESNET_MEMORY", "min")
    assert saved_bytes(block, x) == low
    with fused_resnet.use_memory_policy("default"):
        assert saved_bytes(block, x) == default


def test_bad_policy_is_a_clear_error_that_changes_nothing(monkeypatch):
    with pytest.raises(ValueError, match=r"Bottleneck: memory: unknown memory policy 'low'; expected one of "
                                         r"default, min"):
        fused_resnet.Bottleneck(16, 4, memory="low")
    with pytest.raises(ValueError, match="convert: memory: unknown memory policy 'minimum'"):
        fused_resnet.convert(tv_resnet.BasicBlock(8, 8), memory="minimum")
    with pytest.raises(ValueError, match="use_memory_policy: unknown memory policy 'max'"):
        with fused_resnet.use_memory_policy("max"):
            pass
    block = fused_resnet.Bottleneck(16, 4)
    before = copy.deepcopy(block.state_dict())
    block.memory = "small"
    with pytest.raises(ValueError, match="residual_block: memory: unknown memory policy 'small'"):
        block(torch.randn(2, 16, 8, 8))
    block.memory = None
    monkeypatch.setenv("FUSED_RESNET_MEMORY", "tiny")
    with pytest.raises(ValueError, match="environment variable FUSED_RESNET_MEMORY: unknown memory policy 'tiny'"):
        block(torch.randn(2, 16, 8, 8))
    for name, tensor in block.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed"

