"""What the build put into the compiled extension: with CUDA, SASS for each listed architecture and PTX for the
newest, so that a card newer than any listed (sm_100, sm_120) JIT-compiles the kernels instead of failing with
"no kernel image"; and kernels that neither spill nor fall below the blocks per multiprocessor the CUDA code is
designed for. Read from the extension's fat binaries, with cuobjdump where one is found (the toolkit here has none;
Triton's CUDA backend ships one)."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from fused_resnet import _native

FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
PTX, SASS = 1, 2  # the kinds of a fat binary's entries


def fatbin_entries(library: Path) -> list[tuple[int, int]]:
    """(kind, sm architecture, e.g. 90) of every entry of every fat binary in `library`. A fat binary is a
    16-byte header (magic, version 1, header size 16, payload size) and entries, each a header (kind, header size,
    payload size; architecture at byte 28) and its payload."""
    data = library.read_bytes()
    found = []
    start = data.find(FATBIN_MAGIC)
    while start != -1:
        _, version, header_size, size = struct.unpack_from("<IHHQ", data, start)
        if version == 1 and header_size == 16:
            entry, end = start + header_size, start + header_size + size
            while entry < end:
                kind, _, entry_header_size, payload_size = struct.unpack_from("<HHIQ", data, entry)
                found.append((kind, struct.unpack_from("<I", data, entry + 28)[0]))
                entry += entry_header_size + payload_size
        start = data.find(FATBIN_MAGIC, start + 4)
    return found


@pytest.mark.skipif(not _native.built_with_cuda(), reason="the extension was built without CUDA")
@pytest.mark.skipif("+PTX" not in os.environ.get("TORCH_CUDA_ARCH_LIST", "+PTX"),
                    reason="TORCH_CUDA_ARCH_LIST, set here, asks for no PTX")
def test_cuda_build_embeds_ptx_for_its_newest_architecture():
    entries = fatbin_entries(Path(_native._C.__file__))
    sass = {arch for kind, arch in entries if kind == SASS}
    ptx = {arch for kind, arch in entries if kind == PTX}
    assert sass, "no SASS found: the fat-binary reader no longer matches the build"
    assert ptx == {max(sass)}, f"PTX for {sorted(ptx)}, SASS for {sorted(sass)}"


KERNELS_HEADER = Path(__file__).resolve().parent.parent / "csrc" / "cuda" / "bn_act_kernels.h"

# Per-multiprocessor limits of sm_80 and sm_90 (CUDA C++ Programming Guide, "Compute Capabilities"): 64K registers,
# given to a warp in units of 256; 64 warps; 32 blocks; shared memory for blocks, in bytes.
REGISTERS_PER_MULTIPROCESSOR, REGISTER_UNIT, WARPS_PER_MULTIPROCESSOR, BLOCKS_PER_MULTIPROCESSOR = 65536, 256, 64, 32
SHARED_MEMORY_PER_MULTIPROCESSOR = {80: 164 * 1024, 90: 228 * 1024}
RESERVED_SHARED_MEMORY_PER_BLOCK = 1024  # the runtime's, on sm_80 and later


@dataclass
class KernelResources:
    registers: int
    stack: int  # bytes of stack frame per thread: spilled registers and local arrays
    local: int
    shared: int  # bytes of static shared memory per block
    max_threads: int | None  # the block size of its __launch_bounds__; None without one


def cuobjdump() -> str | None:
    """The CUDA toolkit's cuobjdump (CUDA_HOME, then PATH), else the one of Triton's CUDA backend, else None."""
    candidates = [Path(os.environ["CUDA_HOME"], "bin", "cuobjdump")] if os.environ.get("CUDA_HOME") else []
    if shutil.which("cuobjdump"):
        candidates.append(Path(shutil.which("cuobjdump")))
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.origin:
        candidates.append(Path(triton.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    return next((str(c) for c in candidates if c.is_file()), None)


def per_architecture(listing: str) -> dict[int, str]:
    """cuobjdump's listing of each ELF ("Fatbin elf code:" ... "arch = sm_90" ...), by architecture, PTX left out."""
    sections: dict[int, str] = {}
    for part in re.split(r"^Fatbin ", listing, flags=re.M):
        arch = re.search(r"^arch = sm_(\d+)", part, re.M)
        if part.startswith("elf code") and arch:
            sections[int(arch.group(1))] = sections.get(int(arch.group(1)), "") + part
    return sections


