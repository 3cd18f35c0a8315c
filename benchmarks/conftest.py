"""Shared machinery of the fused_resnet benchmarks: sizes, layouts, providers, step functions, and the report.

    pytest benchmarks/                      # CPU: a few minutes; on a GPU use --size full
    pytest benchmarks/ --size smoke         # about a minute on a small CPU: does everything run?
    pytest benchmarks/ --size full          # the GPU configuration: batch 256, 224x224, bf16, channels_last

Every case runs once per *provider*, side by side in one run:

* ``torchvision`` — the eager torchvision module (for op benchmarks: the unfused PyTorch sequence), the reference
  every ratio is taken against;
* ``torch-compile`` — the torchvision module under ``torch.compile`` (default mode): by default on a GPU, opt-in
  through ``--providers`` on a CPU (see ``_select_providers``);
* ``fused-<backend>`` — ``fused_resnet.convert`` of the same module (same weights), run under
  ``fused_resnet.use_backend(backend)``, for each backend of ``fused_resnet.available_backends()`` that can run
  on the benchmark device; ``fused-torch`` (the reference composite: the same math as torchvision, only the
  dispatch overhead differs) is opt-in.

Each case also runs in every *layout* (dtype and memory format) of the size. The memory suite measures the bytes
autograd keeps for backward per image instead of time. After the run, tables (images/s and the ratio to
torchvision per provider, GB/s of the memory-bound ops, activation memory) are printed, and the report is written
to ``benchmarks/out/report.json`` with a chart of the speedups next to it (``--report-dir`` moves both).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import functools
import importlib.metadata
import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import fused_resnet
from benchmarks import report

DEFAULT_REPORT_DIR = Path(__file__).parent / "out"

# ---------------------------------------------------------------------------------------------------------------
# Sizes and layouts


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def memory_format_name(channels_last: bool) -> str:
    return "channels_last" if channels_last else "nchw"


@dataclasses.dataclass(frozen=True)
class Layout:
    """The precision and memory format a case runs in (BatchNorm parameters stay fp32 in a bf16 op benchmark,
    as under autocast; blocks and models are converted to the dtype whole)."""

    dtype: torch.dtype
    channels_last: bool

    @property
    def dtype_name(self) -> str:
        return _dtype_name(self.dtype)

    @property
    def memory_format_name(self) -> str:
        return memory_format_name(self.channels_last)

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


SIZES = {
    # Does everything run, in both precisions and both memory formats? About a minute on a 2-core CPU.
    "smoke": SizeConfig("smoke", block_batch=2, model_batch=2, model_resolution=64, op_shape=(4, 64, 28, 28),
                        rounds=3, warmup_rounds=1, op_rounds=5, layouts=(FP32_NCHW, BF16_CHANNELS_LAST),
                        model_layouts=(FP32_NCHW, BF16_CHANNELS_LAST), models=("resnet18",)),
    # A CPU-sized measurement: the models in all four layouts, the blocks and ops in two. About 2 minutes on an
    # idle 2-core machine (OpenMP threads sharing their cores with another process make it many times longer).
    "default": SizeConfig("default", block_batch=8, model_batch=4, model_resolution=128, op_shape=(16, 64, 56, 56),
                          rounds=15, warmup_rounds=3, op_rounds=40, layouts=(FP32_NCHW, BF16_CHANNELS_LAST),
                          model_layouts=(FP32_NCHW, FP32_CHANNELS_LAST, BF16_NCHW, BF16_CHANNELS_LAST),
                          models=("resnet18", "resnet50")),
    # The GPU configuration of DESIGN.md §7: bf16 channels_last, the models in all four layouts. The op shape is
    # the largest BN+add+ReLU of ResNet-50 (stage 1).
    "full": SizeConfig("full", block_batch=256, model_batch=256, model_resolution=224, op_shape=(256, 256, 56, 56),
                       rounds=20, warmup_rounds=5, op_rounds=50, layouts=(BF16_CHANNELS_LAST,),
                       model_layouts=(BF16_CHANNELS_LAST, BF16_NCHW, FP32_CHANNELS_LAST, FP32_NCHW),
                       models=("resnet18", "resnet50")),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fused_resnet benchmarks")
    group.addoption("--size", choices=sorted(SIZES), default="default",
                    help="smoke: ~1 min on a CPU; default: a CPU-sized run; full: the GPU configuration "
                         "(batch 256, 224x224, bf16, channels_last). Default: default")
    group.addoption("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: cuda if available, else cpu")
    group.addoption("--dtype", choices=sorted(DTYPES), default=None,
                    help="runs every layout of the size in this dtype instead")
    group.addoption("--channels-last", dest="channels_last", action="store_true", default=None,
                    help="runs every layout of the size in channels_last instead")
    group.addoption("--no-channels-last", dest="channels_last", action="store_false")
    group.addoption("--models", default=None,
                    help="comma-separated torchvision models of the model and memory benchmarks, e.g. resnet50 "
                         "(default: the size's)")
    group.addoption("--rounds", type=int, default=None,
                    help="timed calls per benchmark (overrides the size's; op benchmarks get 4x as many)")
    group.addoption("--threads", type=int, default=None,
                    help="torch.set_num_threads for CPU runs (on a shared machine, fewer threads than cores gives "
                         "steadier numbers)")
    group.addoption("--providers", default=None,
                    help="comma-separated providers to run, e.g. torchvision,fused-cpu,fused-torch,torch-compile "
                         "(default: torchvision, every fused backend but torch that runs on the device, and "
                         "torch-compile on a GPU)")
    group.addoption("--report-dir", type=Path, default=DEFAULT_REPORT_DIR,
                    help=f"where report.json and the chart are written (default: {DEFAULT_REPORT_DIR})")


def _overridden(layouts: tuple[Layout, ...], dtype: torch.dtype | None, channels_last: bool | None) -> tuple:
    """`layouts` with the command line's dtype and memory format, each distinct layout once, in order."""
    chosen = [Layout(dtype or layout.dtype, layout.channels_last if channels_last is None else channels_last)
              for layout in layouts]
    return tuple(dict.fromkeys(chosen))


