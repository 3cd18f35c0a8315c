"""The GPU check (benchmarks/gpu_check*.py): its budgets hold, it keeps going past failing and overrunning steps,
its exit status, the headline's order and rows, the summary rewritten as rows come in, and the rehearsal after a
slow build writing the headline rows; the build's extension selection; the Triton version guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ is a folder of the repository, not part of the installed package.
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check_process as process  # noqa: E402
from benchmarks import gpu_check_steps as steps  # noqa: E402
from benchmarks.gpu_check import DEFAULT_DEADLINE_S  # noqa: E402
from benchmarks.gpu_check_summary import Summary  # noqa: E402
from benchmarks.row_stream import headline_key  # noqa: E402


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


# ---------------------------------------------------------------------------------------------------------------
# Budgets


def test_every_step_has_more_than_the_kill_grace_and_the_reserved_steps_fit_the_deadline():
    """A step whose budget is no larger than the grace after SIGINT is killed as soon as it is interrupted (the old
    table's 15 s environment step and 10 s "other tests" step); the reserved head must fit the default deadline
    with the summary's reserve, or a slow build would eat the headline's time."""
    for step in steps.STEPS:
        assert step.budget_s > process.INTERRUPT_GRACE_S, step.name
    reserved = [step for step in steps.STEPS if step.reserved]
    assert [step.name for step in reserved] == ["versions", "build", "environment", "GPU backend smoke",
                                                "headline resnet50", "headline resnet18"]
    assert steps.STEPS[:len(reserved)] == reserved  # the head first, the optional rest after it
    assert sum(step.budget_s for step in reserved) + process.SUMMARY_RESERVE_S <= DEFAULT_DEADLINE_S
    with pytest.raises(ValueError, match=r"step 'x': budget_s must exceed the 15 s grace"):
        process.Step("x", process.INTERRUPT_GRACE_S, lambda check: "never")


def test_allowances_hold_back_the_reserved_budgets_and_skip_an_optional_step_without_its_budget(tmp_path):
    plan = lambda check: "never"  # noqa: E731
    table = [process.Step("head", 20, plan, reserved=True), process.Step("headline", 100, plan, reserved=True),
             process.Step("optional", 50, plan), process.Step("last", 30, plan)]
    check = process.Check(tmp_path, rehearsal=True, deadline_s=300)
    reserve = process.SUMMARY_RESERVE_S
    # The head step may use everything but the headline's budget; the headline everything left.
    assert check.allowance(table, 0) == pytest.approx(300 - reserve - 100, abs=1)
    assert check.allowance(table, 1) == pytest.approx(300 - reserve, abs=1)
    # An optional step leaves the later optional ones their budgets when there is room...
    assert check.allowance(table, 2) == pytest.approx(300 - reserve - 30, abs=1)
    # ...runs on its own budget when there is only that...
    check._clock_offset_s = 300 - reserve - 60
    assert check.allowance(table, 2) == pytest.approx(50, abs=1)
    # ...and is skipped without it.
    check._clock_offset_s = 300 - reserve - 40
    assert check.allowance(table, 2) is None
    assert check.allowance(table, 3) == pytest.approx(40, abs=1)


# ---------------------------------------------------------------------------------------------------------------
# Running steps


def test_run_command_reports_failure_and_interrupts_an_overrunning_command(tmp_path, monkeypatch):
    monkeypatch.setattr(process, "INTERRUPT_GRACE_S", 5)
    polls = []
    with open(tmp_path / "log", "ab") as log:
        assert process.run_command(_python("print('fine')"), log, 30, {})[0] == "ok"
        status, _, note = process.run_command(_python("import sys; sys.exit(3)"), log, 30, {})
        assert (status, note) == ("failed", "exit status 3")
        status, seconds, note = process.run_command(_python("import time; time.sleep(60)"), log, 1.5, {},
                                                    on_poll=lambda: polls.append(1))
        assert status == "timed out" and seconds < 10 and note == "interrupted after 2 s"
    assert "fine" in (tmp_path / "log").read_text()
    assert len(polls) >= 2  # while it ran, and once it ended


def test_check_keeps_going_past_failed_overrunning_and_skipped_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(process, "INTERRUPT_GRACE_S", 1)
    table = [
        process.Step("fails", 2, lambda check: _python("import sys; print('broken'); sys.exit(2)")),
        process.Step("overruns", 3, lambda check: _python("import time; time.sleep(60)")),
        process.Step("skipped", 10, lambda check: "needs a GPU"),
        process.Step("passes", 10, lambda check: _python("print('3 passed in 0.01s')"),
                     conclude=steps.note_pytest_outcome),
    ]
    deadline = 2 + 3 + 10 + 10 + process.SUMMARY_RESERVE_S
    summary = Summary(rehearsal=True)
    check = process.Check(tmp_path, rehearsal=True, deadline_s=deadline, on_poll=summary.refresh,
                          finish=summary.finish)
    assert check.run(table) == 1
    results = {r.name: r for r in check.results}
    assert [r.status for r in check.results] == ["failed", "timed out", "skipped", "ok"]
    assert results["passes"].note == "3 passed in 0.01s"
    # Each optional step may use the time left less the later ones' budgets: fails its own 2 s, overruns its 3 s
    # and the 2 s fails left unused.
    assert results["fails"].allowed_s == pytest.approx(2, abs=0.5)
    assert results["overruns"].allowed_s == pytest.approx(3 + 2, abs=0.5)
    assert check.elapsed() < deadline
    text = (tmp_path / "summary.md").read_text()
    assert "| overruns | timed out |" in text and "| skipped | skipped |" in text
    assert text in capsys.readouterr().out  # printed last
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [s["status"] for s in saved["gpu_check"]["steps"]] == ["failed", "timed out", "skipped", "ok"]
    assert "broken" in (tmp_path / "log.txt").read_text()


def test_the_exit_status_is_0_when_every_step_that_ran_passed(tmp_path):
    table = [process.Step("passes", 20, lambda check: _python("pass"), reserved=True),
             process.Step("skipped", 20, lambda check: "needs a GPU"),
             process.Step("no time for it", 1000, lambda check: _python("raise SystemExit(1)"))]
    check = process.Check(tmp_path, rehearsal=True, deadline_s=100)
    assert check.run(table) == 0
    assert [r.status for r in check.results] == ["ok", "skipped", "skipped"]
    assert check.results[2].note.startswith("not enough time left")


def test_a_simulated_slow_build_advances_the_clock_and_times_out_past_its_allowance(tmp_path):
    table = [process.Step("build", 40, lambda check: _python("pass"), reserved=True),
             process.Step("after", 20, lambda check: _python("pass"), reserved=True)]
    check = process.Check(tmp_path, rehearsal=True, deadline_s=100, simulated_s={"build": 30})
    assert check.run(table) == 0
    build, after = check.results
    assert build.seconds >= 30 and "30 s of it simulated" in build.note
    assert after.allowed_s == pytest.approx(100 - process.SUMMARY_RESERVE_S - build.seconds, abs=1)
    slow = process.Check(tmp_path, rehearsal=True, deadline_s=100, simulated_s={"build": 90})
    assert slow.run(table) == 1 and slow.results[0].status == "timed out"


def test_pytest_outcome_is_the_closing_line_and_an_empty_selection_fails():
    output = "....s\n[100%]\n==== 12 passed, 3 skipped in 4.20s ====\n"
    assert steps.pytest_outcome(output) == "12 passed, 3 skipped in 4.20s"
    assert steps.pytest_outcome("2619 tests collected in 2.50s\n") == "2619 tests collected in 2.50s"
    result = process.StepResult("kernels", "ok", 1.0, 60.0, "")
    steps.note_pytest_outcome(None, result, "==== no tests ran in 0.50s ====\n")
    assert result.status == "failed" and "the selection matched no test" in result.note


@pytest.mark.parametrize("status, output, note", [
    ("ok", "44 passed in 30.0s\n========= ERROR SUMMARY: 0 errors\n", "clean: 0 memcheck errors; 44 passed in 30.0s"),
    ("failed", "========= Invalid __global__ read of size 2\n========= ERROR SUMMARY: 3 errors\n",
     "3 memcheck errors (see log.txt); exit status 1"),
    ("timed out", "10 passed in 40.0s\n========= ERROR SUMMARY: 0 errors\n",
     "clean: 0 memcheck errors in the tests that ran; 10 passed in 40.0s; interrupted after 30 s"),
])
def test_sanitizer_verdict(status, output, note):
    result = process.StepResult("compute-sanitizer memcheck", status, 1.0, 45.0,
                                {"ok": "", "failed": "exit status 1", "timed out": "interrupted after 30 s"}[status])
    steps.conclude_sanitizer(None, result, output)
    assert result.note == note


# ---------------------------------------------------------------------------------------------------------------
# The headline


class _Item:
    def __init__(self, name: str, **params):
        self.originalname, self.name = name, name
        self.callspec = type("CallSpec", (), {"params": params})()


def test_the_headline_runs_model_by_model_train_first_torchvision_first_compiled_fused_last():
    from benchmarks.harness import known_providers

    known = known_providers()
    items = [_Item("test_model", model_name=m, mode=mode, provider=known[p])
             for m in ("resnet18", "resnet50") for mode in ("eval", "train")
             for p in ("torch-compile-fused-cuda", "fused-cuda", "torchvision", "torch-compile")]
    items += [_Item("test_traffic", model_name="resnet50", mode="train", counted_provider=known["fused-cuda"]),
              _Item("test_copy_bandwidth")]
    items.sort(key=lambda item: headline_key(item, ["resnet50", "resnet18"]))
    order = [(item.name, item.callspec.params.get("model_name"), item.callspec.params.get("mode"),
              getattr(item.callspec.params.get("provider"), "name", None)) for item in items]
    assert order[:6] == [("test_copy_bandwidth", None, None, None),
                         ("test_traffic", "resnet50", "train", None),
                         ("test_model", "resnet50", "train", "torchvision"),
                         ("test_model", "resnet50", "train", "fused-cuda"),
                         ("test_model", "resnet50", "train", "torch-compile"),
                         ("test_model", "resnet50", "train", "torch-compile-fused-cuda")]
    assert [(m, mode) for _, m, mode, _ in order[2::4]] == [("resnet50", "train"), ("resnet50", "eval"),
                                                             ("resnet18", "train"), ("resnet18", "eval")]


def _model_row(provider, images_per_s, **extra):
    return {"suite": "models", "case": "resnet50 @224", "mode": "train", "provider": provider,
            "is_reference": provider == "torchvision", "images_per_call": 256, "dtype": "bfloat16",
            "memory_format": "channels_last", "images_per_s": images_per_s, "median_s": 256 / images_per_s,
            "gb_per_s": None, "peak_memory_mib": 30000.0, "device": "NVIDIA H100 80GB HBM3", "size": "full", **extra}


def test_the_summary_is_rewritten_as_each_headline_row_comes_in(tmp_path):
    """A run cut off after any row leaves that row in summary.md, with its ratio to torchvision and its peak
    memory; a cut-off last line (a killed writer) is left out."""
    check = process.Check(tmp_path, rehearsal=False, deadline_s=540)
    summary = Summary(rehearsal=False)
    rows_path = tmp_path / steps.HEADLINE_ROWS_NAME
    summary.refresh(check)
    assert "(no headline row yet)" in (tmp_path / "summary.md").read_text()
    rows_path.write_text(json.dumps(_model_row("torchvision", 2000.0)) + "\n")
    summary.refresh(check)
    text = (tmp_path / "summary.md").read_text()
    assert "| resnet50 @224 | 256 | train | torchvision | 2000 | 1.00x | 30000 | 128 |" in text
    with open(rows_path, "a") as f:
        f.write(json.dumps(_model_row("fused-cuda", 3000.0)) + "\n" + '{"suite": "mod')
    summary.refresh(check)
    assert "| resnet50 @224 | 256 | train | fused-cuda | 3000 | 1.50x | 30000 | 85.3 |" in (
        tmp_path / "summary.md").read_text()


def test_the_rehearsal_after_a_slow_build_writes_the_headline_rows(tmp_path):
    """`--simulate-build-seconds 150`: the build counts as 150 s longer, and the head of the check (versions,
    build, environment, smoke, headline) still passes, with a train and an eval row of each headline model and
    provider in headline.jsonl and summary.md. The steps after the headline run in `make test`'s rehearsal."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--rehearsal", "--simulate-build-seconds",
                          "150", "--last-step", "headline resnet18", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [json.loads(line) for line in (tmp_path / steps.HEADLINE_ROWS_NAME).read_text().splitlines()]
    timed = {(row["model"], row["mode"], row["provider"]) for row in rows if row["suite"] == "models"}
    for model in ("resnet50", "resnet18"):
        for mode in ("train", "eval"):
            assert (model, mode, "torchvision") in timed and (model, mode, "fused-cpu") in timed, timed
    assert {row["suite"] for row in rows} == {"bandwidth", "traffic", "models"}
    text = (tmp_path / "summary.md").read_text()
    assert "| resnet50 @64 | 2 | train | fused-cpu |" in text
    assert "150 s of it simulated" in text
    assert "| headline resnet50 | ok |" in text and "| headline resnet18 | ok |" in text
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [s["name"] for s in saved["gpu_check"]["steps"]][-1] == "headline resnet18"
    assert run.stdout.splitlines()[1].startswith("[+0:00] 1/6 versions: started")


def test_a_check_stopped_by_sigterm_kills_its_step_and_writes_the_summary(tmp_path):
    """As `timeout` stops it: the step running then is killed with its process group, the summary of the steps
    that ended is written, and the exit status says it was stopped."""
    marker = f"gpu-check-test-{os.getpid()}"  # in the environment of the check and every step it starts
    check = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check", "--rehearsal", "--out", str(tmp_path)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "GPU_CHECK_TEST_MARKER": marker})
    for line in check.stdout:
        if "3/14 environment: started" in line:
            break
    check.send_signal(signal.SIGTERM)
    output = check.communicate(timeout=60)[0]
    assert check.returncode == 128 + signal.SIGTERM, output
    text = (tmp_path / "summary.md").read_text()
    assert "| versions | ok |" in text and "| build | ok |" in text, text
    # Killed processes can take a moment to finish exiting (a torch process unmapping its memory, longer on a
    # loaded machine: one CI run found one still there right after the check returned); none may outlive that.
    deadline = time.monotonic() + 20
    while _processes_with(f"GPU_CHECK_TEST_MARKER={marker}") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_with(f"GPU_CHECK_TEST_MARKER={marker}") == []


def _processes_with(variable: str) -> list[int]:
    """The ids of the running processes whose environment holds `variable` (NAME=value)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if variable.encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # ended meanwhile, or not ours to read
            continue
    return found


# ---------------------------------------------------------------------------------------------------------------
# The build and the versions


def test_setup_builds_only_the_extensions_named_and_refuses_an_unknown_one():
    env = {**os.environ, "FUSED_RESNET_BUILD_CUDA": "0"}
    chosen = subprocess.run([sys.executable, "setup.py", "build_ext", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env={**env, "FUSED_RESNET_EXTENSIONS": "fused_resnet._C"})
    assert chosen.returncode == 0 and "building ['fused_resnet._C'] only" in chosen.stderr, chosen.stderr
    unknown = subprocess.run([sys.executable, "setup.py", "build_ext", "--help"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120, env={**env, "FUSED_RESNET_EXTENSIONS": "fused_resnet._D"})
    assert unknown.returncode != 0 and "FUSED_RESNET_EXTENSIONS names ['fused_resnet._D']" in unknown.stderr


def test_the_declared_minimums_are_read_from_pyproject():
    from benchmarks.gpu_check_environment import declared_minimums, version_tuple

    minimums = declared_minimums()
    assert minimums["torch"] == "2.7" and minimums["triton"] == "3.6"
    assert version_tuple("2.11.0+cu130") == (2, 11, 0) and version_tuple("2.11.0+cu130") > version_tuple("2.7")


@pytest.mark.parametrize("version, module, reason", [
    ("3.1.0", "", "triton 3.1.0 is older than 3.6, the oldest the triton backend is checked against"),
    ("3.6.0", "raise ImportError('libtriton: undefined symbol')",
     "the triton backend did not load with this triton: ImportError('libtriton: undefined symbol')"),
])
def test_import_fused_resnet_never_fails_because_of_triton(tmp_path, version, module, reason):
    """A Triton too old, or one that breaks on import, turns the triton backend off with the reason; the package
    and its other backends import."""
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text(module)
    (tmp_path / f"triton-{version}.dist-info").mkdir()
    (tmp_path / f"triton-{version}.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: triton\nVersion: {version}\n")
    run = subprocess.run([sys.executable, "-c", "import fused_resnet, json; print(json.dumps("
                          "fused_resnet.backend_status()))"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
                                           "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr
    status = json.loads(run.stdout.splitlines()[-1])
    assert status["triton"] == reason and status["torch"] == "available"