def kernel_resources(tool: str, library: Path) -> dict[int, dict[str, KernelResources]]:
    """Every kernel's resources in `library`'s SASS, by architecture and mangled name: registers, stack, local and
    shared memory from cuobjdump --dump-resource-usage, the launch bounds' block size from the ELF's
    EIATTR_MAX_THREADS."""
    def run(option: str) -> dict[int, str]:
        return per_architecture(subprocess.run([tool, option, str(library)], capture_output=True, text=True,
                                               check=True, timeout=120).stdout)

    usage, elf = run("--dump-resource-usage"), run("--dump-elf")
    found: dict[int, dict[str, KernelResources]] = {}
    for arch, text in usage.items():
        max_threads = {name: int(value, 16) for name, value in re.findall(
            r"^\.nv\.info\.(\S+)\n(?:(?!\.).*\n)*?\s*Attribute:\s*EIATTR_MAX_THREADS\n.*\n\s*Value:\s*(0x[0-9a-f]+)",
            elf.get(arch, ""), re.M)}
        found[arch] = {
            name: KernelResources(int(reg), int(stack), int(local), int(shared), max_threads.get(name))
            for name, reg, stack, shared, local in re.findall(
                r"^\s*Function (\S+):\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text, re.M)}
    return found


def blocks_per_multiprocessor(kernel: KernelResources, arch: int) -> int:
    """Blocks of kernel.max_threads threads that one multiprocessor holds at once, as the CUDA occupancy calculator
    counts them (shared memory with the runtime's reserve, which cuobjdump may already count: a lower bound)."""
    warps = math.ceil(kernel.max_threads / 32)
    registers_per_warp = math.ceil(kernel.registers * 32 / REGISTER_UNIT) * REGISTER_UNIT
    return min(REGISTERS_PER_MULTIPROCESSOR // registers_per_warp // warps, WARPS_PER_MULTIPROCESSOR // warps,
               SHARED_MEMORY_PER_MULTIPROCESSOR[arch] // (kernel.shared + RESERVED_SHARED_MEMORY_PER_BLOCK),
               BLOCKS_PER_MULTIPROCESSOR)


def header_constant(name: str) -> int:
    match = re.search(rf"constexpr int {name} = (\d+);", KERNELS_HEADER.read_text())
    assert match, f"{KERNELS_HEADER} no longer declares {name}"
    return int(match.group(1))


@pytest.mark.skipif(not _native.built_with_cuda(), reason="the extension was built without CUDA")
def test_every_cuda_kernel_fits_the_blocks_per_multiprocessor_it_is_designed_for_without_spilling():
    """Guards the CUDA kernels' occupancy (issue 14): each kernel of the build, on each of sm_80 and sm_90 that it
    has SASS for, declares its block size (__launch_bounds__), uses no local memory (no spilled registers, no
    stack arrays), and its registers x block size and shared memory let a multiprocessor hold at least
    kMinBlocksPerMultiprocessor (bn_act_kernels.h) blocks. The old build failed it: backward_reduce_finalize_kernel
    kept its three output pointers in a 24-byte stack array; and against the 8 blocks per multiprocessor its
    elementwise grids then assumed, 52 of the 100 sm_90 elementwise kernels fell short (down to 2 blocks: the
    second-BN backward on 16-bit rows, 95 registers), which its grids now take from the runtime's occupancy."""
    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump: neither in the CUDA toolkit nor in Triton's CUDA backend")
    floor = header_constant("kMinBlocksPerMultiprocessor")
    library = Path(_native._C.__file__)
    sass = {arch for kind, arch in fatbin_entries(library) if kind == SASS} & set(SHARED_MEMORY_PER_MULTIPROCESSOR)
    if not sass:
        pytest.skip("the build has SASS for neither sm_80 nor sm_90 (TORCH_CUDA_ARCH_LIST)")
    resources = kernel_resources(tool, library)
    problems = []
    for arch in sorted(sass):
        kernels = resources.get(arch, {})
        assert kernels, f"no kernels read for sm_{arch}: the cuobjdump reader no longer matches the build"
        for name, kernel in sorted(kernels.items()):
            if kernel.max_threads is None:
                problems.append(f"sm_{arch} {name}: no __launch_bounds__ (block size)")
                continue
            if kernel.stack or kernel.local:
                problems.append(f"sm_{arch} {name}: {kernel.stack} bytes of stack, {kernel.local} of local memory")
            blocks = blocks_per_multiprocessor(kernel, arch)
            if blocks < floor:
                problems.append(f"sm_{arch} {name}: {kernel.registers} registers x {kernel.max_threads} threads, "
                                f"{kernel.shared} bytes of shared memory: {blocks} blocks per multiprocessor < {floor}")
    assert not problems, "\n".join(problems)
