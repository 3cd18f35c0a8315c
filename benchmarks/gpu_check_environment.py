"""What the GPU check runs on, as the python that runs its steps sees it; run as a step of its own:

    python -m benchmarks.gpu_check_environment --versions   # first, before the build: python, torch, CUDA, triton,
                                                            # nvcc, the GPU, the modules the steps need
    python -m benchmarks.gpu_check_environment --backends   # after the build: what fused_resnet can run

Each prints one JSON line (the last line of its output), which the check reads.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.report_rows import cpu_name

ROOT = Path(__file__).resolve().parents[1]
# The modules the steps import, by distribution name (the module of a distribution may be named otherwise).
NEEDED_DISTRIBUTIONS = {"torch": "torch", "torchvision": "torchvision", "triton": "triton", "pytest": "pytest",
                        "pytest-benchmark": "pytest_benchmark", "ninja": "ninja", "pybind11": "pybind11",
                        "setuptools": "setuptools", "hypothesis": "hypothesis", "matplotlib": "matplotlib"}


def distribution_version(name: str) -> str | None:
    """The installed version of the distribution `name` (triton also as PyTorch's nightly pytorch-triton)."""
    for candidate in (name, "pytorch-triton") if name == "triton" else (name,):
        try:
            return importlib.metadata.version(candidate)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def version_tuple(version: str) -> tuple[int, ...]:
    """(2, 11, 0) for "2.11.0+cu130": the leading release numbers."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def declared_minimums(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """{distribution: minimum version} of the `name>=version` requirements pyproject.toml declares (dependencies
    and extras)."""
    text = pyproject.read_text()
    return {name: version for name, version in re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)"', text)}


def _nvcc_version() -> str | None:
    nvcc = shutil.which("nvcc") or next((str(Path(home, "bin", "nvcc")) for home in
                                         (os.environ.get("CUDA_HOME"), "/usr/local/cuda")
                                         if home and os.access(Path(home, "bin", "nvcc"), os.X_OK)), None)
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return f"{nvcc} did not answer"
    match = re.search(r"release ([\d.]+)", out)
    return match.group(1) if match else out.strip()[-80:]


def compute_sanitizer() -> str | None:
    """compute-sanitizer on PATH, or in the CUDA toolkit's bin/ (which often is not on PATH)."""
    found = shutil.which("compute-sanitizer")
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        candidate = Path(home, "bin", "compute-sanitizer") if home else None
        if found is None and candidate is not None and os.access(candidate, os.X_OK):
            found = str(candidate)
    return found


def versions() -> dict:
    """Python, the installed distributions, CUDA, nvcc, the GPU, and which declared minimum is not met. Imports
    torch (for CUDA), not fused_resnet (not built yet)."""
    info: dict = {"python": platform.python_version(), "platform": platform.platform(),
                  "cpu_count": os.cpu_count(),
                  "distributions": {name: distribution_version(name) for name in NEEDED_DISTRIBUTIONS},
                  "missing_modules": [module for module in NEEDED_DISTRIBUTIONS.values()
                                      if importlib.util.find_spec(module) is None],
                  "nvcc": _nvcc_version(), "compute_sanitizer": compute_sanitizer()}
    too_old = {}
    for name, minimum in declared_minimums().items():
        installed = info["distributions"].get(name) or distribution_version(name)
        if installed is not None and version_tuple(installed) < version_tuple(minimum):
            too_old[name] = f"{installed} < {minimum}"
    info["below_declared_minimum"] = too_old
    try:
        import torch
    except Exception as error:  # the report must still come out, saying what broke
        info["torch_error"] = repr(error)
        return info
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if info["cuda_available"]:
        major, minor = torch.cuda.get_device_capability(0)
        info.update(device=torch.cuda.get_device_name(0), capability=f"{major}.{minor}")
    if shutil.which("nvidia-smi"):
        try:
            query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                    "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = query.stdout.strip() or query.stderr.strip()
        except subprocess.TimeoutExpired:
            info["nvidia_smi"] = "did not answer in 30 s"
    return info


def describe_versions(info: dict) -> str:
    """One line: what `versions()` found, for the check's progress and its summary."""
    found = info.get("distributions", {})
    parts = [f"python {info.get('python')}", f"torch {found.get('torch')} (CUDA {info.get('cuda')})",
             f"triton {found.get('triton')}", f"torchvision {found.get('torchvision')}", f"nvcc {info.get('nvcc')}",
             f"{info.get('cpu_count')} cores"]
    if info.get("device"):
        parts.append(f"{info['device']} (sm_{info.get('capability', '?').replace('.', '')})")
    else:
        parts.append("no CUDA GPU")
    return ", ".join(parts)


def backends() -> dict:
    """What fused_resnet's build can run: its backends' status, whether it was built with CUDA, the device."""
    import torch

    info: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                  "triton": distribution_version("triton"), "python": platform.python_version()}
    info["device"] = (torch.cuda.get_device_name(0) if info["cuda_available"]
                      else f"{cpu_name()} ({os.cpu_count()} cores)")
    info["compute_sanitizer"] = compute_sanitizer()
    try:
        import fused_resnet
        from fused_resnet import _native
    except Exception as error:  # the report must still come out, saying what broke
        info.update(backends={}, built_with_cuda=False, extension_error=f"import fused_resnet failed: {error!r}")
    else:
        info.update(backends=fused_resnet.backend_status(), built_with_cuda=_native.built_with_cuda(),
                    extension_error=_native.load_error)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--versions", action="store_true", help="python, torch, triton, CUDA, nvcc, the GPU")
    what.add_argument("--backends", action="store_true", help="what the built fused_resnet can run")
    args = parser.parse_args(argv)
    if args.versions:
        info = versions()
        print(describe_versions(info))
    else:
        info = backends()
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
