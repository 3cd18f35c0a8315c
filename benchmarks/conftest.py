"""Shared machinery of the fused_resnet benchmarks: sizes, providers, step functions, and the summary table.

    pytest benchmarks/                      # CPU: a few minutes; on a GPU use --size full
    pytest benchmarks/ --size smoke         # about a minute on a small CPU: does everything run?
    pytest benchmarks/ --size full          # the GPU configuration: batch 256, 224x224, bf16, channels_last

Every case runs once per *provider*, side by side in one run:

* ``torchvision`` — the eager torchvision module (for op benchmarks: the unfused PyTorch sequence), the reference
  every ratio is taken against;
* ``fused-<backend>`` — ``fused_resnet.convert`` of the same module (same weights), run under
  ``fused_resnet.use_backend(backend)``, for each backend of ``fused_resnet.available_backends()`` that can run
  on the benchmark device;
* opt-in through ``--providers``: ``fused-torch`` (the reference composite: the same math as torchvision, only
  the dispatch overhead differs, so it is left out by default) and ``torch-compile`` (the torchvision module under
  ``torch.compile``; compiling takes minutes on a CPU).

After the run a table (median time, images/s, ratio to torchvision measured in the same run, GB/s for the
memory-bound op benchmarks, peak GPU memory) is printed and written to ``benchmarks/out/report.json``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import platform
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import fused_resnet

OUT_DIR = Path(__file__).parent / "out"
REPORT_PATH = OUT_DIR / "report.json"

# ---------------------------------------------------------------------------------------------------------------
# Sizes


@dataclasses.dataclass(frozen=True)
class SizeConfig:
    """How big and how long: every shape, precision and repetition count of a run."""

    name: str
    block_batch: int  # images per call of the block benchmarks (at ResNet stage shapes)
    model_batch: int
    model_resolution: int  # input height = width of the whole-model benchmarks
    op_shape: tuple[int, int, int, int]  # (N, C, H, W) of the op benchmarks
    rounds: int  # timed calls per block/model benchmark (the median is reported)
    warmup_rounds: int
    op_rounds: int  # the op benchmarks are short, so they afford more calls
    dtype: torch.dtype
    channels_last: bool


SIZES = {
    # Does everything run? About a minute for the whole suite on a 2-core CPU.
    "smoke": SizeConfig("smoke", block_batch=2, model_batch=2, model_resolution=64, op_shape=(4, 64, 28, 28),
                        rounds=3, warmup_rounds=1, op_rounds=5, dtype=torch.float32, channels_last=False),
    # A CPU-sized measurement: a few minutes on 2 cores.
    "default": SizeConfig("default", block_batch=8, model_batch=4, model_resolution=128, op_shape=(16, 64, 56, 56),
                          rounds=15, warmup_rounds=3, op_rounds=40, dtype=torch.float32, channels_last=False),
    # The GPU configuration of DESIGN.md §7. The op shape is the largest BN+add+ReLU of ResNet-50 (stage 1).
    "full": SizeConfig("full", block_batch=256, model_batch=256, model_resolution=224, op_shape=(256, 256, 56, 56),
                       rounds=20, warmup_rounds=5, op_rounds=50, dtype=torch.bfloat16, channels_last=True),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fused_resnet benchmarks")
    group.addoption("--size", choices=sorted(SIZES), default="default",
                    help="smoke: ~1 min on a CPU; default: a CPU-sized run; full: the GPU configuration "
                         "(batch 256, 224x224, bf16, channels_last). Default: default")
    group.addoption("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: cuda if available, else cpu")
    group.addoption("--dtype", choices=sorted(DTYPES), default=None, help="overrides the size's dtype")
    group.addoption("--channels-last", dest="channels_last", action="store_true", default=None,
                    help="overrides the size's memory format for block and model benchmarks")
    group.addoption("--no-channels-last", dest="channels_last", action="store_false")
    group.addoption("--rounds", type=int, default=None,
                    help="timed calls per benchmark (overrides the size's; op benchmarks get 4x as many)")
    group.addoption("--threads", type=int, default=None,
                    help="torch.set_num_threads for CPU runs (on a shared machine, fewer threads than cores gives "
                         "steadier numbers)")
    group.addoption("--providers", default=None,
                    help="comma-separated providers to run, e.g. torchvision,fused-cpu,fused-torch,torch-compile "
                         "(default: torchvision and every fused backend but torch that runs on the device)")


def _size_config(config: pytest.Config) -> SizeConfig:
    size = SIZES[config.getoption("--size")]
    overrides = {}
    if config.getoption("--dtype"):
        overrides["dtype"] = DTYPES[config.getoption("--dtype")]
    if config.getoption("channels_last") is not None:
        overrides["channels_last"] = config.getoption("channels_last")
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
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu} ({torch.get_num_threads()} threads)"


def memory_format_name(channels_last: bool) -> str:
    return "channels_last" if channels_last else "nchw"


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
    chosen, left_out = [], {}
    for name in names:
        reason = _why_not_runnable(known[name], device)
        if reason is None:
            chosen.append(known[name])
        else:
            left_out[name] = reason
    if not requested:
        left_out["fused-torch"] = "the reference composite, same math as torchvision (opt in with --providers)"
        left_out["torch-compile"] = "opt in with --providers (slow to compile)"
    return chosen, left_out


# ---------------------------------------------------------------------------------------------------------------
# Session state and fixtures


@dataclasses.dataclass
class BenchSession:
    size: SizeConfig
    device: torch.device
    providers: list[Provider]
    left_out: dict[str, str]
    rows: list[dict] = dataclasses.field(default_factory=list)


_SESSION = pytest.StashKey[BenchSession]()


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--threads"):
        torch.set_num_threads(config.getoption("--threads"))
    device = _device(config)
    if device.type == "cuda":
        # As training scripts run: cuDNN picks its fastest convolution algorithms (during the warmup calls). Every
        # provider's convolutions are cuDNN's, so this helps each of them alike.
        torch.backends.cudnn.benchmark = True
    providers, left_out = _select_providers(config, device)
    config.stash[_SESSION] = BenchSession(_size_config(config), device, providers, left_out)


def pytest_report_header(config: pytest.Config) -> list[str]:
    s = config.stash[_SESSION]
    lines = [
        f"fused_resnet benchmarks: size={s.size.name} device={device_name(s.device)} dtype={_dtype_name(s.size.dtype)} "
        f"memory_format={memory_format_name(s.size.channels_last)}",
        f"providers: {', '.join(p.name for p in s.providers)}"
        + "".join(f"; {name} left out: {why}" for name, why in s.left_out.items()),
    ]
    if s.size.name == "full" and s.device.type == "cpu":
        lines.append("warning: --size full is the GPU configuration (batch 256 at 224x224); on a CPU it takes hours")
    return lines


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test taking `provider` runs once per provider that can run here (the others are not collected;
    the header says why they are missing)."""
    if "provider" in metafunc.fixturenames:
        providers = metafunc.config.stash[_SESSION].providers
        metafunc.parametrize("provider", providers, ids=[p.name for p in providers])


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


