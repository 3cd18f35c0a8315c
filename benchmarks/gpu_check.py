"""The one-shot GPU check: build the extension for this card, run every test, compute-sanitizer over the CUDA kernel
tests, the benchmarks at the full size, and a summary, all into one folder, in under 8 minutes on one H100.

    make gpu-check OUT=<folder>              # on a CUDA machine: the python on PATH, no virtual environment, no
                                             # downloads (PYTHON=python3.12 to choose another)
    make gpu-check-rehearsal                 # the same steps on the CPU at the smoke size (part of `make test`)
    python -m benchmarks.gpu_check --out <folder> [--rehearsal] [--deadline SECONDS]

Every step runs in a subprocess with a time allowance: its own budget plus whatever the steps before it left
unused, while the later steps keep theirs, so the whole run ends by the deadline. A step that runs out of time is
interrupted (SIGINT: pytest still prints its summary and the benchmarks still write their report) and, if still
running after a grace period, killed. A step that fails or times out is recorded and the next one runs; the exit
status is 1 if any did. The rehearsal runs the same steps, skipping what needs a GPU and saying so.

The folder ends up with the layout of a benchmarks/results/<card>-<date>/ folder, a handful of files:
summary.md (printed last), report.json (the benchmark report, plus this run's steps and targets), speedup.png,
and log.txt (every step's full output).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import report as report_module

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEADLINE_S = 450  # 7.5 minutes: the check must finish in under 8 on one H100, the build included
INTERRUPT_GRACE_S = 15  # after SIGINT, for pytest to print its summary and the benchmarks to write their report
SUMMARY_RESERVE_S = 10  # kept back from the steps for the summary
LOG_NAME, SUMMARY_NAME = "log.txt", "summary.md"

# What the benchmark step runs to fit its couple of minutes at the full size (bf16 channels_last, batch 256): the
# memory-bound op with the device copy it is judged against, activation memory, ResNet-50, and its blocks (every
# Bottleneck shape of ResNet-50), in that order, so that an interrupted run has measured what the targets need.
# torch.compile runs on the whole model only: compiling each block and op case too would take minutes more; and
# of torchvision's model only (torch-compile-fused-cuda would double the compile time this step has).
# The traffic count first: it predicts, before anything is timed, what the non-convolution passes should cost at
# the card's copy bandwidth (about 15 s for resnet50's steps); the report sets the timings beside it.
BENCHMARK_FILES = ["benchmarks/test_traffic.py", "benchmarks/test_ops.py", "benchmarks/test_memory.py",
                   "benchmarks/test_models.py", "benchmarks/test_blocks.py"]
BENCHMARK_ARGS = ["--dtype", "bfloat16", "--channels-last", "--models", "resnet50", "-k",
                  "not BasicBlock and not torch-compile-fused"
                  " and not (torch-compile and (test_blocks.py or test_ops.py))"]
# compute-sanitizer slows every kernel launch down many times over: the bf16 kernel tests on two shapes, one with
# odd sizes (the scalar paths) and one with 512 channels (the 16-byte vector paths), in every layout and alignment.
SANITIZER_SELECTION = "cuda and bfloat16 and (2x3x7x9 or 2x512x14x14)"
RACECHECK_SELECTION = "cuda and bfloat16 and 2x512x14x14"


def _pytest(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider"]


# ---------------------------------------------------------------------------------------------------------------
# Running a step


@dataclasses.dataclass
class StepResult:
    name: str
    status: str  # ok, failed, timed out, skipped
    seconds: float
    allowed_s: float | None  # None for a skipped step
    note: str
    command: str = ""

    @property
    def failed(self) -> bool:
        return self.status in ("failed", "timed out")


@dataclasses.dataclass
class Step:
    """One part of the check. `plan(check)` gives the argv to run, or a string saying why the step is skipped;
    `conclude(check, result, output_tail)` may refine the result from the step's output (a note, a status)."""

    name: str
    budget_s: float  # its share of the deadline, the grace period after an interrupt included
    plan: Callable[[Check], list[str] | str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    conclude: Callable[[Check, StepResult, str], None] | None = None


def run_command(argv: list[str], log, timeout_s: float, env: dict[str, str]) -> tuple[str, float, str]:
    """Runs `argv` in the repository root, its output appended to the open binary file `log`; interrupts it after
    `timeout_s` (SIGINT to its process group, SIGKILL after INTERRUPT_GRACE_S). Returns (status, seconds, note)."""
    started = time.monotonic()
    try:
        # A session of its own: the signals reach the command and its children (compile workers), nothing else.
        # SIGINT handled by default there even when this runner was started in the background (which ignores it,
        # and a python started ignoring it would not turn it into KeyboardInterrupt: no report on a timeout).
        process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **env}, start_new_session=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    except OSError as error:
        return "failed", time.monotonic() - started, f"could not start: {error}"
    with process:
        try:
            code = process.wait(timeout=max(timeout_s, 0))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=INTERRUPT_GRACE_S)
                note = f"interrupted after {timeout_s:.0f} s"
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                note = f"interrupted after {timeout_s:.0f} s, killed {INTERRUPT_GRACE_S} s later"
            return "timed out", time.monotonic() - started, note
    seconds = time.monotonic() - started
    return ("ok", seconds, "") if code == 0 else ("failed", seconds, f"exit status {code}")


