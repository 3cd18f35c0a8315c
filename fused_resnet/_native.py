"""Loads the compiled extension (fused_resnet._C) and the CPU kernels that suit this machine.

The package works without the extension (the pure-PyTorch `torch` backend); `load_error` then says why it is
missing, and the `cpu`/`cuda` backends report it.
"""

from __future__ import annotations

import torch

try:
    from . import _C
except ImportError as error:  # not built, or built against another torch
    _C = None
    load_error: str | None = f"the compiled extension fused_resnet._C did not load ({error}); build it with `pip install --no-build-isolation -e .`"
else:
    load_error = None

# The CPU kernels are compiled twice: a default build and an AVX2+FMA+F16C build in its own module. Use the AVX2 one
# where the CPU executes its instructions and ATen itself runs AVX2 or AVX-512 kernels (ATEN_CPU_CAPABILITY=default
# turns both off).
cpu_kernel_capability = "none"
if _C is not None:
    cpu_kernel_capability = "default"
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and _C.cpu_runs_avx2_kernels():
        try:
            from . import _C_avx2
        except ImportError:
            pass
        else:
            _C.use_cpu_kernels(_C_avx2.kernels)
            cpu_kernel_capability = "avx2"


def has_extension() -> bool:
    return _C is not None


def built_with_cuda() -> bool:
    return _C is not None and bool(_C.built_with_cuda)
