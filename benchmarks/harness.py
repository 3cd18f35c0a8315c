"""The fused_resnet benchmarks' set-up: sizes, layouts, providers, and the run's session and report.

    pytest benchmarks/                      # CPU: 2-4 minutes on 2 shared cores; on a GPU use --size full
    pytest benchmarks/ --size smoke         # about a minute on a small CPU: does everything run?
    pytest benchmarks/ --size full          # the GPU configuration: batch 256, 224x224, bf16, channels_last

Every case runs once per *provider*, side by side in one run:

* ``torchvision`` — the eager torchvision module (for op benchmarks: the unfused PyTorch sequence), the reference
  every ratio is taken against;
* ``torch-compile`` — the torchvision module under ``torch.compile`` (default mode): by default on a GPU, opt-in
  through ``--providers`` on a CPU (see :func:`select_providers`);
* ``fused-<backend>`` — ``fused_resnet.convert`` of the same module (same weights), run under
  ``fused_resnet.use_backend(backend)``, for each backend of fused_resnet's registry that can run on the benchmark
  device; ``fused-torch`` (the reference composite: the same math as torchvision, only the dispatch overhead
  differs) is opt-in;
* ``torch-compile-fused-<backend>`` — ``torch.compile`` (default mode) of ``fused-<backend>``'s module (for op
  benchmarks: of the function calling ``fused_resnet.ops.batch_norm_act`` with the backend): what a user who
  compiles anyway gets from fusing. Named as torch.compile of ``fused-<backend>``, so that ``-k torch-compile``
  selects every compiled provider. On a GPU ``torch-compile-fused-cuda`` runs by default, the others are opt-in;
  on a CPU all are (see :func:`select_providers`).

Every compiled provider compiles each case afresh (see :meth:`Provider.compile`).

Each case also runs in every *layout* (dtype and memory format) of the size; the default size measures a
low-precision dtype only where the device computes it natively (see :func:`native_low_precision`), float32 instead
elsewhere. The memory suite measures the bytes autograd keeps for backward per image instead of time
(benchmarks/measure.py). After the run, tables (images/s and the ratio to torchvision per provider, GB/s of the
memory-bound ops, activation memory) are printed, and the report is written to ``benchmarks/out/report.json`` with a
chart of the speedups next to it (``--report-dir`` moves both).

benchmarks/conftest.py turns the command line into these objects and hands them to the tests as fixtures.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import functools
import importlib.metadata
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import fused_resnet
from benchmarks import report, report_rows
from fused_resnet.cpu_info import cpu_isa, onednn_crash_report
from fused_resnet.kernels import REGISTRY

DEFAULT_REPORT_DIR = Path(__file__).parent / "out"

# ---------------------------------------------------------------------------------------------------------------
# Sizes and layouts


@dataclasses.dataclass(frozen=True)
class Layout:
    """The precision and memory format a case runs in (BatchNorm parameters stay fp32 in a bf16 op benchmark,
    as under autocast; blocks and models are converted to the dtype whole)."""

    dtype: torch.dtype
    channels_last: bool

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def memory_format_name(self) -> str:
        return "channels_last" if self.channels_last else "nchw"

    @property
    def label(self) -> str:
        return f"{self.dtype_name} {self.memory_format_name}"

    @property
    def test_id(self) -> str:
        return f"{self.dtype_name}-{self.memory_format_name}"


FP32_NCHW = Layout(torch.float32, channels_last=False)
FP32_CHANNELS_LAST = Layout(torch.float32, channels_last=True)
BF16_NCHW = Layout(torch.bfloat16, channels_last=False)
BF16_CHANNELS_LAST = Layout(torch.bfloat16, channels_last=True)


@dataclasses.dataclass(frozen=True)
class SizeConfig:
    """How big and how long: every shape, layout and repetition count of a run."""

    name: str
    block_batch: int  # images per call of the block benchmarks (at ResNet stage shapes)
    model_batch: int
    model_resolution: int  # input height = width of the whole-model benchmarks
    op_shape: tuple[int, int, int, int]  # (N, C, H, W) of the op benchmarks
    rounds: int  # timed calls per block/model benchmark (the median is reported)
    warmup_rounds: int
    op_rounds: int  # the op benchmarks are short, so they afford more calls
    layouts: tuple[Layout, ...]  # of the block and op benchmarks
    model_layouts: tuple[Layout, ...]  # of the whole-model benchmarks
    models: tuple[str, ...]  # torchvision model names of the whole-model benchmarks
    # Whether a low-precision layout runs in float32 on a device that does not compute its dtype natively (a
    # measurement of emulated arithmetic says nothing about fusing, and takes many times as long).
    low_precision_only_if_native: bool = False
    emulated_dtypes: tuple[torch.dtype, ...] = ()  # the dtypes this run measures in float32 instead, for that reason

    def __post_init__(self) -> None:
        # The warm-up rounds run the very step that is then timed (Measure: pytest-benchmark's pedantic), train or
        # eval, at the same batch, so one is enough to keep one-off costs out of the timed rounds: the Triton kernels'
        # JIT compilation (a ResNet-50 bf16 train step compiles 32 kernels in channels_last, about 39 s on a 2-core
        # host, 51 in NCHW, about 83 s: fused_resnet.warmup's docstring), torch.compile's, cuDNN's algorithm search.
        if self.warmup_rounds < 1:
            raise ValueError(f"size {self.name!r}: warmup_rounds must be at least 1, got {self.warmup_rounds}: the "
                             "first call of a step compiles (Triton, torch.compile) and must not be timed")


SIZES = {
    # Does everything run, in both precisions and both memory formats? About a minute on a 2-core CPU.
    "smoke": SizeConfig("smoke", block_batch=2, model_batch=2, model_resolution=64, op_shape=(4, 64, 28, 28),
                        rounds=3, warmup_rounds=1, op_rounds=5, layouts=(FP32_NCHW, BF16_CHANNELS_LAST),
                        model_layouts=(FP32_NCHW, BF16_CHANNELS_LAST), models=("resnet18",)),
    # A CPU-sized measurement: the models in all four layouts, the blocks and ops in two, each in bf16 only where the
    # device computes it natively (float32 instead: a CPU with AVX2 alone, like this project's, runs 143 cases in
    # float32). Each median is of 5 timed calls after 2 warm-up calls: with 3 after 1 the run took 1.5 minutes on the
    # idle 2-core EPYC here (4 at a load average of ~5), but a first timed call still paying for page faults swung
    # resnet50's NCHW training ratio to 0.63x where a profile of the same step gave 1.13x. (At 15 rounds and 3
    # warm-up calls, and with every bf16 convolution emulated, the run had taken over 30 minutes.)
    "default": SizeConfig("default", block_batch=8, model_batch=4, model_resolution=128, op_shape=(16, 64, 56, 56),
                          rounds=5, warmup_rounds=2, op_rounds=20, layouts=(FP32_NCHW, BF16_CHANNELS_LAST),
                          model_layouts=(FP32_NCHW, FP32_CHANNELS_LAST, BF16_NCHW, BF16_CHANNELS_LAST),
                          models=("resnet18", "resnet50"), low_precision_only_if_native=True),
    # The GPU configuration of docs/design.md §7: bf16 channels_last, the models in all four layouts. The op shape is
    # the largest BN+add+ReLU of ResNet-50 (stage 1).
    "full": SizeConfig("full", block_batch=256, model_batch=256, model_resolution=224, op_shape=(256, 256, 56, 56),
                       rounds=20, warmup_rounds=5, op_rounds=50, layouts=(BF16_CHANNELS_LAST,),
                       model_layouts=(BF16_CHANNELS_LAST, BF16_NCHW, FP32_CHANNELS_LAST, FP32_NCHW),
                       models=("resnet18", "resnet50")),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# The CPU feature flags (x86: /proc/cpuinfo's "flags"; aarch64: its "Features") of instructions that compute in a
# low-precision dtype. Without any of them PyTorch and oneDNN convert to float32 and back around every convolution:
# on the 2-core AVX2 EPYC here (load average ~4) a resnet50 training step at the default size (batch 4 at 128x128,
# NCHW) took 13 s in bf16 against 2.2 s in float32 fused (cpu backend), 15 s against 10.5 s in torchvision, and the
# default run with its bf16 layouts took over 30 minutes.
NATIVE_LOW_PRECISION_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16", "bf16"),
                              torch.float16: ("avx512fp16", "amx_fp16", "asimdhp")}


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags: the first "flags" (x86) or "Features" (aarch64) line of /proc/cpuinfo, whose text
    `cpuinfo` is (None: read it); empty where there is none."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_low_precision(device: torch.device, flags: frozenset[str] | None = None) -> frozenset[torch.dtype]:
    """The low-precision dtypes `device` computes natively: on a GPU float16, and bfloat16 from Ampere on; on a CPU
    those its feature flags (`flags`, None: this CPU's) give instructions for (NATIVE_LOW_PRECISION_FLAGS)."""
    if device.type == "cuda":
        return frozenset({torch.float16} | ({torch.bfloat16} if torch.cuda.is_bf16_supported(False) else set()))
    flags = cpu_flags() if flags is None else flags
    return frozenset(dtype for dtype, names in NATIVE_LOW_PRECISION_FLAGS.items() if flags.intersection(names))


def _overridden(layouts: tuple[Layout, ...], dtype: torch.dtype | None, channels_last: bool | None,
                emulated: tuple[torch.dtype, ...]) -> tuple:
    """`layouts` with the command line's dtype and memory format, the `emulated` dtypes' in float32, each distinct
    layout once, in order."""
    chosen = []
    for layout in layouts:
        chosen_dtype = dtype or (torch.float32 if layout.dtype in emulated else layout.dtype)
        chosen.append(Layout(chosen_dtype, layout.channels_last if channels_last is None else channels_last))
    return tuple(dict.fromkeys(chosen))


def size_config(size_name: str, dtype: torch.dtype | None = None, channels_last: bool | None = None,
                models: tuple[str, ...] | None = None, rounds: int | None = None, model_batch: int | None = None,
                model_resolution: int | None = None,
                native: frozenset[torch.dtype] | None = None) -> SizeConfig:
    """The size `size_name` with what the command line overrides (None: the size's own). `native`: the
    low-precision dtypes the device computes natively (None: as if all); a size that measures low precision only
    where it is native runs its other low-precision layouts in float32, unless `dtype` asks for one."""
    size = SIZES[size_name]
    emulated = ()
    if native is not None and dtype is None and size.low_precision_only_if_native:
        low_precision = [layout.dtype for layout in size.layouts + size.model_layouts if layout.dtype != torch.float32]
        emulated = tuple(d for d in dict.fromkeys(low_precision) if d not in native)
    overrides: dict = {"layouts": _overridden(size.layouts, dtype, channels_last, emulated),
                       "model_layouts": _overridden(size.model_layouts, dtype, channels_last, emulated),
                       "emulated_dtypes": emulated}
    if models is not None:
        overrides["models"] = models
    if model_batch:
        overrides["model_batch"] = model_batch
    if model_resolution:
        overrides["model_resolution"] = model_resolution
    if rounds:
        overrides.update(rounds=rounds, op_rounds=4 * rounds, warmup_rounds=min(size.warmup_rounds, rounds))
    return dataclasses.replace(size, **overrides)


def benchmark_device(choice: str) -> torch.device:
    """The device of `--device`: cpu, cuda, or auto (cuda if available, else cpu)."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{report_rows.cpu_name()} ({cpu_isa()}, {torch.get_num_threads()} threads)"


def _triton_version() -> str | None:
    """The installed Triton's version (PyTorch's nightly builds name the distribution pytorch-triton)."""
    for distribution in ("triton", "pytorch-triton"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(distribution)
    return None


def software_versions(device: torch.device) -> dict[str, str | None]:
    return {"torch": torch.__version__, "triton": _triton_version(),
            "cuda": torch.version.cuda if device.type == "cuda" else None, "fused_resnet": fused_resnet.__version__}


# ---------------------------------------------------------------------------------------------------------------
# Providers


@dataclasses.dataclass(frozen=True)
class Provider:
    """One way of running a benchmark case: the torchvision reference, a fused backend (under the default memory
    policy, or "min" for fused-<backend>-lowmem), torch.compile of either."""

    name: str
    backend: str | None = None  # the fused_resnet backend, for fused-<backend> and torch-compile-fused-<backend>
    compiled: bool = False
    memory: str | None = None  # the fused model's memory policy (fused_resnet.memory); None: the default

    @property
    def trains_only(self) -> bool:
        """Whether the provider differs from another only in training (a memory policy), so that only training
        cases run it."""
        return self.memory is not None

    @property
    def is_reference(self) -> bool:
        return self.name == "torchvision"

    @property
    def is_fused(self) -> bool:
        return self.backend is not None

    def context(self) -> contextlib.AbstractContextManager:
        """Where the timed calls run: inside use_backend for a fused provider (backward reuses the kernels its
        forward chose, so the context only has to cover the forward; a compiled graph guards on the backend, and
        is compiled on its first call, inside this context)."""
        return fused_resnet.use_backend(self.backend) if self.is_fused else contextlib.nullcontext()

    def compile(self, function: Callable) -> Callable:
        """`function` (a module or a plain function) as this provider runs it: under torch.compile (default
        mode) for a compiled provider, `function` itself otherwise.

        Dynamo's caches are emptied first. It keeps at most 8 compiled graphs per Python function
        (torch._dynamo.config.recompile_limit) and then runs that function eagerly, with only a warning: every
        case of a run compiles the same forward (ResNet's is shared by the torchvision and the fused models;
        12 torchvision BasicBlocks of different widths compiled 8 graphs), so without the reset the later
        cases of a run would time eager code under a compiled provider's name."""
        if not self.compiled:
            return function
        torch._dynamo.reset()
        return torch.compile(function)

    def prepare(self, reference: nn.Module) -> nn.Module:
        """This provider's module computing what the torchvision module `reference` computes, with the same
        parameter values (a fused copy, a compiled module, or `reference` itself)."""
        if not self.is_fused:
            return self.compile(reference)
        fused = fused_resnet.convert(copy.deepcopy(reference), memory=self.memory)
        unfused = fused_resnet.unfused_modules(fused)
        # A "fused" number measured on modules that fell back to PyTorch would be a lie.
        assert not unfused, f"{self.name}: modules run unfused after convert(): {unfused}"
        return self.compile(fused)


