"""The kernel sets the fused autograd functions run on, one per backend that has kernels of its own, and the table
of every backend (:data:`REGISTRY`): where it runs, why it cannot where it cannot, and its kernel set.

    base.py      KernelSet, the interface every set implements (and what they share)
    native.py    the compiled extension's sets: NativeKernels, OneDnnKernels (cpu), CudnnKernels (cuda)
    triton.py    TritonKernels (triton)
    registry.py  Backend, REGISTRY, kernels_for
"""

from .base import BackwardCoefs, KernelSet
from .native import CudnnKernels, NativeKernels, OneDnnKernels
from .registry import REGISTRY, Backend, kernels_for
from .triton import TritonKernels

__all__ = ["REGISTRY", "Backend", "BackwardCoefs", "CudnnKernels", "KernelSet", "NativeKernels", "OneDnnKernels",
           "TritonKernels", "kernels_for"]
