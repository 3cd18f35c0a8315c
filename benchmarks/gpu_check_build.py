"""The GPU check's build: fused_resnet._C (CPU and CUDA kernels) and fused_resnet._C_avx2 built in place at the same
time, each by a `setup.py build_ext` of its own with ninja on every core, then the checkout made importable.

    python -m benchmarks.gpu_check_build              # build, as the GPU check's build step does
    python -m benchmarks.gpu_check_build --rehearsal  # run setup.py for each extension without building

Why two processes: setuptools builds a package's extensions one after the other, and torch's ninja build of each
writes build.ninja into one shared build_temp, so they cannot share a process or a folder. Built one after the other
the AVX2 module (one 40 s object on this project's 2-core machine) waits for the whole _C; side by side the build
takes as long as the slower of the two. Both use every core: their compiles overlap only while the single AVX2
object compiles.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# setup.py builds the AVX2 module on x86-64 only.
X86 = platform.machine().lower() in ("x86_64", "amd64")
EXTENSIONS = ("fused_resnet._C", "fused_resnet._C_avx2") if X86 else ("fused_resnet._C",)
# Where each extension's objects go: a folder of its own (see the module's docstring).
BUILD_TEMP = ROOT / "build" / "gpu-check"


def build_command(extension: str, rehearsal: bool) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) of the build of `extension`. In a rehearsal setup.py runs (finds the toolkit,
    selects the extension) and stops at build_ext's help instead of compiling: `make test` has just built the
    extension in place, and a second build here would take minutes."""
    argv = [sys.executable, "setup.py", "build_ext", "--inplace", "--build-temp",
            str(BUILD_TEMP / extension.rsplit(".", 1)[-1])]
    if rehearsal:
        argv.append("--help")
    return argv, {"FUSED_RESNET_EXTENSIONS": extension, "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count()))}


def make_importable() -> Path:
    """A path file in this python's site-packages naming the checkout, so that fused_resnet imports from any folder
    (what `make build` does; pip's editable install would compile everything once more)."""
    path = Path(sysconfig.get_path("purelib"), "fused_resnet.pth")
    path.write_text(f"{ROOT}\n")
    return path


def build(rehearsal: bool) -> int:
    started = time.monotonic()
    running = []
    for extension in EXTENSIONS:
        argv, env = build_command(extension, rehearsal)
        print(f"$ {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(argv)}", flush=True)
        # Each process's output goes to this one's (the check's log), lines interleaved.
        running.append((extension, subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env})))
    failed = []
    while running:  # each reported as it ends: the slower one is the build's critical path
        time.sleep(0.5)
        for extension, process in list(running):
            code = process.poll()
            if code is None:
                continue
            running.remove((extension, process))
            print(f"{extension}: exit status {code} at +{time.monotonic() - started:.0f} s", flush=True)
            if code != 0:
                failed.append(extension)
    if failed:
        print(f"build failed: {', '.join(failed)}", flush=True)
        return 1
    if not rehearsal:
        print(f"checkout importable through {make_importable()}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rehearsal", action="store_true", help="run setup.py for each extension, build nothing")
    return build(parser.parse_args(argv).rehearsal)


if __name__ == "__main__":
    sys.exit(main())