LOW_MEMORY_SUFFIX = "-lowmem"  # fused-<backend>-lowmem: the "min" memory policy
REFERENCE = Provider("torchvision")
PAIRED_TESTS = ("test_model", "test_block")  # the benchmarks that time the reference call by call under --paired


def known_providers() -> dict[str, Provider]:
    providers = [REFERENCE, Provider("torch-compile", compiled=True)]
    providers += [Provider(f"fused-{name}", backend=name) for name in REGISTRY]
    providers += [Provider(f"fused-{name}{LOW_MEMORY_SUFFIX}", backend=name, memory="min") for name in REGISTRY]
    providers += [Provider(f"torch-compile-fused-{name}", backend=name, compiled=True) for name in REGISTRY]
    return {provider.name: provider for provider in providers}


# Why a backend whose kernels run in an interpreter (Triton's, with TRITON_INTERPRET=1) is not benchmarked.
INTERPRETED = "its kernels run in an interpreter here: for testing, not timing"


def why_not_runnable(provider: Provider, device: torch.device) -> str | None:
    """Why `provider` cannot run on `device`, or None: the registry's reason for a fused backend."""
    if not provider.is_fused:
        return None
    backend = REGISTRY[provider.backend]
    reason = backend.why_not(device.type)
    if reason is None and backend.interpreted:
        return INTERPRETED
    return reason