def _size_config(config: pytest.Config) -> SizeConfig:
    size = SIZES[config.getoption("--size")]
    dtype = DTYPES[config.getoption("--dtype")] if config.getoption("--dtype") else None
    channels_last = config.getoption("channels_last")
    overrides: dict = {"layouts": _overridden(size.layouts, dtype, channels_last),
                       "model_layouts": _overridden(size.model_layouts, dtype, channels_last)}
    if config.getoption("--models"):
        overrides["models"] = tuple(name.strip() for name in config.getoption("--models").split(",") if name.strip())
    if config.getoption("--rounds"):
        rounds = config.getoption("--rounds")
        overrides.update(rounds=rounds, op_rounds=4 * rounds, warmup_rounds=min(size.warmup_rounds, rounds))
    return dataclasses.replace(size, **overrides)


def _device(config: pytest.Config) -> torch.device:
    choice = config.getoption("--device")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{report.cpu_name()} ({torch.get_num_threads()} threads)"


def _triton_version() -> str | None:
    """The installed Triton's version (PyTorch's nightly builds name the distribution pytorch-triton)."""
    for distribution in ("triton", "pytorch-triton"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(distribution)
    return None


def software_versions(device: torch.device) -> dict[str, str | None]:
    return {"torch": torch.__version__, "triton": _triton_version(),
            "cuda": torch.version.cuda if device.type == "cuda" else None, "fused_resnet": fused_resnet.__version__}


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work, so that a timed call measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# Providers


@dataclasses.dataclass(frozen=True)
class Provider:
    """One way of running a benchmark case: the torchvision reference, a fused backend, or torch.compile."""

    name: str
    backend: str | None = None  # the fused_resnet backend, for fused-<backend>
    compiled: bool = False

    @property
    def is_reference(self) -> bool:
        return self.name == "torchvision"

    @property
    def is_fused(self) -> bool:
        return self.backend is not None

    def context(self) -> contextlib.AbstractContextManager:
        """Where the timed calls run: inside use_backend for a fused provider (backward reuses the kernels its
        forward chose, so the context only has to cover the forward)."""
        return fused_resnet.use_backend(self.backend) if self.is_fused else contextlib.nullcontext()

    def prepare(self, reference: nn.Module) -> nn.Module:
        """This provider's module computing what the torchvision module `reference` computes, with the same
        parameter values (a fused copy, a compiled one, or `reference` itself)."""
        if self.is_fused:
            fused = fused_resnet.convert(copy.deepcopy(reference))
            unfused = fused_resnet.unfused_modules(fused)
            # A "fused" number measured on modules that fell back to PyTorch would be a lie.
            assert not unfused, f"{self.name}: modules run unfused after convert(): {unfused}"
            return fused
        if self.compiled:
            return torch.compile(reference)
        return reference


def _known_providers() -> dict[str, Provider]:
    providers = {"torchvision": Provider("torchvision"), "torch-compile": Provider("torch-compile", compiled=True)}
    for backend in fused_resnet.backends.BACKENDS:
        if backend != "auto":
            providers[f"fused-{backend}"] = Provider(f"fused-{backend}", backend=backend)
    return providers


def _why_not_runnable(provider: Provider, device: torch.device) -> str | None:
    """Why `provider` cannot run on `device`, or None."""
    if not provider.is_fused:
        return None
    status = fused_resnet.backend_status()[provider.backend]
    if status != "available":
        return status
    if provider.backend == "cpu" and device.type != "cpu":
        return "runs on CPU tensors only"
    if provider.backend in ("cuda", "triton") and device.type != "cuda":
        return "runs on CUDA tensors only"  # Triton's CPU interpreter is for testing, not timing
    return None


def _select_providers(config: pytest.Config, device: torch.device) -> tuple[list[Provider], dict[str, str]]:
    """(the providers to run, {provider left out: why})."""
    known = _known_providers()
    requested = config.getoption("--providers")
    if requested:
        names = [name.strip() for name in requested.split(",") if name.strip()]
        unknown = [name for name in names if name not in known]
        if unknown:
            raise pytest.UsageError(f"--providers: unknown {unknown}; known: {', '.join(known)}")
    else:
        names = ["torchvision", *(name for name, p in known.items() if p.is_fused and p.backend != "torch")]
        # On a GPU torch.compile is the baseline a user would otherwise reach for, so it runs by default. On a
        # CPU it is opt-in: compiling resnet18 at the smoke size took 35 s (eval) and 42 s (training) on a 2-core
        # machine, per layout: more than the whole smoke run's minute.
        if device.type == "cuda":
            names.append("torch-compile")
    chosen, left_out = [], {}
    for name in names:
        reason = _why_not_runnable(known[name], device)
        if reason is None:
            chosen.append(known[name])
        else:
            left_out[name] = reason
    if not requested:
        left_out["fused-torch"] = "the reference composite, same math as torchvision (opt in with --providers)"
        if device.type != "cuda":
            left_out["torch-compile"] = "on a CPU only through --providers: compiling takes minutes"
    return chosen, left_out


# ---------------------------------------------------------------------------------------------------------------
# Session state and fixtures


@dataclasses.dataclass
class BenchSession:
    size: SizeConfig
    device: torch.device
    providers: list[Provider]
    left_out: dict[str, str]
    report_dir: Path
    rows: list[dict] = dataclasses.field(default_factory=list)  # timed: one per case, layout and provider
    memory_rows: list[dict] = dataclasses.field(default_factory=list)  # activation memory, likewise

    @functools.cached_property
    def row_info(self) -> dict:
        """What every row records besides its own measurement: where and with what it was measured."""
        return {"device": device_name(self.device), "size": self.size.name, **software_versions(self.device)}


_SESSION = pytest.StashKey[BenchSession]()


def session_of(config: pytest.Config) -> BenchSession:
    """The run's session, for the test modules' own pytest_generate_tests."""
    return config.stash[_SESSION]


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--threads"):
        torch.set_num_threads(config.getoption("--threads"))
    device = _device(config)
    if device.type == "cuda":
        # As training scripts run: cuDNN picks its fastest convolution algorithms (during the warmup calls). Every
        # provider's convolutions are cuDNN's, so this helps each of them alike.
        torch.backends.cudnn.benchmark = True
    providers, left_out = _select_providers(config, device)
    config.stash[_SESSION] = BenchSession(_size_config(config), device, providers, left_out,
                                          config.getoption("--report-dir"))


def _describe_layouts(size: SizeConfig) -> str:
    blocks = ", ".join(layout.label for layout in size.layouts)
    models = ", ".join(layout.label for layout in size.model_layouts)
    return f"blocks/ops in {blocks}; models ({', '.join(size.models)}) in {models}"


def pytest_report_header(config: pytest.Config) -> list[str]:
    s = config.stash[_SESSION]
    lines = [
        f"fused_resnet benchmarks: size={s.size.name} device={device_name(s.device)}; {_describe_layouts(s.size)}",
        f"providers: {', '.join(p.name for p in s.providers)}"
        + "".join(f"; {name} left out: {why}" for name, why in s.left_out.items()),
    ]
    if s.size.name == "full" and s.device.type == "cpu":
        lines.append("warning: --size full is the GPU configuration (batch 256 at 224x224); on a CPU it takes hours")
    return lines


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test taking `provider` runs once per provider that can run here (the others are not collected;
    the header says why they are missing), `eager_provider` likewise without torch.compile; `layout` and
    `model_layout` run once per layout of the size's block/op and model benchmarks."""
    session = metafunc.config.stash[_SESSION]
    if "provider" in metafunc.fixturenames:
        metafunc.parametrize("provider", session.providers, ids=[p.name for p in session.providers])
    if "eager_provider" in metafunc.fixturenames:
        eager = [p for p in session.providers if not p.compiled]
        metafunc.parametrize("eager_provider", eager, ids=[p.name for p in eager])
    for fixture, layouts in (("layout", session.size.layouts), ("model_layout", session.size.model_layouts)):
        if fixture in metafunc.fixturenames:
            metafunc.parametrize(fixture, layouts, ids=[layout.test_id for layout in layouts])


@pytest.fixture(scope="session")
def bench_session(pytestconfig: pytest.Config) -> BenchSession:
    return pytestconfig.stash[_SESSION]


@pytest.fixture(scope="session")
def size(bench_session: BenchSession) -> SizeConfig:
    return bench_session.size


@pytest.fixture(scope="session")
def device(bench_session: BenchSession) -> torch.device:
    return bench_session.device


@pytest.fixture(scope="session")
def providers(bench_session: BenchSession) -> list[Provider]:
    return bench_session.providers


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """The same weights and inputs for every provider of a case."""
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------------------------------
# Step functions


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def to_benchmark_layout(module: nn.Module, device: torch.device, layout: Layout) -> nn.Module:
    """`module` on the benchmark device, in the layout's dtype, its 4-D weights in the layout's memory format."""
    return module.to(device=device, dtype=layout.dtype, memory_format=_memory_format(layout.channels_last))


def random_activation(shape: tuple[int, ...], device: torch.device, layout: Layout) -> torch.Tensor:
    """A standard-normal 4-D tensor made on the device (the full size's tensors are too big to make on a CPU)."""
    return torch.randn(shape, device=device, dtype=layout.dtype).contiguous(
        memory_format=_memory_format(layout.channels_last))


def train_step(
    module: nn.Module, x: torch.Tensor, backward: Callable[[torch.Tensor], None], provider: Provider,
    device: torch.device,
) -> Callable[[], None]:
    """One training step: forward, `backward(output)` (which calls .backward()), a plain SGD step."""
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with provider.context():
            out = module(x)
        backward(out)
        optimizer.step()
        synchronize(device)

    return step


def eval_step(module: nn.Module, x: torch.Tensor, provider: Provider, device: torch.device) -> Callable[[], None]:
    """One inference forward: eval mode (running statistics), no autograd."""
    module.eval()

    def step() -> None:
        with torch.no_grad(), provider.context():
            module(x)
        synchronize(device)

    return step


def _peak_memory_mib(fn: Callable[[], None], device: torch.device) -> float | None:
    """Peak device memory one call of `fn` allocates beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


class Measure:
    """Times a step function through pytest-benchmark and records the row of the report."""

    def __init__(self, benchmark, session: BenchSession):
        self.benchmark = benchmark
        self.session = session

    def __call__(
        self,
        fn: Callable[[], None],
        *,
        suite: str,
        case: str,
        mode: str,
        provider: str,
        is_reference: bool,
        images: int,
        layout: Layout,
        bytes_moved: int | None = None,
        rounds: int | None = None,
        details: dict | None = None,
    ) -> None:
        """`details`: what identifies the case beyond its label (e.g. model and resolution), kept in the row."""
        size, device = self.session.size, self.session.device
        info = {
            "suite": suite, "case": case, "mode": mode, "provider": provider, "images_per_call": images,
            "dtype": layout.dtype_name, "memory_format": layout.memory_format_name, **(details or {}),
            **self.session.row_info,
        }
        if bytes_moved is not None:
            info["bytes_moved"] = bytes_moved
        self.benchmark.extra_info.update(info)
        # pytest-benchmark's own table then shows the providers of a case next to each other.
        self.benchmark.group = f"{suite}: {case} {mode} {layout.label}"
        self.benchmark.pedantic(fn, rounds=rounds or size.rounds, warmup_rounds=size.warmup_rounds)
        if self.benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
            return
        median = self.benchmark.stats.stats.median
        row = {**info, "is_reference": is_reference, "median_s": median, "images_per_s": images / median,
               "gb_per_s": bytes_moved / median / 1e9 if bytes_moved is not None else None,
               "peak_memory_mib": _peak_memory_mib(fn, device)}
        if row["peak_memory_mib"] is not None:
            self.benchmark.extra_info["peak_memory_mib"] = row["peak_memory_mib"]
        self.session.rows.append(row)


@pytest.fixture
def measure(benchmark, bench_session: BenchSession) -> Measure:
    return Measure(benchmark, bench_session)


# ---------------------------------------------------------------------------------------------------------------
# Activation memory


def saved_for_backward_bytes(module: nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for backward while `forward()` runs `module` (whose output is dropped
    afterwards): every storage counted once, however many saved tensors view it, and the module's own parameters
    and buffers left out (they are held whether or not anything trains)."""
    held = {t.untyped_storage().data_ptr() for t in itertools.chain(module.parameters(), module.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = storage.nbytes()
        return t  # the saved tensors stay alive until the graph goes, so no address is reused meanwhile

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(saved.values())


class MeasureMemory:
    """Measures the activation memory of one training forward (and, on a GPU, the peak of a training step) and
    records the row of the report."""

    def __init__(self, session: BenchSession):
        self.session = session

    def __call__(
        self,
        module: nn.Module,
        x: torch.Tensor,
        backward: Callable[[torch.Tensor], None],
        provider: Provider,
        *,
        case: str,
        layout: Layout,
        details: dict | None = None,
    ) -> None:
        """`module` in training mode on input `x`; `backward(output)` calls .backward(), as in `train_step`."""
        device = self.session.device
        module.train()

        def forward() -> torch.Tensor:
            with provider.context():
                return module(x)

        saved = saved_for_backward_bytes(module, forward)
        # Peak allocated memory of a whole training step on a GPU, taken on the second one: the first also holds
        # cuDNN's algorithm search.
        step = train_step(module, x, backward, provider, device)
        if device.type == "cuda":
            step()
        self.session.memory_rows.append({
            "suite": "memory", "case": case, "mode": "train", "provider": provider.name,
            "is_reference": provider.is_reference, "images_per_call": x.shape[0],
            "dtype": layout.dtype_name, "memory_format": layout.memory_format_name, **(details or {}),
            **self.session.row_info,
            "saved_bytes": saved, "saved_bytes_per_image": saved / x.shape[0],
            "peak_memory_mib": _peak_memory_mib(step, device),
        })


@pytest.fixture
def measure_memory(bench_session: BenchSession) -> MeasureMemory:
    return MeasureMemory(bench_session)


# ---------------------------------------------------------------------------------------------------------------
# The report


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables, so ours is the last thing printed
def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    session = config.stash.get(_SESSION, None)
    if session is None or not (session.rows or session.memory_rows):
        return
    header = {
        **session.row_info,
        "providers": [p.name for p in session.providers],
        "providers_left_out": session.left_out,
        "layouts": [layout.label for layout in session.size.layouts],
        "model_layouts": [layout.label for layout in session.size.model_layouts],
        "models": list(session.size.models),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    result = report.Report(header, session.rows, session.memory_rows)
    tr = terminalreporter
    tr.write_sep("=", "fused_resnet benchmark summary")
    for line in result.text_lines():
        tr.write_line(line)
    json_path, chart_path, chart_problem = result.write(session.report_dir)
    tr.write_line("")
    tr.write_line(f"report: {json_path}")
    tr.write_line(f"chart:  {chart_path}" if chart_path else f"chart:  not drawn ({chart_problem})")
