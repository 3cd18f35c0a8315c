"""The GPU check's steps, in the order they run: what each runs (its plan), how its output is read (its conclusion),
and its budget.

The head is reserved (the steps before it leave it its budget): the versions, the build, the environment, a
correctness smoke of each GPU backend, and the headline measurement, resnet50's then resnet18's. The rest runs in
the time left, the most telling first, each only if its budget is still left (benchmarks/gpu_check_process.py).
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

from benchmarks.gpu_check_environment import describe_versions
from benchmarks.gpu_check_process import Check, Step, StepResult
from benchmarks.report import JSON_NAME

# The file the headline steps append their rows to, in the check's folder. Their pytest runs' own report.json and
# chart (the same rows) go to a temporary folder: the device machine returns at most 8 files from a command's output
# folder, and the check's folder holds 7 without them (benchmarks/results/README.md).
HEADLINE_ROWS_NAME = "headline.jsonl"
HEADLINE_REPORT_DIR = Path(tempfile.gettempdir()) / "fused_resnet_gpu_check_headline"
# The op and block benchmarks' report folder, in the check's folder: its rows join report.json at the end.
BENCHMARKS_DIR_NAME = "benchmarks"


def load_rows(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; a line cut off by a killed writer (the last) is left out."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def pytest_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider"]


def pytest_outcome(output: str) -> str:
    """pytest's closing line ("12 passed, 3 skipped in 4.2s"), or ""."""
    lines = [line.strip(" =") for line in output.splitlines()
             if re.search(r"\b(passed|failed|errors?|skipped|deselected|no tests ran|collected)\b.* in [\d.]+s", line)]
    return lines[-1] if lines else ""


def _add_note(result: StepResult, *parts: str) -> None:
    result.note = "; ".join(part for part in (*parts, result.note) if part)


def note_pytest_outcome(check: Check, result: StepResult, output: str) -> None:
    """The step's note gets pytest's closing line; a run that selected no test fails (a selection gone stale)."""
    outcome = pytest_outcome(output)
    _add_note(result, outcome)
    if re.search(r"\bno tests (ran|collected)\b", outcome):
        result.status = "failed"
        _add_note(result, "the selection matched no test")


def _report(output: str, result: StepResult, what: str) -> dict | None:
    """The JSON line an environment step printed last; or None, the step marked failed for want of its `what`
    report."""
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    result.status = "failed"
    _add_note(result, f"no {what} report (see log.txt)")
    return None


def _fail_on(result: StepResult, problems: list[str]) -> None:
    """Marks the step failed when there are problems, each appended to its note."""
    if problems:
        result.status = "failed"
        result.note += "".join(f"; {problem}" for problem in problems)


# ---------------------------------------------------------------------------------------------------------------
# The head: versions, build, environment, smoke, headline


def _plan_versions(check: Check) -> list[str]:
    return [sys.executable, "-m", "benchmarks.gpu_check_environment", "--versions"]


def _conclude_versions(check: Check, result: StepResult, output: str) -> None:
    info = _report(output, result, "versions")
    if info is None:
        return
    check.versions = info
    problems = []
    if info.get("torch_error"):
        problems.append(f"torch does not import: {info['torch_error']}")
    problems += [f"{name} {found} (pyproject.toml's minimum)" for name, found in
                 info.get("below_declared_minimum", {}).items()]
    if info.get("missing_modules"):
        problems.append(f"missing modules: {', '.join(info['missing_modules'])}")
    result.note = describe_versions(info)
    _fail_on(result, problems)


def _plan_build(check: Check) -> list[str]:
    return [sys.executable, "-m", "benchmarks.gpu_check_build", *(["--rehearsal"] if check.rehearsal else [])]


def _conclude_build(check: Check, result: StepResult, output: str) -> None:
    if check.rehearsal:
        _add_note(result, "rehearsal: setup.py ran for each extension without building (make test's build step "
                          "built them)")


def _plan_environment(check: Check) -> list[str]:
    return [sys.executable, "-m", "benchmarks.gpu_check_environment", "--backends"]