def select_providers(requested: list[str] | None, device: torch.device) -> tuple[list[Provider], dict[str, str]]:
    """(the providers to run, {provider left out: why}): those `requested` (None: the default set) that can run on
    `device`. Raises ValueError naming an unknown provider."""
    known = known_providers()
    if requested is not None:
        unknown = [name for name in requested if name not in known]
        if unknown:
            raise ValueError(f"--providers: unknown {unknown}; known: {', '.join(known)}")
        names = requested
    else:
        names = ["torchvision", *(name for name, p in known.items()
                                  if p.is_fused and not p.compiled and p.backend != "torch" and not p.trains_only)]
        # The "min" memory policy of the backend `auto` picks here: its training cost beside the default's.
        names.append(f"fused-{device.type}{LOW_MEMORY_SUFFIX}")
        # On a GPU torch.compile is the baseline a user would otherwise reach for, so it runs by default. On a
        # CPU it is opt-in: compiling resnet18 at the smoke size took 35 s (eval) and 42 s (training) on a 2-core
        # machine, per layout: more than the whole smoke run's minute.
        # The fused model compiled runs by default on a GPU for the cuda backend (the one `auto` picks there): it
        # answers whether fusing still pays for a user who compiles anyway, against torch-compile in the same run,
        # and its compile costs about what torch-compile's does, which a GPU run already pays. On the 2-core CPU
        # (shared, so rough), resnet18's smoke-size tests, compile included, took 101 s and 65 s (train: fp32, bf16
        # channels_last) and 41 s and 24 s (eval) compiled fused, against 77, 85, 30 and 30 s for torch-compile;
        # the block tests 8-20 s against 4-30 s. So it roughly doubles a GPU run's compile time; the triton
        # backend's, which `auto` never picks, would triple it and is opt-in.
        if device.type == "cuda":
            names += ["torch-compile", "torch-compile-fused-cuda"]
    chosen, left_out = [], {}
    for name in names:
        reason = why_not_runnable(known[name], device)
        if reason is None:
            chosen.append(known[name])
        else:
            left_out[name] = reason
    if requested is None:
        left_out["fused-torch"] = "the reference composite, same math as torchvision (opt in with --providers)"
        on_cpu = "on a CPU only through --providers: compiling takes minutes"
        if device.type != "cuda":
            left_out["torch-compile"] = on_cpu
        for provider in [p for p in chosen if p.is_fused and not p.compiled and not p.trains_only]:
            twin = f"torch-compile-{provider.name}"
            if twin not in names:
                left_out[twin] = on_cpu if device.type != "cuda" else "opt in with --providers (compile time)"
    return chosen, left_out


