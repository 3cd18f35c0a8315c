"""Compiling Triton kernels for an H100 (sm_90) without a GPU, and reading what ptxas reports of each.

The interpreter accepts programs the compiler rejects, and cannot tell a kernel that spills registers or asks for
more shared memory than the card has from one that does not; Triton's own ptxas can, with no GPU present. Compiling
needs a process where TRITON_INTERPRET is off before any kernel is defined, which a test session under the
interpreter is not: `run_compiler_script` starts one, in which the script imports this module and calls
`compile_for_sm90` with the arguments a real launch would pass (tensors may be meta tensors: only their dtype and
data pointer matter). Triton's launcher binds those arguments to the kernel's specializations (an integer equal to
1 becomes a constant, one divisible by 16 or a 16-byte aligned pointer is marked so), and so does this module, with
Triton's own binder: the compiled kernel is the one a launch with those values would get.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import triton

SM90 = ("cuda", 90, 32)
# Shared memory one block may use (the opt-in maximum): H100 228 KB per SM less 1 KB the driver reserves per block;
# A100 164 KB less 1 KB (CUDA C Programming Guide, "Features and Technical Specifications").
SHARED_MEMORY_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}

_PROPERTIES = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


class PtxasReport(NamedTuple):
    """What one compiled kernel costs a thread and a block: ptxas' register and spill counts (bytes per thread)
    and the shared memory Triton asks for at launch (bytes per block)."""

    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared_memory: int

    def __str__(self):
        return (f"{self.registers} registers, {self.spill_stores} B spill stores, {self.spill_loads} B spill loads, "
                f"{self.stack_frame} B stack, {self.shared_memory} B shared memory")


def ptxas_path() -> Path | None:
    """The ptxas Triton compiles with (TRITON_PTXAS_PATH, else the one its CUDA backend ships), None if absent."""
    path = Path(os.environ.get("TRITON_PTXAS_PATH")
                or Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")
    return path if path.exists() else None


def run_compiler_script(script: str, cache_dir: Path, timeout: float, argv: tuple[str, ...] = ()
                        ) -> subprocess.CompletedProcess:
    """Runs `script` (`argv` its sys.argv[1:]) in a fresh Python with the Triton compiler on (TRITON_INTERPRET=0),
    the repository and tests/ importable, and an empty Triton cache in `cache_dir` (ptxas only reports on what it
    actually compiles)."""
    tests = Path(__file__).resolve().parent
    path = [str(tests.parent), str(tests), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(cache_dir),
               PYTHONPATH=os.pathsep.join(filter(None, path)))
    return subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


def specialization(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """(options, signature, constexprs, attrs) of `kernel` launched with `args` and `kwargs` (constexprs and
    num_warps/num_stages), as Triton's launcher derives them for sm_90."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget(*SM90))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialized, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialized, options)
    return options.__dict__, signature, constexprs, attrs


def compile_for_sm90(kernel, args: tuple, kwargs: dict) -> PtxasReport:
    """Compiles `kernel` for sm_90 as a launch with `args` and `kwargs` would, and returns ptxas' report of it.
    Must run where the compiler is on (see `run_compiler_script`) and the Triton cache does not hold the kernel."""
    options, signature, constexprs, attrs = specialization(kernel, args, kwargs)
    return compile_signature_for_sm90(kernel, signature, constexprs, attrs, options)


def compile_signature_for_sm90(kernel, signature: dict, constexprs: dict, attrs: dict | None = None,
                               options: dict | None = None) -> PtxasReport:
    """Compiles `kernel` for sm_90 with an explicit Triton signature (argument name -> type such as "*fp32", "i32"
    or "constexpr"), constexpr values, specialization attributes and compile options (num_warps...), and returns
    ptxas' report of it. For kernels compiled over the variants a launcher can pick rather than at given launches;
    the same conditions as :func:`compile_for_sm90`."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(kernel, signature, constexprs) if attrs is None else ASTSource(kernel, signature, constexprs,
                                                                                      attrs)
    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(source, target=GPUTarget(*SM90), options=options or {})
    text = log.getvalue()
    properties, registers = _PROPERTIES.search(text), _REGISTERS.search(text)
    if properties is None or registers is None:
        raise RuntimeError(f"no ptxas report for {kernel.__name__} (a cached kernel is not recompiled): {text!r}")
    stack, stores, loads = (int(v) for v in properties.groups())
    return PtxasReport(int(registers.group(1)), stores, loads, stack, compiled.metadata.shared)
