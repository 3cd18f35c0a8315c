"""What the build put into the compiled extension: with CUDA, SASS for each listed architecture and PTX for the
newest, so that a card newer than any listed (sm_100, sm_120) JIT-compiles the kernels instead of failing with
"no kernel image". Read from the extension's fat binaries (the toolkit here has no cuobjdump)."""

from __future__ import annotations

import os
import struct
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
