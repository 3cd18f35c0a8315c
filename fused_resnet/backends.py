"""Choosing the backend that runs a fused op.

Backends: ``torch`` (the pure-PyTorch reference composite), ``cpu`` (C++ kernels), ``cuda`` (CUDA kernels),
``triton`` (Triton kernels), and ``auto``, the fastest one available for the tensor's device.
The choice comes from, in order: the op's ``backend`` argument, the innermost :func:`use_backend` context,
the ``FUSED_RESNET_BACKEND`` environment variable, and ``auto``. Asking for a backend that cannot run is an
error that says why; there is no silent fallback. Where each backend runs, and why not elsewhere, is
fused_resnet.kernels.REGISTRY's to say.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch

from .kernels import REGISTRY

BACKENDS = ("auto", *REGISTRY)
ENV_VAR = "FUSED_RESNET_BACKEND"

# What `auto` runs on tensors of each device type when that backend can run (else `torch`): the compiled kernels.
# The triton backend runs only when asked for.
_AUTO = {"cpu": REGISTRY["cpu"], "cuda": REGISTRY["cuda"]}

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("fused_resnet_backend", default=None)


def _check_name(name: object, what: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{what}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name  # type: ignore[return-value]


def backend_status() -> dict[str, str]:
    """Each concrete backend and either "available" or the reason it is not."""
    return {name: backend.unavailable_reason() or "available" for name, backend in REGISTRY.items()}


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
        preferred = _AUTO.get(device.type)
        return preferred.name if preferred is not None and preferred.unavailable_reason() is None else "torch"
    chosen = REGISTRY[name]
    reason = chosen.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"fused_resnet backend {name!r} is not available: {reason}")
    if not chosen.runs_on(device.type):
        raise RuntimeError(f"fused_resnet backend {name!r} runs on {chosen.tensors}, but the input is on {device}")
    return name