# ---------------------------------------------------------------------------------------------------------------
# Progress: the expected time before the run, a line per finished case during it

# What one test of each benchmark function costs, for the estimate printed before a run: which of the size's round
# counts it times (its warm-up rounds come on top; None: it measures once, untimed), and its seconds per call at each
# CPU size: a test's whole duration (building and converting its module included) over its calls, averaged over the
# size's cases, float32 and bf16 as the size runs them here, measured with pytest --durations on the idle 2-core AVX2
# EPYC of this project (at a load average of ~5 the same run took 2-2.5x as long; the progress lines' "left"
# corrects for the pace a run actually keeps).
CALL_COSTS: dict[str, tuple[str | None, dict[str, float]]] = {
    "test_block": ("rounds", {"smoke": 0.089, "default": 0.082}),
    "test_model": ("rounds", {"smoke": 0.17, "default": 0.29}),
    "test_bn_add_relu": ("op_rounds", {"smoke": 0.0017, "default": 0.0072}),
    "test_device_copy": ("op_rounds", {"smoke": 0.0014, "default": 0.0014}),
    "test_copy_bandwidth": ("op_rounds", {"smoke": 0.11, "default": 0.043}),
    "test_block_memory": (None, {"smoke": 0.048, "default": 0.11}),
    "test_model_memory": (None, {"smoke": 0.27, "default": 0.37}),
    "test_traffic": (None, {"smoke": 0.29, "default": 0.5}),
}


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _reference_of(row: dict, rows: list[dict]) -> dict | None:
    """The reference provider's row of `row`'s case among `rows`, or None (not measured yet, or `row` is it)."""
    if row["is_reference"]:
        return None
    key = report_rows.case_key(row)
    return next((other for other in rows if other["is_reference"] and report_rows.case_key(other) == key), None)