def _conclude_environment(check: Check, result: StepResult, output: str) -> None:
    env = _report(output, result, "environment")
    if env is None:
        return
    check.environment = env
    problems = []
    if env.get("extension_error"):
        problems.append(env["extension_error"])
    if not check.rehearsal and env["backends"].get("cuda") != "available":
        problems.append(f"the cuda backend is not available: {env['backends'].get('cuda')}")
    backends = ", ".join(name for name, status in env["backends"].items() if status == "available")
    result.note = f"{env.get('device')}; backends: {backends}"
    unavailable = [f"{name}: {status}" for name, status in env["backends"].items() if status != "available"]
    if unavailable and not check.rehearsal:
        result.note += f" (not: {'; '.join(unavailable)})"
    _fail_on(result, problems)


# A block's train step on each GPU backend against torchvision in float64, both memory formats, and the bf16 and
# fp16 blocks against torchvision's own error in that dtype: under a minute with the Triton kernels' first compiles.
SMOKE_TESTS = ["tests/test_gpu_backends.py"]
SMOKE_SELECTION = "(test_block_matches_torchvision and bottleneck-down and train) or test_low_precision_block"


def _plan_smoke(check: Check) -> list[str]:
    command = pytest_argv(*SMOKE_TESTS, "-q", "-rs", "-k", SMOKE_SELECTION)
    # On a CPU the triton backend runs interpreted, and make test has just run these tests.
    return [*command, "--collect-only"] if check.rehearsal else command


def _plan_headline(model: str, first: bool):
    """The headline of one model, in a pytest run of its own: a model cut off by its allowance leaves the one
    before it a finished step. The copy bandwidth, which the traffic prediction needs, is measured in the first."""
    def plan(check: Check) -> list[str] | str:
        if not check.environment:
            return "the environment step did not report (see log.txt)"
        if not (check.has_gpu or check.rehearsal):
            return "no CUDA device: the full size would take hours on a CPU (rehearse with --rehearsal)"
        # Ten timed calls after five warm-up calls (the full size's twenty would take half as long again for every
        # eager provider, where the compiled providers' minute of compiling dominates anyway); one of each in the
        # rehearsal, which checks that the rows come out, not what they say.
        size, device, rounds = ("smoke", "cpu", "1") if check.rehearsal else ("full", "cuda", "10")
        # fused-torch (the reference composite) is not timed, so its traffic is not counted either.
        selection = "not fused-torch" + ("" if first else " and not test_copy_bandwidth")
        return pytest_argv(
            "benchmarks/test_traffic.py", "benchmarks/test_models.py", "-p", "benchmarks.row_stream",
            "--rows-jsonl", str(check.out / HEADLINE_ROWS_NAME), "--headline-order", "--size", size,
            "--device", device, "--dtype", "bfloat16", "--channels-last", "--models", model, "--rounds", rounds,
            "-k", selection, "--report-dir", str(HEADLINE_REPORT_DIR), "-q")

    return plan


def _conclude_headline(model: str):
    def conclude(check: Check, result: StepResult, output: str) -> None:
        note_pytest_outcome(check, result, output)
        timed = [row for row in load_rows(check.out / HEADLINE_ROWS_NAME)
                 if row["suite"] == "models" and row.get("model") == model]
        _add_note(result, f"{len(timed)} {model} rows")
        if not timed:
            result.status = "failed"

    return conclude


# ---------------------------------------------------------------------------------------------------------------
# The rest, in the time left


# The kernel-set suite's cuda cases (against the float64 formulas and the CPU ops' errors), and its "built and
# registered" check, which runs without a GPU too. Each case loops over every shape of its table; the representative
# selection takes the dtypes a ResNet trains in, the rest (float64, float16) runs later if time allows.
KERNEL_SET_TESTS = ["tests/test_kernel_sets.py", "tests/test_kernel_set_robustness.py",
                    "tests/test_kernel_set_errors.py"]
REPRESENTATIVE_KERNEL_SELECTION = "cuda and (bfloat16 or float32)"
OTHER_KERNEL_SELECTION = "cuda and not (bfloat16 or float32)"