def _pytest_outcome(output: str) -> str:
    """pytest's closing line ("12 passed, 3 skipped in 4.2s"), or ""."""
    lines = [line.strip(" =") for line in output.splitlines()
             if re.search(r"\b(passed|failed|errors?|skipped|deselected|no tests ran|collected)\b.* in [\d.]+s", line)]
    return lines[-1] if lines else ""


def _note_pytest_outcome(check: Check, result: StepResult, output: str) -> None:
    outcome = _pytest_outcome(output)
    result.note = "; ".join(part for part in (outcome, result.note) if part)


# ---------------------------------------------------------------------------------------------------------------
# The environment, as the python that runs the steps sees it after the build


def environment() -> dict:
    """Device, versions, the modules the tests and benchmarks need, and what fused_resnet's build can run."""
    info: dict = {"python": platform.python_version(), "platform": platform.platform()}
    import torch

    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        info.update(device=torch.cuda.get_device_name(0), capability=f"{major}.{minor}")
    else:
        info["device"] = f"{report_module.cpu_name()} ({os.cpu_count()} cores)"
    for distribution in ("triton", "pytorch-triton"):
        try:
            info["triton"] = importlib.metadata.version(distribution)
            break
        except importlib.metadata.PackageNotFoundError:
            info["triton"] = None
    needed = ("torchvision", "pytest", "pytest_benchmark", "hypothesis", "matplotlib", "ninja", "pybind11")
    info["missing_modules"] = [name for name in needed if importlib.util.find_spec(name) is None]
    if shutil.which("nvidia-smi"):
        try:
            query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                    "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = query.stdout.strip() or query.stderr.strip()
        except subprocess.TimeoutExpired:
            info["nvidia_smi"] = "did not answer in 30 s"
    info["compute_sanitizer"] = _compute_sanitizer()
    try:
        import fused_resnet
        from fused_resnet import _native
    except Exception as error:  # the report must still come out, saying what broke
        info.update(backends={}, built_with_cuda=False, extension_error=f"import fused_resnet failed: {error!r}")
    else:
        info.update(backends=fused_resnet.backend_status(), built_with_cuda=_native.built_with_cuda(),
                    extension_error=_native.load_error)
    return info


def _compute_sanitizer() -> str | None:
    """compute-sanitizer on PATH, or in the CUDA toolkit's bin/ (which often is not on PATH)."""
    found = shutil.which("compute-sanitizer")
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        candidate = Path(home, "bin", "compute-sanitizer") if home else None
        if found is None and candidate is not None and os.access(candidate, os.X_OK):
            found = str(candidate)
    return found


# ---------------------------------------------------------------------------------------------------------------
# The check


