"""Shared helpers: error metrics, random data, the backends under test."""

from __future__ import annotations

import copy
import os
import random
import zlib

import pytest
import torch
from torch import nn

# Without a GPU the Triton backend runs in Triton's CPU interpreter, which must be on before any Triton kernel is
# defined, so before fused_resnet.triton is imported (by any test module). With a GPU it runs compiled, on CUDA.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fused_resnet  # noqa: E402
from fused_resnet import _native, cpu_info  # noqa: E402
from fused_resnet.kernels import REGISTRY  # noqa: E402

# The compiled fused backends that run on CPU tensors here (``torch`` is the reference composite itself), which the
# full module/model matrices run on. The interpreted Triton backend is some thousand times slower and has no
# float64: tests/test_triton_*.py cover it on small shapes.
CPU_BACKENDS = [name for name, backend in REGISTRY.items()
                if name != "torch" and not backend.interpreted and backend.why_not("cpu") is None]
ALL_BACKENDS = ["torch", *CPU_BACKENDS]
TRITON_ON_CPU = REGISTRY["triton"].why_not("cpu") is None
# Every backend that runs on CPU tensors here, the interpreted Triton one included (for tests sized for it). On a
# GPU machine `cuda` and `triton` are available too, but for CUDA tensors: tests/test_gpu_backends.py covers them.
CPU_TENSOR_BACKENDS = [*ALL_BACKENDS, *(["triton"] if TRITON_ON_CPU else [])]


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """||actual - expected|| / max(||expected||, floor), in float64. `floor` is the scale below which a
    difference counts as absolute: a gradient that is zero in exact arithmetic comes out as rounding noise."""
    a, e = actual.detach().double(), expected.detach().double()
    denom = max(e.norm().item(), floor)
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "", floor: float = 0.0) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected, floor)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def randomize_batchnorms(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Non-trivial affine parameters and running statistics in every BatchNorm, so that tests see them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.2)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.2)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
    return model


def every_unit_network() -> nn.Module:
    """A small torchvision network with every kind of fused unit: a conv-BN-ReLU stem, an identity BasicBlock,
    Bottlenecks with a projection and with an identity, and a classifier; BatchNorms randomized."""
    from torchvision.models import resnet as tv_resnet
    from torchvision.ops.misc import Conv2dNormActivation

    model = nn.Sequential(
        Conv2dNormActivation(3, 8, stride=2),
        tv_resnet.BasicBlock(8, 8),
        tv_resnet.Bottleneck(8, 4, 2, nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))),
        tv_resnet.Bottleneck(16, 4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )
    return randomize_batchnorms(model)


def fused_copy(module: nn.Module) -> nn.Module:
    """A converted deep copy of a torchvision module (same parameters and buffers, fused modules)."""
    return fused_resnet.convert(copy.deepcopy(module))


def to_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def run_model(model: nn.Module, x: torch.Tensor, train: bool, seed: int = 0):
    """One forward and backward (against a gradient drawn from `seed`) in train or eval mode: the output, the input
    gradient, every parameter gradient and a copy of every buffer, by name. The output gradient is drawn in float32
    whatever the model's dtype, so that a float32 and a float64 model get the same one."""
    model.train(train)
    model.zero_grad()
    xi = x.clone().requires_grad_()
    out = model(xi)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype))
    grads = {n: p.grad for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return out, xi.grad, grads, buffers


def grads_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in module.named_parameters() if p.grad is not None}


# Fresh data every run, reproducible on demand: FUSED_RESNET_TEST_SEED=<the seed in the header> pytest ...
SESSION_SEED = int(os.environ.get("FUSED_RESNET_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return [f"fused_resnet test seed: {SESSION_SEED} (set FUSED_RESNET_TEST_SEED to reproduce)",
            f"fused_resnet backends: {fused_resnet.backend_status()}",
            f"CPU: {cpu_info.cpu_isa()}, fused_resnet's CPU kernel table: {_native.cpu_kernel_capability}",
            cpu_info.onednn_crash_report()]


@pytest.fixture
def winograd_measured_faster(monkeypatch):
    """The cpu backend's inference finds Winograd the faster wherever it measures (every choice made afresh inside
    the test and forgotten after it), so that tests of the Winograd path do not depend on this CPU's timings."""
    from fused_resnet.kernels.native import CONVOLUTION_CHOICES

    CONVOLUTION_CHOICES.clear()
    monkeypatch.setattr(CONVOLUTION_CHOICES, "measure",
                        lambda candidates: {name: 0.0 if name == "winograd" else 1.0 for name in candidates})
    yield
    CONVOLUTION_CHOICES.clear()


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))