def to_benchmark_layout(module: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    """`module` on the benchmark device, in its dtype, its 4-D weights in its memory format."""
    return module.to(device=device, dtype=dtype, memory_format=_memory_format(channels_last))


def random_activation(
    shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, channels_last: bool
) -> torch.Tensor:
    """A standard-normal 4-D tensor made on the device (the full size's tensors are too big to make on a CPU)."""
    return torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=_memory_format(channels_last))


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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
    """Times a step function through pytest-benchmark and records the row of the summary table."""

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
        memory_format: str,
        dtype: torch.dtype,
        bytes_moved: int | None = None,
        rounds: int | None = None,
    ) -> None:
        size, device = self.session.size, self.session.device
        info = {
            "suite": suite, "case": case, "mode": mode, "provider": provider, "images_per_call": images,
            "dtype": _dtype_name(dtype), "memory_format": memory_format, "device": device_name(device),
            "size": size.name,
        }
        if bytes_moved is not None:
            info["bytes_moved"] = bytes_moved
        self.benchmark.extra_info.update(info)
        # pytest-benchmark's own table then shows the providers of a case next to each other.
        self.benchmark.group = f"{suite}: {case} {mode} {memory_format}"
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
# The summary


def _with_ratios(rows: list[dict]) -> list[dict]:
    """Each row with `ratio`: its images/s over the reference provider's for the same case in this run."""
    def key(row: dict) -> tuple:
        return row["suite"], row["case"], row["mode"], row["memory_format"], row["dtype"]

    reference = {key(row): row["images_per_s"] for row in rows if row["is_reference"]}
    return [{**row, "ratio": row["images_per_s"] / reference[key(row)] if key(row) in reference else None}
            for row in rows]


