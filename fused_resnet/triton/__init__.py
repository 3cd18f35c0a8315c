"""The Triton backend: @triton.jit kernels and their launchers (statistics, BN-apply/residual/ReLU, convolution)."""

import importlib.metadata
import importlib.util
import os
import re

INTERPRET_ENV_VAR = "TRITON_INTERPRET"

# Triton decides when a kernel is defined (@triton.jit) whether it runs compiled, on CUDA tensors, or in its CPU
# interpreter, on CPU tensors, from TRITON_INTERPRET. This package's kernels are defined when fused_resnet is imported
# (fused_resnet.kernels builds every kernel set then), so the variable is read once, here, at that moment.
_INTERPRETED = os.environ.get(INTERPRET_ENV_VAR, "0") not in ("", "0")


def interpreted() -> bool:
    """Whether fused_resnet's Triton kernels run in Triton's CPU interpreter (on CPU tensors): TRITON_INTERPRET=1 was
    set before fused_resnet was imported."""
    return _INTERPRETED


# The oldest Triton the kernels are checked against (3.6: the GPU machine's, with torch 2.11; every shipped
# convolution configuration compiles for sm_90 with it, tests/test_triton_conv_sm90.py). pyproject.toml's `triton`
# extra declares the same minimum.
MIN_TRITON = (3, 6)


def _installed_version() -> str | None:
    for distribution in ("triton", "pytorch-triton"):  # PyTorch's nightly builds name it pytorch-triton
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def missing_reason() -> str | None:
    """Why this installation's Triton cannot run the triton backend (not installed, or older than MIN_TRITON), or
    None. Asks the package metadata, without importing triton."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    version = _installed_version()
    release = re.match(r"(\d+)\.(\d+)", version or "")
    if release is not None and tuple(map(int, release.groups())) < MIN_TRITON:
        return (f"triton {version} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest the triton backend is "
                "checked against")
    return None
