"""Choosing the backend that runs a fused op.

Backends: ``torch`` (the pure-PyTorch reference composite), ``cpu`` (C++ kernels), ``cuda`` (CUDA kernels),
``triton`` (Triton kernels), and ``auto``, the fastest one available for the tensor's device.
The choice comes from, in order: the op's ``backend`` argument, the innermost :func:`use_backend` context,
the ``FUSED_RESNET_BACKEND`` environment variable, and ``auto``. Asking for a backend that cannot run is an
error that says why; there is no silent fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Iterator

import torch

from . import _native

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")
ENV_VAR = "FUSED_RESNET_BACKEND"
INTERPRET_ENV_VAR = "TRITON_INTERPRET"

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("fused_resnet_backend", default=None)


def _check_name(name: object, what: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{what}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name  # type: ignore[return-value]


def _unavailable_reason(name: str) -> str | None:
    """Why `name` cannot run at all on this installation, or None if it can run somewhere."""
    if name in ("auto", "torch"):
        return None
    if name == "cpu":
        return _native.load_error
    if name == "cuda":
        if _native.load_error:
            return _native.load_error
        if not _native.built_with_cuda():
            return "fused_resnet._C was built without its CUDA kernels (no CUDA toolkit at build time, or FUSED_RESNET_BUILD_CUDA=0)"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible to torch"
        return None
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not torch.cuda.is_available() and not triton_interpreted():
        return (f"no CUDA GPU is visible to torch, and {INTERPRET_ENV_VAR}=1 (Triton's CPU interpreter) is not set")
    return None


def triton_interpreted() -> bool:
    """Whether the Triton kernels run in Triton's CPU interpreter, on CPU tensors: TRITON_INTERPRET=1, set before
    fused_resnet.triton is first imported (Triton decides when a kernel is defined)."""
    return os.environ.get(INTERPRET_ENV_VAR, "0") not in ("", "0")


def backend_status() -> dict[str, str]:
    """Each concrete backend and either "available" or the reason it is not."""
    return {name: _unavailable_reason(name) or "available" for name in BACKENDS if name != "auto"}


def available_backends() -> list[str]:
    """The concrete backends that can run here (``torch`` always can)."""
    return [name for name, status in backend_status().items() if status == "available"]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Runs the fused ops inside the ``with`` block on backend `name` (unless an op is given one explicitly)."""
    token = _current.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _current.reset(token)


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for by argument, context or environment (possibly ``auto``)."""
    if backend is not None:
        return _check_name(backend, "backend argument")
    if _current.get() is not None:
        return _current.get()  # type: ignore[return-value]
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env, f"environment variable {ENV_VAR}")
    return "auto"


def select_backend(device: torch.device, backend: str | None = None) -> str:
    """The concrete backend that runs an op on tensors of `device`; raises if the requested one cannot."""
    name = requested_backend(backend)
    if name == "auto":
        if device.type == "cpu" and _native.has_extension():
            return "cpu"
        if device.type == "cuda" and _unavailable_reason("cuda") is None:
            return "cuda"
        return "torch"
    reason = _unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"fused_resnet backend {name!r} is not available: {reason}")
    if name in ("cpu", "cuda") and device.type != name:
        raise RuntimeError(f"fused_resnet backend {name!r} runs on {name} tensors, but the input is on {device}")
    if name == "triton" and not (device.type == "cuda" or (device.type == "cpu" and triton_interpreted())):
        raise RuntimeError(
            f"fused_resnet backend 'triton' runs on cuda tensors (and on cpu tensors when {INTERPRET_ENV_VAR}=1), "
            f"but the input is on {device}")
    return name
