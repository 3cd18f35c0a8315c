"""The Triton backend: @triton.jit kernels and their launchers (statistics, BN-apply/residual/ReLU, convolution)."""

import os

INTERPRET_ENV_VAR = "TRITON_INTERPRET"

# Triton decides when a kernel is defined (@triton.jit) whether it runs compiled, on CUDA tensors, or in its CPU
# interpreter, on CPU tensors, from TRITON_INTERPRET. This package's kernels are defined when fused_resnet is imported
# (fused_resnet.kernels builds every kernel set then), so the variable is read once, here, at that moment.
_INTERPRETED = os.environ.get(INTERPRET_ENV_VAR, "0") not in ("", "0")


def interpreted() -> bool:
    """Whether fused_resnet's Triton kernels run in Triton's CPU interpreter (on CPU tensors): TRITON_INTERPRET=1 was
    set before fused_resnet was imported."""
    return _INTERPRETED
