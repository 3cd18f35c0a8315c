"""Backend selection: argument > use_backend > FUSED_RESNET_BACKEND > auto; clear errors; no extension."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import fused_resnet
from fused_resnet import backends
from fused_resnet.kernels import REGISTRY, KernelSet, kernels_for
from fused_resnet.triton import INTERPRET_ENV_VAR, interpreted


def test_status_names_every_backend_and_says_why_one_is_missing():
    status = fused_resnet.backend_status()
    assert set(status) == {"torch", "cpu", "cuda", "triton"}
    assert status["torch"] == "available"
    for name, reason in status.items():
        assert reason == "available" or len(reason) > 20, (name, reason)
    assert fused_resnet.available_backends() == [n for n, s in status.items() if s == "available"]


@pytest.mark.parametrize("device", ["cpu", "cuda", "meta"])
def test_a_backend_runs_exactly_where_the_registry_says(device):
    """select_backend takes a backend where the registry says it runs, and otherwise raises with the registry's
    reason; every backend but torch that can run has its kernel set."""
    for name, backend in REGISTRY.items():
        why = backend.why_not(device)
        if why is None:
            assert backends.select_backend(torch.device(device), name) == name
        else:
            with pytest.raises(RuntimeError, match=rf"fused_resnet backend '{name}' .*{re.escape(why)}"):
                backends.select_backend(torch.device(device), name)
        if name != "torch" and backend.unavailable_reason() is None:
            assert isinstance(kernels_for(name), KernelSet)


def test_precedence_argument_context_environment(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    expected_auto = "cpu" if "cpu" in fused_resnet.available_backends() else "torch"
    assert backends.select_backend(cpu) == expected_auto
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.select_backend(cpu) == "torch"
    with fused_resnet.use_backend("auto"):
        assert backends.select_backend(cpu) == expected_auto
        with fused_resnet.use_backend("torch"):
            assert backends.select_backend(cpu) == "torch"
            assert backends.select_backend(cpu, "auto") == expected_auto
        assert backends.select_backend(cpu) == expected_auto
    assert backends.select_backend(cpu) == "torch"


def test_unknown_names_are_rejected_wherever_they_come_from(monkeypatch):
    with pytest.raises(ValueError, match=r"use_backend: unknown backend 'cudnn'; expected one of auto, torch"):
        with fused_resnet.use_backend("cudnn"):
            pass
    with pytest.raises(ValueError, match="backend argument: unknown backend 'gpu'"):
        backends.select_backend(torch.device("cpu"), "gpu")
    monkeypatch.setenv(backends.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="environment variable FUSED_RESNET_BACKEND: unknown backend 'fast'"):
        backends.select_backend(torch.device("cpu"))


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_an_unavailable_backend_is_an_error_with_its_reason(name):
    reason = fused_resnet.backend_status()[name]
    if reason == "available":
        pytest.skip(f"{name} is available here")
    block = fused_resnet.BasicBlock(4, 4)
    with pytest.raises(RuntimeError, match=rf"fused_resnet backend '{name}' is not available: .+"), \
            fused_resnet.use_backend(name):
        block(torch.randn(2, 4, 5, 5))


def test_a_backend_for_another_device_is_an_error():
    if "cpu" not in fused_resnet.available_backends():
        pytest.skip("the cpu backend is not built")
    with pytest.raises(RuntimeError, match="backend 'cpu' runs on cpu tensors, but the input is on meta"):
        backends.select_backend(torch.device("meta"), "cpu")


def test_the_package_works_without_the_extension():
    """A missing or broken fused_resnet._C leaves the torch backend, says why, and keeps the modules working."""
    script = """
import sys
sys.modules["fused_resnet._C"] = None  # makes `from . import _C` raise ImportError
import torch, fused_resnet
status = fused_resnet.backend_status()
assert fused_resnet.available_backends() == ["torch"], status
assert "did not load" in status["cpu"], status
block = fused_resnet.resnet18(num_classes=3)
out = block(torch.randn(2, 3, 32, 32))
out.sum().backward()
try:
    with fused_resnet.use_backend("cpu"):
        block(torch.randn(2, 3, 32, 32))
except RuntimeError as error:
    assert "backend 'cpu' is not available" in str(error), error
else:
    raise AssertionError("the cpu backend ran without its extension")
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop(INTERPRET_ENV_VAR, None)  # the Triton backend would run here on the CPU too
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the Triton backend runs compiled, on CUDA")
def test_triton_on_the_cpu_needs_the_interpreter():
    """Without TRITON_INTERPRET=1 and without a GPU, the triton backend says what it lacks; with it, it runs on
    CPU tensors; on other devices it is an error either way."""
    script = """
import torch, fused_resnet
from fused_resnet import backends
reason = fused_resnet.backend_status()["triton"]
assert "TRITON_INTERPRET=1" in reason and "no CUDA GPU" in reason, reason
try:
    with fused_resnet.use_backend("triton"):
        fused_resnet.BasicBlock(4, 4)(torch.randn(2, 4, 5, 5))
except RuntimeError as error:
    assert "backend 'triton' is not available" in str(error), error
else:
    raise AssertionError("the triton backend ran on the CPU without its interpreter")
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop(INTERPRET_ENV_VAR, None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    if interpreted() and fused_resnet.backend_status()["triton"] == "available":
        assert backends.select_backend(torch.device("cpu"), "triton") == "triton"
        with pytest.raises(RuntimeError, match="backend 'triton' runs on cuda tensors .* but the input is on meta"):
            backends.select_backend(torch.device("meta"), "triton")