class Check:
    """One run of the steps into `out`."""

    def __init__(self, out: Path, rehearsal: bool, deadline_s: float):
        self.out, self.rehearsal, self.deadline_s = out, rehearsal, deadline_s
        self.environment: dict = {}
        self.results: list[StepResult] = []
        self.started = time.monotonic()

    @property
    def has_gpu(self) -> bool:
        return bool(self.environment.get("cuda_available"))

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, message: str) -> None:
        minutes, seconds = divmod(int(self.elapsed()), 60)
        print(f"[+{minutes}:{seconds:02d}] {message}", flush=True)

    def run(self, steps: list[Step]) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        # A stale report must not pass for this run's.
        for name in (report_module.JSON_NAME, report_module.CHART_NAME, SUMMARY_NAME, LOG_NAME):
            (self.out / name).unlink(missing_ok=True)
        mode = "rehearsal on the CPU at the smoke size" if self.rehearsal else "GPU check at the full size"
        self.say(f"fused_resnet {mode}: {len(steps)} steps, deadline {self.deadline_s:.0f} s, into {self.out}")
        # Appending: every write lands at the end, the runner's and the steps' (which share the file) alike.
        with open(self.out / LOG_NAME, "ab") as log:
            for index, step in enumerate(steps):
                later = sum(s.budget_s for s in steps[index + 1:])
                allowed = self.deadline_s - self.elapsed() - later - SUMMARY_RESERVE_S
                self.results.append(self._run_step(step, f"{index + 1}/{len(steps)}", allowed, log))
        summary = self.summarize()
        self.say(f"summary written to {self.out / SUMMARY_NAME}\n")
        print(summary, flush=True)
        return 1 if any(result.failed for result in self.results) else 0

    def _run_step(self, step: Step, position: str, allowed: float, log) -> StepResult:
        planned = step.plan(self)
        if isinstance(planned, str):
            self.say(f"{position} {step.name}: skipped ({planned})")
            log.write(f"\n==== {step.name}: skipped ({planned})\n".encode())
            return StepResult(step.name, "skipped", 0.0, None, planned)
        command = shlex.join(planned)  # as it would be typed, to rerun it by hand
        self.say(f"{position} {step.name}: started, allowed {allowed:.0f} s: {command}")
        log.write(f"\n==== {step.name} (at +{self.elapsed():.0f} s, allowed {allowed:.0f} s)\n$ {command}\n".encode())
        log.flush()
        start = os.fstat(log.fileno()).st_size
        status, seconds, note = run_command(planned, log, allowed - INTERRUPT_GRACE_S, step.env)
        result = StepResult(step.name, status, seconds, allowed, note, command)
        if step.conclude is not None:
            step.conclude(self, result, _read_tail(self.out / LOG_NAME, start))
        log.write(f"==== {step.name}: {result.status} in {seconds:.1f} s"
                  f"{f' ({result.note})' if result.note else ''}\n".encode())
        log.flush()
        self.say(f"{position} {step.name}: {result.status} in {seconds:.0f} s"
                 + (f" ({result.note})" if result.note else ""))
        return result

    # ------------------------------------------------------------------------------------------------------------
    # The summary

    def summarize(self) -> str:
        """Writes summary.md and completes report.json with this run's steps, environment and targets."""
        json_path = self.out / report_module.JSON_NAME
        if json_path.exists():
            result = report_module.Report.load(json_path)
        else:  # the benchmarks did not get as far as writing their report
            env = self.environment
            result = report_module.Report({"device": env.get("device"), "torch": env.get("torch"),
                                           "cuda": env.get("cuda"), "triton": env.get("triton"),
                                           "date": _now()}, [])
        checks = report_module.target_checks(result)
        commit = _commit()
        result.extra["gpu_check"] = {
            "rehearsal": self.rehearsal, "deadline_s": self.deadline_s, "seconds": self.elapsed(),
            "commit": commit, "environment": self.environment,
            "steps": [dataclasses.asdict(r) for r in self.results],
            "targets": [dataclasses.asdict(c) for c in checks],
        }
        json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        summary = "\n".join(self._summary_lines(result, checks, commit)) + "\n"
        (self.out / SUMMARY_NAME).write_text(summary)
        return summary

    def _summary_lines(self, result: report_module.Report, checks: list[report_module.TargetCheck],
                       commit: str) -> list[str]:
        env, header = self.environment, result.header
        device = env.get("device") or header.get("device") or "unknown device"
        title = f"rehearsal on the CPU ({device})" if self.rehearsal else device
        run = ("the GPU check's steps rehearsed on the CPU at the smoke size (speed targets not judged)"
               if self.rehearsal else "the full size")
        counts = {status: sum(r.status == status for r in self.results)
                  for status in ("ok", "failed", "timed out", "skipped")}
        verdicts = {v: sum(c.verdict == v for c in checks) for v in ("met", "NOT MET", "not judged", "not measured")}
        lines = [
            f"# fused_resnet GPU check: {title}, {str(header.get('date') or _now())[:10]}",
            "",
            f"- run: {run}: bf16 channels_last, ResNet-50 and its Bottleneck blocks (torch.compile, where it runs, on "
            f"the model only); {self.elapsed():.0f} s of a {self.deadline_s:.0f} s deadline",
            f"- software: python {env.get('python')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
            f"triton {env.get('triton')}" + (f"; nvidia-smi: {env['nvidia_smi']}" if env.get("nvidia_smi") else "")
            + f"; fused_resnet commit {commit}",
            "- steps: " + ", ".join(f"{n} {status}" for status, n in counts.items() if n),
            "- targets: " + ", ".join(f"{n} {verdict}" for verdict, n in verdicts.items() if n),
        ]
        if env.get("missing_modules"):
            lines.append(f"- missing modules (what needs them fails): {', '.join(env['missing_modules'])}")
        measured = bool(result.rows or result.memory_rows)
        if measured and not self.rehearsal:
            folder = report_module.results_folder_name(result)
            lines += [f"- to keep this run: copy this folder to benchmarks/results/{folder}/ and add its line to "
                      "benchmarks/results/README.md:", "", "  " + report_module.results_readme_row(result, checks)]
        lines += ["", "## Measurements", ""]
        lines += [result.describe(), "", *result.markdown_lines()] if measured else ["(no benchmark report)", ""]
        steps = report_module.Table(
            "Steps", ["step", "status", "seconds", "allowed", "note"], 5,
            [[r.name, r.status, f"{r.seconds:.0f}", f"{r.allowed_s:.0f}" if r.allowed_s is not None else "-", r.note]
             for r in self.results])
        lines += ["## Steps", ""] + steps.markdown_lines(with_title=False) + ["", "## Targets", ""]
        return lines + report_module.targets_table(checks).markdown_lines(with_title=False)