def _plan_kernel_tests(selection: str):
    def plan(check: Check) -> list[str]:
        # Without a GPU the cuda cases skip, saying why.
        return pytest_argv(*KERNEL_SET_TESTS, "-q", "-rs", "-k", selection)

    return plan


# The Triton kernels' tests and the whole-block tests of the triton and cuda backends: on the GPU's CUDA tensors
# here (Triton compiled), interpreted on the CPU in `make test` (triton only).
GPU_BACKEND_TESTS = ["tests/test_triton_launchers.py", "tests/test_triton_conv.py", "tests/test_gpu_backends.py"]
# The kernels compiled for sm_90 by ptxas without a GPU (CI's check that no configuration spills): here the GPU
# steps compile and run the real ones, and those tests lean on Triton internals of the CI host's version.
SM90_COMPILE_TEST = "compiles_for_an_h100"
SM90_COMPILE_FILE = "tests/test_triton_conv_sm90.py"


def _plan_gpu_backend_tests(check: Check) -> list[str]:
    # One -k for every file: the kernel-set files' triton cases, and every test of the other files.
    selection = f"(triton or not test_kernel_set) and not {SM90_COMPILE_TEST}"
    command = pytest_argv(*GPU_BACKEND_TESTS, *KERNEL_SET_TESTS, "-q", "-rs", "-k", selection)
    # On the CPU they run in Triton's interpreter, minutes long, and `make test` has just run them.
    return [*command, "--collect-only"] if check.rehearsal else command


# The other tests that use a GPU when there is one: opcheck of the compiled ops on CUDA, backend selection.
GPU_AWARE_TESTS = ["tests/test_compile.py", "tests/test_backends.py"]


def _plan_gpu_aware_tests(check: Check) -> list[str]:
    command = pytest_argv(*GPU_AWARE_TESTS, "-q", "-rs")
    return [*command, "--collect-only"] if check.rehearsal else command


def _plan_other_tests(check: Check) -> list[str]:
    # CPU-only tests, which CI runs on every change: here they check this machine's torch/triton/Python.
    ignored = [*KERNEL_SET_TESTS, *GPU_BACKEND_TESTS, *GPU_AWARE_TESTS, SM90_COMPILE_FILE]
    command = pytest_argv("tests", *(f"--ignore={t}" for t in ignored), "-q")
    return [*command, "--collect-only"] if check.rehearsal else command


def _conclude_collected_in_rehearsal(check: Check, result: StepResult, output: str) -> None:
    note_pytest_outcome(check, result, output)
    if check.rehearsal:
        _add_note(result, "collected only (make test runs them)")


# compute-sanitizer slows every kernel launch down many times over: the bf16 kernel tests (every shape of the GPU
# table: odd sizes for the scalar paths, 512 channels for the 16-byte vector paths; every layout and alignment).
SANITIZER_SELECTION = "cuda and bfloat16"
# Shared-memory races live in the reductions (statistics, backward sums).
RACECHECK_SELECTION = "cuda and bfloat16 and (batch_stats or backward_reduce)"


def _plan_sanitizer(tool: str, selection: str):
    def plan(check: Check) -> list[str] | str:
        tests = pytest_argv(*KERNEL_SET_TESTS, "-q", "-m", "not slow", "-k", selection)
        if check.rehearsal:
            return [*tests, "--collect-only"]  # that the selection still selects tests
        if not check.environment:
            return "the environment step did not report (see log.txt)"
        if not check.has_gpu:
            return "needs a GPU"
        sanitizer = check.environment.get("compute_sanitizer")
        if not sanitizer:
            return "compute-sanitizer not found on PATH or in the CUDA toolkit"
        return [sanitizer, "--tool", tool, "--error-exitcode", "1", *tests]

    return plan