# What a progress line shows of a row, by suite: (the row's field, its unit's size, the unit); images/s elsewhere.
_SHOWN = {"traffic": ("other_bytes_per_image", 1e6, "MB/image moved"),
          "memory": ("saved_bytes_per_image", 2**20, "MiB/image saved"),
          "copy": ("gb_per_s", 1, "GB/s"), "bandwidth": ("gb_per_s", 1, "GB/s")}


def progress_value(row: dict, rows: list[dict]) -> str:
    """What a finished case measured, as its progress line shows it, with the ratio to the reference provider of
    the same case measured earlier in the run (`rows`: the rows of its kind recorded so far)."""
    field, unit_size, unit = _SHOWN.get(row["suite"], ("images_per_s", 1, "images/s"))
    shown = f"{report_rows.format_number(row[field] / unit_size)} {unit}"
    if row.get("paired_ratio") is not None:
        return shown + f", {row['paired_ratio']:.2f}x {REFERENCE.name} (paired)"
    reference = _reference_of(row, rows)
    if reference is not None and reference[field]:
        shown += f", {row[field] / reference[field]:.2f}x {reference['provider']}"
    return shown


@dataclasses.dataclass
class Progress:
    """How far a run is: its tests' estimated seconds (see CALL_COSTS), those finished, the rows already shown."""

    expected_s: dict[str, float | None] = dataclasses.field(default_factory=dict)  # by test id, None: unknown
    finished: set[str] = dataclasses.field(default_factory=set)
    started: float = 0.0  # time.monotonic() when the run's tests started
    rows_shown: int = 0
    memory_rows_shown: int = 0


