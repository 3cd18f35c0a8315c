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
import torch

from .kernels import REGISTRY
from .settings import Setting

BACKENDS = ("auto", *REGISTRY)
ENV_VAR = "FUSED_RESNET_BACKEND"
_BACKEND = Setting("backend", BACKENDS, ENV_VAR, "auto")

# What `auto` runs on tensors of each device type when that backend can run (else `torch`): the compiled kernels.
# The triton backend runs only when asked for.
_AUTO = {"cpu": REGISTRY["cpu"], "cuda": REGISTRY["cuda"]}


def backend_status() -> dict[str, str]:
    """Each concrete backend and either "available" or the reason it is not."""
    return {name: backend.unavailable_reason() or "available" for name, backend in REGISTRY.items()}


def available_backends() -> list[str]:
    """The concrete backends that can run here (``torch`` always can)."""
    return [name for name, status in backend_status().items() if status == "available"]


def use_backend(name: str) -> contextlib.AbstractContextManager[None]:
    """Runs the fused ops inside the ``with`` block on backend `name` (unless an op is given one explicitly)."""
    return _BACKEND.use(name, "use_backend")


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for by argument, context or environment (possibly ``auto``)."""
    return _BACKEND.requested(backend)


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
