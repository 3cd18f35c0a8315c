"""Every backend in one table: on which devices' tensors it runs, why it cannot run where it cannot, and its kernels.

The backend choice (fused_resnet.backends), backend_status(), the benchmarks' providers and the tests' backend lists
all read this table. What an installation lacks (the extension not loaded or built without CUDA, triton not
installed) is found once, at import; whether torch sees a GPU is asked when a backend is chosen (see
:meth:`Backend.unavailable_reason`).

Every kernel set is made here, at import: one made on first use would be made inside torch.compile's trace of the
first call, and break the graph. Making them registers ops and nothing else (the Triton set's kernels, compiled or
interpreted, are defined by then: see fused_resnet.triton.interpreted); the oneDNN set asks which dtypes this CPU
takes on its first eager inference call instead.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import _native
from .. import triton as triton_backend
from .base import KernelSet
from .native import CudnnKernels, OneDnnKernels
from .triton import TritonKernels


@dataclasses.dataclass(frozen=True, slots=True)
class Backend:
    """One concrete backend."""

    name: str
    device_types: tuple[str, ...] | None  # the device types of the tensors it runs on; None: any
    tensors: str  # the same, as an error message says it: "cpu tensors"
    kernels: KernelSet | None  # None for `torch` (the reference composite) and where `missing` says why
    missing: str | None = None  # why this installation cannot run it (not installed, not built), or None
    no_gpu: str | None = None  # why it cannot run while torch sees no CUDA GPU; None when it needs none
    interpreted: bool = False  # its kernels run in an interpreter: right results, too slow for anything but tests

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run at all here, or None if it can run (on tensors of `device_types`).

        Whether torch sees a GPU is asked here, on each choice as before, rather than once at import: importing
        fused_resnet stays free of CUDA queries (torch.cuda.is_available() initializes the CUDA driver unless
        PYTORCH_NVML_BASED_CUDA_CHECK=1, and a process forked after that cannot use CUDA)."""
        if self.missing is not None:
            return self.missing
        if self.no_gpu is not None and not torch.cuda.is_available():
            return self.no_gpu
        return None

    def runs_on(self, device_type: str) -> bool:
        """Whether its kernels take tensors of `device_type` (when it can run at all)."""
        return self.device_types is None or device_type in self.device_types

    def why_not(self, device_type: str) -> str | None:
        """Why it cannot run on tensors of `device_type` here, or None if it can."""
        reason = self.unavailable_reason()
        if reason is None and not self.runs_on(device_type):
            reason = f"runs on {self.tensors}"
        return reason


def _registry() -> dict[str, Backend]:
    cuda_missing = _native.load_error or (
        None if _native.built_with_cuda() else "fused_resnet._C was built without its CUDA kernels (no CUDA toolkit "
                                               "at build time, or FUSED_RESNET_BUILD_CUDA=0)")
    triton_missing = triton_backend.missing_reason()
    triton_kernels = None
    if triton_missing is None:
        try:
            triton_kernels = TritonKernels()
        except Exception as error:  # a Triton without an API the kernels use: that backend fails, not the import
            triton_missing = f"the triton backend did not load with this triton: {error!r}"
    interpreted = triton_backend.interpreted()
    interpret = f"{triton_backend.INTERPRET_ENV_VAR}=1"
    backends = [
        Backend("torch", None, "tensors of any device", None),
        Backend("cpu", ("cpu",), "cpu tensors", None if _native.load_error else OneDnnKernels(), _native.load_error),
        Backend("cuda", ("cuda",), "cuda tensors", None if cuda_missing else CudnnKernels(), cuda_missing,
                no_gpu="no CUDA GPU is visible to torch"),
        # Triton's interpreter runs the kernels on CPU tensors: the tests' way of running them without a GPU.
        Backend("triton", ("cuda", "cpu") if interpreted else ("cuda",),
                f"cuda tensors (and on cpu tensors when {interpret})", triton_kernels,
                triton_missing,
                no_gpu=None if interpreted else f"no CUDA GPU is visible to torch, and {interpret} (Triton's CPU "
                                                "interpreter) is not set",
                interpreted=interpreted),
    ]
    return {backend.name: backend for backend in backends}


REGISTRY: dict[str, Backend] = _registry()

# kernels_for runs on every op call: a plain lookup, as the table never changes.
_KERNELS = {name: backend.kernels for name, backend in REGISTRY.items() if backend.kernels is not None}


def kernels_for(backend: str) -> KernelSet:
    """The kernel set of a concrete backend other than `torch` (which runs the reference composite)."""
    kernels = _KERNELS.get(backend)
    if kernels is None:
        raise RuntimeError(f"fused_resnet backend {backend!r} has no kernels here")
    return kernels
