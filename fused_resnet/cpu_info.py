"""What this CPU is, for reports: its instruction sets as ATen and oneDNN use them, and whether PyTorch's bundled
oneDNN crashes on it in a convolution's weight gradient (README, "Known issues")."""

from __future__ import annotations

import functools
import subprocess
import sys

import torch

# PyTorch 2.14's oneDNN segfaults (or aborts) in the AVX-512 weight gradient of a 1x1 stride-2 convolution with
# fewer than 16 input channels at some batch sizes and image sizes; plain PyTorch, no fused_resnet involved. Two
# shapes that crashed on every try on an AVX-512 machine: the first sighting and a batch of one.
ONEDNN_CRASH_REPRODUCER = """
import torch
for batch, channels, size in ((3, 8, 16), (1, 8, 56)):
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.nn.Conv2d(channels, 16, 1, 2, bias=False)(x).sum().backward()
"""


def cpu_isa() -> str:
    """The instruction sets that decide this CPU's speed here: "AVX2", "AVX-512", with "+ AVX512-BF16" and "+ AMX"
    where present, or "no AVX2"; with ATen's own choice where an environment variable lowered it (e.g.
    ATEN_CPU_CAPABILITY=avx2 on an AVX-512 machine)."""
    features = [("AVX-512", "_is_avx512_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"),
                ("AMX", "_is_amx_tile_supported")]
    present = [name for name, query in features if getattr(torch.cpu, query, lambda: False)()]
    if not present or present[0] != "AVX-512":
        present = ["AVX2"] if getattr(torch.cpu, "_is_avx2_supported", lambda: False)() else ["no AVX2"]
    isa = " + ".join(present)
    aten = torch.backends.cpu.get_cpu_capability()
    expected = {"AVX-512": "AVX512", "AVX2": "AVX2"}.get(present[0], "DEFAULT")
    return isa if aten == expected else f"{isa} (ATen runs {aten})"


@functools.cache
def onednn_weight_grad_crashes() -> bool | None:
    """Whether ONEDNN_CRASH_REPRODUCER kills a fresh Python process on this CPU: True if it died of a signal, False
    if it finished, None if it failed otherwise or took over two minutes (then the stderr is not this bug's). Runs
    once per process, in a subprocess (~3 s: importing torch)."""
    try:
        result = subprocess.run([sys.executable, "-c", ONEDNN_CRASH_REPRODUCER], capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None
    if result.returncode < 0:
        return True
    return False if result.returncode == 0 else None


def onednn_crash_report() -> str:
    """One line for a test or benchmark header: whether this CPU has the upstream crash, and what it affects."""
    crashes = onednn_weight_grad_crashes()
    if crashes is None:
        return "oneDNN weight-gradient crash probe: inconclusive (the reproducer failed without a signal)"
    if not crashes:
        return "oneDNN weight-gradient crash probe: absent on this CPU"
    return ("oneDNN weight-gradient crash probe: PRESENT on this CPU (PyTorch's bundled oneDNN, AVX-512: 1x1 stride-2 "
            "convolutions with < 16 input channels crash in backward; the cpu backend avoids it, plain PyTorch does "
            "not: README, Known issues)")