def _grouped(rows: list[dict]) -> list[dict]:
    """`rows` with the providers of one measurement next to each other, the reference first (cases in the order
    they ran)."""
    def group(row: dict) -> tuple:
        return row["suite"], row["case"], row["mode"], row["memory_format"], row["dtype"]

    first_seen: dict[tuple, int] = {}
    for row in rows:
        first_seen.setdefault(group(row), len(first_seen))
    return sorted(rows, key=lambda row: (first_seen[group(row)], not row["is_reference"]))


def _format_table(rows: list[dict]) -> list[str]:
    columns = [  # (title, cell, right-aligned)
        ("suite", lambda r: r["suite"], False),
        ("case", lambda r: r["case"], False),
        ("mode", lambda r: r["mode"], False),
        ("format", lambda r: r["memory_format"], False),
        ("provider", lambda r: r["provider"], False),
        ("median ms", lambda r: f"{r['median_s'] * 1e3:.3f}", True),
        ("img/s", lambda r: f"{r['images_per_s']:.1f}", True),
        ("vs torchvision", lambda r: f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-", True),
        ("GB/s", lambda r: f"{r['gb_per_s']:.1f}" if r["gb_per_s"] is not None else "", True),
        ("peak MiB", lambda r: f"{r['peak_memory_mib']:.0f}" if r["peak_memory_mib"] is not None else "", True),
    ]
    cells = [[cell(row) for _, cell, _ in columns] for row in rows]
    widths = [max(len(title), *(len(line[i]) for line in cells)) for i, (title, _, _) in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if right else v.ljust(w)
                         for v, w, (_, _, right) in zip(values, widths, columns)).rstrip()

    out = [line([title for title, _, _ in columns]), line(["-" * w for w in widths])]
    previous_case = None
    for row, values in zip(rows, cells):
        case = row["suite"], row["case"]
        if previous_case is not None and case != previous_case:
            out.append("")  # a blank line between cases keeps the measurements of one case together
        previous_case = case
        out.append(line(values))
    return out


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables, so ours is the last thing printed
def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    session = config.stash.get(_SESSION, None)
    if session is None or not session.rows:
        return
    rows = _grouped(_with_ratios(session.rows))
    header = {
        "device": device_name(session.device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if session.device.type == "cuda" else None,
        "fused_resnet": fused_resnet.__version__,
        "size": session.size.name,
        "dtype": _dtype_name(session.size.dtype),
        "memory_format": memory_format_name(session.size.channels_last),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "providers_left_out": session.left_out,
    }
    tr = terminalreporter
    tr.write_sep("=", "fused_resnet benchmark summary")
    tr.write_line(f"device: {header['device']}  torch {header['torch']}"
                  + (f" (CUDA {header['cuda']})" if header["cuda"] else "")
                  + f"  fused_resnet {header['fused_resnet']}  size={header['size']}  dtype={header['dtype']}"
                  + f"  blocks/models in {header['memory_format']}")
    tr.write_line("median of the timed calls; vs torchvision = img/s / torchvision's img/s for the same case in this "
                  "run (> 1 is faster; for ops the reference is the unfused PyTorch sequence); GB/s against the "
                  "bytes the op must move")
    tr.write_line("")
    for text in _format_table(rows):
        tr.write_line(text)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    REPORT_PATH.write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    tr.write_line("")
    tr.write_line(f"written to {REPORT_PATH}")
