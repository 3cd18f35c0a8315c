"""pytest's side of the fused_resnet benchmarks: the command line, the run's session, and the fixtures and
parametrization the benchmark tests take. What they mean (sizes, layouts, providers, the report) is in
benchmarks/harness.py; what is timed and measured, in benchmarks/measure.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a CUDA GPU, Triton's kernels can only be defined for its CPU interpreter, and fused_resnet defines them when
# it is imported (fused_resnet.triton.interpreted), so this comes first. Then the memory-traffic count
# (benchmarks/traffic.py) follows the triton backend's path on the CPU; nothing is timed on it (harness leaves
# interpreted backends out, as it leaves a backend out that cannot run).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import harness, traffic  # noqa: E402
from benchmarks.harness import DEFAULT_REPORT_DIR, DTYPES, SIZES, BenchSession, Provider, SizeConfig  # noqa: E402
from benchmarks.measure import Measure, MeasureMemory, keep_freed_cpu_memory  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fused_resnet benchmarks")
    group.addoption("--size", choices=sorted(SIZES), default="default",
                    help="smoke: ~1 min on a CPU; default: a CPU-sized run (2-4 min on 2 shared cores; bf16 only "
                         "where the device computes it natively); full: the GPU configuration (batch 256, 224x224, "
                         "bf16, channels_last). Default: default")
    group.addoption("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: cuda if available, else cpu")
    group.addoption("--dtype", choices=sorted(DTYPES), default=None,
                    help="runs every layout of the size in this dtype instead, natively computed or not")
    group.addoption("--channels-last", dest="channels_last", action="store_true", default=None,
                    help="runs every layout of the size in channels_last instead")
    group.addoption("--no-channels-last", dest="channels_last", action="store_false")
    group.addoption("--models", default=None,
                    help="comma-separated torchvision models of the model and memory benchmarks, e.g. resnet50 "
                         "(default: the size's)")
    group.addoption("--batch", type=int, default=None,
                    help="images per call of the whole-model benchmarks (default: the size's)")
    group.addoption("--resolution", type=int, default=None,
                    help="input height = width of the whole-model benchmarks (default: the size's)")
    group.addoption("--rounds", type=int, default=None,
                    help="timed calls per benchmark (overrides the size's; op benchmarks get 4x as many)")
    group.addoption("--threads", type=int, default=None,
                    help="torch.set_num_threads for CPU runs (on a shared machine, fewer threads than cores gives "
                         "steadier numbers)")
    group.addoption("--providers", default=None,
                    help="comma-separated providers to run, e.g. torchvision,fused-cpu,fused-torch,torch-compile,"
                         "torch-compile-fused-cpu (default: torchvision, every fused backend but torch that runs "
                         "on the device, and on a GPU torch-compile and torch-compile-fused-cuda)")
    group.addoption("--paired", action="store_true", default=False,
                    help="model and block cases of every provider but torchvision also time torchvision's "
                         "step, alternating call by call, and their ratios are the medians of the per-call ratios "
                         "(steadier on a shared or noisy machine; those cases take about twice as long)")
    group.addoption("--report-dir", type=Path, default=DEFAULT_REPORT_DIR,
                    help=f"where report.json and the chart are written (default: {DEFAULT_REPORT_DIR})")


def _names(option: str | None) -> list[str] | None:
    """A comma-separated option as a list of names; None when not given."""
    return [name.strip() for name in option.split(",") if name.strip()] if option else None


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--threads"):
        torch.set_num_threads(config.getoption("--threads"))
    device = harness.benchmark_device(config.getoption("--device"))
    keep_freed_cpu_memory()
    if device.type == "cuda":
        # As training scripts run: cuDNN picks its fastest convolution algorithms (during the warmup calls). Every
        # provider's convolutions are cuDNN's, so this helps each of them alike.
        torch.backends.cudnn.benchmark = True
    try:
        providers, left_out = harness.select_providers(_names(config.getoption("--providers")), device)
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None
    models = _names(config.getoption("--models"))
    size = harness.size_config(config.getoption("--size"), DTYPES.get(config.getoption("--dtype")),
                               config.getoption("channels_last"), tuple(models) if models is not None else None,
                               config.getoption("--rounds"), config.getoption("--batch"),
                               config.getoption("--resolution"), native=harness.native_low_precision(device))
    config.stash[harness.SESSION] = BenchSession(size, device, providers, left_out, config.getoption("--report-dir"),
                                                 paired=config.getoption("--paired"))
    config.pluginmanager.register(ProgressLines(config.stash[harness.SESSION], config), "fused_resnet_progress")


class ProgressLines:
    """The run's progress, in the terminal: the number of cases and the expected time once they are collected, then
    a line per finished case (harness.BenchSession.plan and .finish say what the lines hold) instead of its dot."""

    def __init__(self, session: BenchSession, config: pytest.Config):
        self.session = session
        self.config = config

    def _write(self, line: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            # Without the file names pytest would write before each test again after a line of ours (as with -q).
            reporter.showfspath = False
            reporter.write_line(line)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        tests = [(item.nodeid, getattr(item, "originalname", item.name)) for item in session.items]
        self._write(self.session.plan(tests))

    def pytest_report_teststatus(self, report: pytest.TestReport) -> tuple[str, str, str] | None:
        """No dot for a passed test whose measurement gets its line."""
        if report.when == "call" and report.passed and self.session.has_unshown_rows():
            return "passed", "", "PASSED"
        return None

    @pytest.hookimpl(trylast=True)  # after pytest's own report of the test, so that each line is a line of its own
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "teardown":
            for line in self.session.finish(report.nodeid):
                self._write(line)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A provider that differs from another only in training (fused-<backend>-lowmem, a memory policy) runs the
    training cases only: its eval and op cases would time the same code again."""
    kept, deselected = [], []
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        provider = params.get("provider")
        if provider is not None and provider.trains_only and params.get("mode") != "train":
            deselected.append(item)
        else:
            kept.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


def pytest_report_header(config: pytest.Config) -> list[str]:
    session = config.stash[harness.SESSION]
    counted, left_out = traffic.counted_providers(session.device)
    return session.header_lines() + [
        f"memory traffic counted for: {', '.join(p.name for p in counted)}"
        + "".join(f"; {name} left out: {why}" for name, why in left_out.items())]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test taking `provider` runs once per provider that can run here (the others are not collected;
    the header says why they are missing), `eager_provider` likewise without torch.compile; `layout` and
    `model_layout` run once per layout of the size's block/op and model benchmarks."""
    session = harness.session_of(metafunc.config)
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
    return harness.session_of(pytestconfig)


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


@pytest.fixture
def measure(benchmark, bench_session: BenchSession) -> Measure:
    return Measure(benchmark, bench_session)


@pytest.fixture
def measure_memory(bench_session: BenchSession) -> MeasureMemory:
    return MeasureMemory(bench_session)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables, so ours is the last thing printed
def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    session = config.stash.get(harness.SESSION, None)
    result = session.report() if session is not None else None
    if result is None:
        return
    tr = terminalreporter
    tr.write_sep("=", "fused_resnet benchmark summary")
    for line in result.text_lines():
        tr.write_line(line)
    json_path, chart_path, chart_problem = result.write(session.report_dir)
    tr.write_line("")
    tr.write_line(f"report: {json_path}")
    tr.write_line(f"chart:  {chart_path}" if chart_path else f"chart:  not drawn ({chart_problem})")
