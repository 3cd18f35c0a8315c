"""Builds fused_resnet._C: the C++ CPU kernels always, the CUDA kernels whenever a CUDA toolkit is found.

Environment:
  FUSED_RESNET_BUILD_CUDA=0   skip the CUDA kernels even when a toolkit is present
  CUDA_HOME                   the toolkit root (otherwise asked of the nvcc on PATH)
  TORCH_CUDA_ARCH_LIST        GPU architectures; default: the visible GPU's, or "8.0;9.0+PTX" (Ampere, Hopper, and
                              PTX for later cards) when none; either way with PTX for the newest
  MAX_JOBS                    parallel compile jobs (ninja)
  FUSED_RESNET_EXTENSIONS     comma-separated modules to build (default: all), e.g. fused_resnet._C_avx2: the GPU
                              check builds each in a process of its own, in parallel (benchmarks/gpu_check_build.py)
"""

import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# SASS for Ampere and Hopper, and PTX for the newest of them, which the driver compiles for any later card (sm_100,
# sm_120) instead of failing with "no kernel image" (the sm_86 and sm_89 cards run sm_80's SASS).
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def log(message):
    print(f"fused_resnet setup: {message}", file=sys.stderr)


def find_cuda_home():
    """The CUDA toolkit root, or None. nvcc on PATH may be a wrapper script, so ask nvcc where it lives
    rather than guessing from its path, and accept the root only if it has the headers and libraries
    (in lib64/, or lib/ as in toolkits assembled from the nvidia-* wheels; torch looks in both)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        # Only a compilation's dry run prints nvcc's settings (`--dryrun --version` just prints the version).
        dryrun = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", dryrun.stdout + dryrun.stderr, re.MULTILINE)
    root = os.path.realpath(match.group(1).strip()) if match else os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    has_libs = any(os.path.isdir(os.path.join(root, lib)) for lib in ("lib64", "lib"))
    if os.path.isdir(os.path.join(root, "include")) and has_libs:
        return root
    log(f"nvcc at {nvcc} reports toolkit root {root}, which lacks include/ or lib64/ (lib/); not building CUDA")
    return None


def want_cuda():
    if os.environ.get("FUSED_RESNET_BUILD_CUDA", "1") == "0":
        log("FUSED_RESNET_BUILD_CUDA=0: building the CPU kernels only")
        return False
    cuda_home = find_cuda_home()
    if cuda_home is None:
        log("no CUDA toolkit found: building the CPU kernels only")
        return False
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    log(f"CUDA toolkit at {cuda_home}")
    return True


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extensions():
    with_cuda = want_cuda() and bool(sources("csrc/cuda/*.cu"))
    import torch  # noqa: F401  (after CUDA_HOME is settled)
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    # at::parallel_for is OpenMP inlined into our code: without -fopenmp it silently runs on one thread.
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    cpu_sources = [s for s in sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp") if not s.endswith("_avx2.cpp")]
    # The AVX2 kernels need their own flags, hence their own module (see csrc/cpu/kernels_avx2.cpp).
    avx2 = []
    if platform.machine().lower() in ("x86_64", "amd64"):
        avx2_flags = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
        avx2 = [CppExtension("fused_resnet._C_avx2", sources("csrc/cpu/*_avx2.cpp"),
                             extra_compile_args={"cxx": cxx_flags + avx2_flags}, extra_link_args=link_flags)]
    if not with_cuda:
        return [CppExtension("fused_resnet._C", cpu_sources, extra_compile_args={"cxx": cxx_flags},
                             extra_link_args=link_flags)] + avx2
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}+PTX"  # PTX: the same build runs on later cards
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    log(f"CUDA architectures: {os.environ['TORCH_CUDA_ARCH_LIST']}")
    define = ["-DFUSED_RESNET_WITH_CUDA"]
    return [
        CUDAExtension(
            "fused_resnet._C",
            cpu_sources + sources("csrc/cuda/*.cpp") + sources("csrc/cuda/*.cu"),
            extra_compile_args={"cxx": cxx_flags + define, "nvcc": ["-O3", "-lineinfo"] + define},
            extra_link_args=link_flags,
        )
    ] + avx2


def selected(all_extensions):
    """The extensions FUSED_RESNET_EXTENSIONS names (all when it is unset or empty)."""
    names = [name.strip() for name in os.environ.get("FUSED_RESNET_EXTENSIONS", "").split(",") if name.strip()]
    if not names:
        return all_extensions
    known = [extension.name for extension in all_extensions]
    unknown = [name for name in names if name not in known]
    if unknown:
        sys.exit(f"fused_resnet setup: FUSED_RESNET_EXTENSIONS names {unknown}, which this machine does not build; "
                 f"it builds {known}")
    log(f"FUSED_RESNET_EXTENSIONS: building {names} only")
    return [extension for extension in all_extensions if extension.name in names]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=selected(extensions()), cmdclass={"build_ext": build_ext_class()})