# ---------------------------------------------------------------------------------------------------------------
# The session and its report


@dataclasses.dataclass
class BenchSession:
    """One benchmark run: what it runs, where, and the rows it has measured."""

    size: SizeConfig
    device: torch.device
    providers: list[Provider]
    left_out: dict[str, str]
    report_dir: Path
    # --paired: a model or block case of another provider also times the reference, call by call (Measure's
    # reference_step)
    paired: bool = False
    rows: list[dict] = dataclasses.field(default_factory=list)  # timed: one per case, layout and provider
    memory_rows: list[dict] = dataclasses.field(default_factory=list)  # activation memory, likewise
    progress: Progress = dataclasses.field(default_factory=Progress)

    @functools.cached_property
    def row_info(self) -> dict:
        """What every row records besides its own measurement: where and with what it was measured."""
        return {"device": device_name(self.device), "size": self.size.name, **software_versions(self.device)}

    def header_lines(self) -> list[str]:
        """What the run is: printed before the tests run."""
        blocks = ", ".join(layout.label for layout in self.size.layouts)
        models = ", ".join(layout.label for layout in self.size.model_layouts)
        lines = [
            f"fused_resnet benchmarks: size={self.size.name} device={device_name(self.device)}; blocks/ops in "
            f"{blocks}; models ({', '.join(self.size.models)}) in {models}",
            f"providers: {', '.join(p.name for p in self.providers)}"
            + "".join(f"; {name} left out: {why}" for name, why in self.left_out.items()),
        ]
        if self.size.emulated_dtypes:
            names = ", ".join(Layout(dtype, False).dtype_name for dtype in self.size.emulated_dtypes)
            capability = (f" ({torch.backends.cpu.get_cpu_capability()})" if self.device.type == "cpu" else "")
            lines.append(f"{names} layouts run in float32: this {self.device.type}{capability} does not compute "
                         f"{names} natively, so it would time emulation (--dtype {names} runs it anyway)")
        if self.device.type == "cpu":
            lines.append(onednn_crash_report())
        if self.size.name == "full" and self.device.type == "cpu":
            lines.append("warning: --size full is the GPU configuration (batch 256 at 224x224); on a CPU it takes "
                         "hours")
        return lines

    def expected_seconds(self, function_name: str) -> float | None:
        """The estimated seconds of one test of the benchmark function `function_name` in this run: its calls
        (the size's warm-up and timed rounds, or 1) times its seconds per call (CALL_COSTS); None where no cost was
        measured (a GPU, the full size, an unknown function)."""
        rounds, seconds_per_call = CALL_COSTS.get(function_name, (None, {}))
        if self.device.type != "cpu" or self.size.name not in seconds_per_call:
            return None
        calls = self.size.warmup_rounds + getattr(self.size, rounds) if rounds else 1
        return calls * seconds_per_call[self.size.name]

    def _expected_test_seconds(self, test_id: str, function_name: str) -> float | None:
        """expected_seconds of one test, twice that for a model or block case that also times the reference
        (--paired)."""
        seconds = self.expected_seconds(function_name)
        pairs = self.paired and function_name in PAIRED_TESTS and f"-{REFERENCE.name}-" not in test_id
        if seconds is not None and pairs:
            return 2 * seconds
        return seconds

    def plan(self, tests: list[tuple[str, str]]) -> str:
        """Starts the clock on the run of `tests` ((test id, function name) each); returns the line announcing it:
        how many cases and how long they are expected to take."""
        self.progress = Progress({test_id: self._expected_test_seconds(test_id, name) for test_id, name in tests},
                                 started=time.monotonic())
        known = [seconds for seconds in self.progress.expected_s.values() if seconds is not None]
        line = f"fused_resnet benchmarks: {len(tests)} cases"
        if not known:
            return line + f"; no time estimate ({self.device.type}, size {self.size.name}: no measured call costs)"
        line += (f", expected to take about {_minutes(sum(known))} (min:s): each case's warm-up and timed calls at "
                 f"the seconds per call measured on an idle 2-core AVX2 CPU (harness.CALL_COSTS)")
        unknown = len(tests) - len(known)
        return line + (f", {unknown} cases not counted" if unknown else "")

    def has_unshown_rows(self) -> bool:
        return (len(self.rows), len(self.memory_rows)) != (self.progress.rows_shown, self.progress.memory_rows_shown)

    def finish(self, test_id: str) -> list[str]:
        """Marks the test `test_id` finished; returns a progress line for each row it recorded: how far the run
        is (tests finished, time elapsed, the estimate of what is left scaled by how the estimate fared so far),
        the case, the provider and what it measured."""
        progress = self.progress
        progress.finished.add(test_id)
        new_rows = self.rows[progress.rows_shown:] + self.memory_rows[progress.memory_rows_shown:]
        progress.rows_shown, progress.memory_rows_shown = len(self.rows), len(self.memory_rows)
        elapsed = time.monotonic() - progress.started
        done = sum(progress.expected_s.get(t) or 0.0 for t in progress.finished)
        left = sum(s or 0.0 for t, s in progress.expected_s.items() if t not in progress.finished)
        total = len(progress.expected_s)
        where = f"[{len(progress.finished):>{len(str(total))}}/{total} {_minutes(elapsed)}"
        where += f", ~{_minutes(left * elapsed / done)} left]" if done and left else "]"
        lines = []
        for row in new_rows:
            layout = f"{row['dtype']} {row['memory_format']}"
            rows = self.memory_rows if row["suite"] == "memory" else self.rows
            lines.append(f"{where} {row['suite']} {row['case']} {row['mode']} {layout}: {row['provider']} "
                         f"{progress_value(row, rows)}")
        return lines

    def report(self) -> report.Report | None:
        """The report of what was measured, or None if nothing was."""
        if not (self.rows or self.memory_rows):
            return None
        header = {
            **self.row_info,
            "providers": [p.name for p in self.providers],
            "providers_left_out": self.left_out,
            "layouts": [layout.label for layout in self.size.layouts],
            "model_layouts": [layout.label for layout in self.size.model_layouts],
            "models": list(self.size.models),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        return report.Report(header, self.rows, self.memory_rows)


SESSION = pytest.StashKey[BenchSession]()


def session_of(config: pytest.Config) -> BenchSession:
    """The run's session (benchmarks/conftest.py makes it when pytest starts), for the test modules' own
    pytest_generate_tests."""
    return config.stash[SESSION]