def conclude_sanitizer(check: Check, result: StepResult, output: str) -> None:
    tool = result.name.split()[-1]  # memcheck or racecheck
    if check is not None and check.rehearsal:
        note_pytest_outcome(check, result, output)
        _add_note(result, f"collected only ({tool} needs a GPU)")
        return
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", output)
    outcome = pytest_outcome(output)
    if not errors:
        verdict = f"no {tool} summary (see log.txt)"
    elif int(errors[-1]) == 0:
        verdict = f"clean: 0 {tool} errors" + (" in the tests that ran" if result.status == "timed out" else "")
    else:
        verdict = f"{errors[-1]} {tool} errors (see log.txt)"
    result.note = "; ".join(part for part in (verdict, outcome, result.note) if part)


# The op and block benchmarks, and activation memory, at the full size in bf16 channels_last: the fused
# BN+add+ReLU op with the device copy it is judged against, the activation memory of ResNet-50 and its blocks, and
# every Bottleneck shape of ResNet-50; torch.compile of the model only (in the headline): compiling every block and
# op case would take minutes more.
BENCHMARK_FILES = ["benchmarks/test_ops.py", "benchmarks/test_memory.py", "benchmarks/test_blocks.py"]
BENCHMARK_ARGS = ["--dtype", "bfloat16", "--channels-last", "--models", "resnet50", "-k",
                  "not BasicBlock and not torch-compile"]


def _plan_benchmarks(check: Check) -> list[str] | str:
    if not check.environment:
        return "the environment step did not report (see log.txt)"
    if not (check.has_gpu or check.rehearsal):
        return "no CUDA device: the full size would take hours on a CPU (rehearse with --rehearsal)"
    size, device = ("smoke", "cpu") if check.rehearsal else ("full", "cuda")
    return pytest_argv(*BENCHMARK_FILES, "--size", size, "--device", device, *BENCHMARK_ARGS,
                       "--report-dir", str(check.out / BENCHMARKS_DIR_NAME), "-q")


def _conclude_benchmarks(check: Check, result: StepResult, output: str) -> None:
    note_pytest_outcome(check, result, output)
    if not (check.out / BENCHMARKS_DIR_NAME / JSON_NAME).exists():
        result.status = "failed"
        _add_note(result, "no report written")


STEPS = [
    Step("versions", 30, _plan_versions, conclude=_conclude_versions, reserved=True),
    Step("build", 150, _plan_build, conclude=_conclude_build, reserved=True),
    Step("environment", 30, _plan_environment, conclude=_conclude_environment, reserved=True),
    Step("GPU backend smoke", 60, _plan_smoke, conclude=_conclude_collected_in_rehearsal, reserved=True),
    Step("headline resnet50", 150, _plan_headline("resnet50", first=True), conclude=_conclude_headline("resnet50"),
         reserved=True),
    Step("headline resnet18", 60, _plan_headline("resnet18", first=False), conclude=_conclude_headline("resnet18"),
         reserved=True),
    Step("CUDA kernel tests (bf16, fp32)", 60, _plan_kernel_tests(REPRESENTATIVE_KERNEL_SELECTION),
         conclude=note_pytest_outcome),
    # The caching allocator hands out pieces of larger blocks, where memcheck cannot see an overrun: allocate each
    # tensor on its own.
    Step("compute-sanitizer memcheck", 60, _plan_sanitizer("memcheck", SANITIZER_SELECTION),
         env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, conclude=conclude_sanitizer),
    Step("compute-sanitizer racecheck", 40, _plan_sanitizer("racecheck", RACECHECK_SELECTION),
         conclude=conclude_sanitizer),
    Step("op and block benchmarks", 120, _plan_benchmarks, conclude=_conclude_benchmarks),
    Step("Triton and GPU-backend tests", 90, _plan_gpu_backend_tests, conclude=_conclude_collected_in_rehearsal),
    Step("CUDA kernel tests (fp64, fp16)", 40, _plan_kernel_tests(OTHER_KERNEL_SELECTION),
         conclude=note_pytest_outcome),
    Step("opcheck and backend tests", 40, _plan_gpu_aware_tests, conclude=_conclude_collected_in_rehearsal),
    Step("other tests", 240, _plan_other_tests, conclude=_conclude_collected_in_rehearsal),
]