def _read_tail(path: Path, start: int, limit: int = 1 << 16) -> str:
    """The last `limit` bytes written to `path` from offset `start` on."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        f.seek(max(start, end - limit))
        return f.read().decode(errors="replace")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------------------------------------------------------
# The steps


def _conclude_build(check: Check, result: StepResult, output: str) -> None:
    if check.rehearsal:
        result.note = "; ".join(filter(None, ["pip --dry-run: make test's build step (setup.py build_ext --inplace) "
                                                 "ran the real build", result.note]))


def _plan_build(check: Check) -> list[str]:
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--disable-pip-version-check",
               "--no-build-isolation", "--no-deps", "-e", "."]
    # On the GPU machine (no virtual environment) the editable install builds the extension and makes the checkout
    # importable in one command. `make test` has just built it in place (setup.py build_ext --inplace, the same
    # extensions): the rehearsal checks that pip accepts the command and that setup.py runs, without building twice.
    return [*command, "--dry-run"] if check.rehearsal else command


def _plan_environment(check: Check) -> list[str]:
    return [sys.executable, "-m", "benchmarks.gpu_check", "--print-environment"]


def _conclude_environment(check: Check, result: StepResult, output: str) -> None:
    reports = [line for line in output.splitlines() if line.startswith("{")]
    try:
        check.environment = json.loads(reports[-1])
    except (IndexError, json.JSONDecodeError):
        result.note = "; ".join(filter(None, [result.note, "no environment report (see log.txt)"]))
        return
    env = check.environment
    problems = []
    if env.get("extension_error"):
        problems.append(env["extension_error"])
    if not check.rehearsal and env["backends"].get("cuda") != "available":
        problems.append(f"the cuda backend is not available: {env['backends'].get('cuda')}")
    if env.get("missing_modules"):
        problems.append(f"missing modules: {', '.join(env['missing_modules'])}")
    backends = ", ".join(name for name, status in env["backends"].items() if status == "available")
    result.note = f"{env.get('device')}; torch {env.get('torch')}, CUDA {env.get('cuda')}; backends: {backends}"
    if problems:
        result.status = "failed"
        result.note += "; " + "; ".join(problems)


# The kernel-set suite's cuda cases (against the float64 formulas and the CPU ops' errors), and its "built and
# registered" check, which runs without a GPU too.
KERNEL_SET_TESTS = ["tests/test_kernel_sets.py", "tests/test_kernel_set_robustness.py", "tests/test_kernel_set_errors.py"]


def _plan_cuda_tests(check: Check) -> list[str]:
    # Without a GPU the cuda cases skip, saying why.
    return _pytest(*KERNEL_SET_TESTS, "-q", "-rs", "-k", "cuda")


# The Triton kernels' tests and the whole-block tests of the triton and cuda backends: on the GPU's CUDA tensors
# here (Triton compiled), interpreted on the CPU in `make test` (triton only).
GPU_BACKEND_TESTS = ["tests/test_triton_launchers.py", "tests/test_triton_conv.py", "tests/test_gpu_backends.py"]
# The kernels compiled for sm_90 by ptxas without a GPU (CI's check that no configuration spills): here the GPU
# steps compile and run the real ones, and those tests lean on Triton internals of the CI host's version.
SM90_COMPILE_TEST = "compiles_for_an_h100"
SM90_COMPILE_FILE = "tests/test_triton_conv_sm90.py"


def _plan_gpu_backend_tests(check: Check) -> list[str]:
    # One -k for every file: the kernel-set files' triton cases, and every test of the other files.
    # Not the sm_90 compile tests: they stand in for a GPU where there is none, with this host's Triton internals.
    selection = f"(triton or not test_kernel_set) and not {SM90_COMPILE_TEST}"
    command = _pytest(*GPU_BACKEND_TESTS, *KERNEL_SET_TESTS, "-q", "-rs", "-k", selection)
    # On the CPU they run in Triton's interpreter, minutes long, and `make test` has just run them.
    return [*command, "--collect-only"] if check.rehearsal else command


# The other tests that use a GPU when there is one: opcheck of the compiled ops on CUDA, backend selection.
GPU_AWARE_TESTS = ["tests/test_compile.py", "tests/test_backends.py"]


def _plan_gpu_aware_tests(check: Check) -> list[str]:
    command = _pytest(*GPU_AWARE_TESTS, "-q", "-rs")
    return [*command, "--collect-only"] if check.rehearsal else command


def _plan_other_tests(check: Check) -> list[str]:
    # CPU-only tests, which CI runs on every change: here they check this machine's torch/triton/Python, last, in
    # whatever time the steps before them left (minutes on a 2-core CPU, so only collected in the rehearsal).
    ignored = [*KERNEL_SET_TESTS, *GPU_BACKEND_TESTS, *GPU_AWARE_TESTS, SM90_COMPILE_FILE]
    command = _pytest("tests", *(f"--ignore={t}" for t in ignored), "-q")
    return [*command, "--collect-only"] if check.rehearsal else command


def _conclude_other_tests(check: Check, result: StepResult, output: str) -> None:
    _note_pytest_outcome(check, result, output)
    if check.rehearsal:
        result.note = f"collected only (make test runs them); {result.note}"


def _plan_sanitizer(check: Check) -> list[str] | str:
    if not check.environment:
        return "the environment step did not report (see log.txt)"
    if not check.has_gpu:
        return "needs a GPU"
    sanitizer = check.environment.get("compute_sanitizer")
    if not sanitizer:
        return "compute-sanitizer not found on PATH or in the CUDA toolkit"
    return [sanitizer, "--tool", "memcheck", "--error-exitcode", "1",
            *_pytest(*KERNEL_SET_TESTS, "-q", "-m", "not slow", "-k", SANITIZER_SELECTION)]


def _plan_racecheck(check: Check) -> list[str] | str:
    memcheck = _plan_sanitizer(check)
    if isinstance(memcheck, str):
        return memcheck
    # Shared-memory races live in the reductions (statistics, backward sums): one bf16 shape with 512 channels.
    return [memcheck[0], "--tool", "racecheck", "--error-exitcode", "1",
            *_pytest(*KERNEL_SET_TESTS, "-q", "-m", "not slow", "-k", RACECHECK_SELECTION)]


def _conclude_sanitizer(check: Check, result: StepResult, output: str) -> None:
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", output)
    outcome = _pytest_outcome(output)
    tool = result.name.split()[-1]  # memcheck or racecheck
    if not errors:
        verdict = f"no {tool} summary (see log.txt)"
    elif int(errors[-1]) == 0:
        verdict = f"clean: 0 {tool} errors" + (" in the tests that ran" if result.status == "timed out" else "")
    else:
        verdict = f"{errors[-1]} {tool} errors (see log.txt)"
    result.note = "; ".join(part for part in (verdict, outcome, result.note) if part)


def _plan_benchmarks(check: Check) -> list[str] | str:
    if not check.environment:
        return "the environment step did not report (see log.txt)"
    if not (check.has_gpu or check.rehearsal):
        return "no CUDA device: the full size would take hours on a CPU (rehearse with --rehearsal)"
    size, device = ("smoke", "cpu") if check.rehearsal else ("full", "cuda")
    return _pytest(*BENCHMARK_FILES, "--size", size, "--device", device, *BENCHMARK_ARGS,
                   "--report-dir", str(check.out), "-q")


def _conclude_benchmarks(check: Check, result: StepResult, output: str) -> None:
    _note_pytest_outcome(check, result, output)
    if not (check.out / report_module.JSON_NAME).exists():
        result.status = "failed"
        result.note += "; no report written"


STEPS = [
    Step("build", 120, _plan_build, env={"MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4))},
         conclude=_conclude_build),
    Step("environment", 15, _plan_environment, conclude=_conclude_environment),
    Step("CUDA kernel tests", 40, _plan_cuda_tests, conclude=_note_pytest_outcome),
    Step("Triton and GPU-backend tests", 50, _plan_gpu_backend_tests, conclude=_conclude_other_tests),
    Step("opcheck and backend tests", 25, _plan_gpu_aware_tests, conclude=_conclude_other_tests),
    # The caching allocator hands out pieces of larger blocks, where memcheck cannot see an overrun: allocate each
    # tensor on its own.
    Step("compute-sanitizer memcheck", 40, _plan_sanitizer, env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
         conclude=_conclude_sanitizer),
    Step("compute-sanitizer racecheck", 25, _plan_racecheck, conclude=_conclude_sanitizer),
    Step("benchmarks", 120, _plan_benchmarks, conclude=_conclude_benchmarks),
    Step("other tests", 10, _plan_other_tests, conclude=_conclude_other_tests),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="the folder to write summary.md, report.json, speedup.png, log.txt")
    parser.add_argument("--rehearsal", action="store_true", help="the same steps on the CPU at the smoke size")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S,
                        help=f"seconds the whole check may take (default {DEFAULT_DEADLINE_S})")
    parser.add_argument("--print-environment", action="store_true", help=argparse.SUPPRESS)  # the environment step
    args = parser.parse_args(argv)
    if args.print_environment:
        print(json.dumps(environment()))
        return 0
    if args.out is None:
        parser.error("--out is required")
    return Check(args.out.resolve(), args.rehearsal, args.deadline).run(STEPS)


if __name__ == "__main__":
    sys.exit(main())
