"""The GPU check's process control: steps, their time allowances, running each in a subprocess under a deadline.

A step is *reserved* (the head of the check: versions, build, environment, smoke, headline) or *optional* (the
rest). The steps before a reserved step leave it its budget: each may use its own budget plus whatever the
earlier steps left unused, less the budgets of the reserved steps after it. An optional step runs only if its
budget is still left when its turn comes, and then may use the time left less what the optional steps after it
need; otherwise it is skipped ("not enough time left"), so that every step that runs has its budget. A step that
runs out of time is interrupted (SIGINT: pytest still prints its summary and the benchmarks still write their
report) and, if still running after INTERRUPT_GRACE_S, killed: so every budget must exceed that grace.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INTERRUPT_GRACE_S = 15  # after SIGINT, for pytest to print its summary and the benchmarks to write their report
SUMMARY_RESERVE_S = 10  # kept back from the steps for the summary
POLL_S = 1.0  # how often a running step's progress (the headline's rows) is looked at
LOG_NAME = "log.txt"


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
    reserved: bool = False  # the steps before it leave it its budget (else: it runs only if its budget is left)

    def __post_init__(self) -> None:
        if self.budget_s <= INTERRUPT_GRACE_S:
            raise ValueError(f"step {self.name!r}: budget_s must exceed the {INTERRUPT_GRACE_S} s grace after an "
                             f"interrupt, got {self.budget_s}: it would be killed as soon as it is interrupted")


def run_command(argv: list[str], log, timeout_s: float, env: dict[str, str],
                on_poll: Callable[[], None] | None = None) -> tuple[str, float, str]:
    """Runs `argv` in the repository root, its output appended to the open binary file `log`; calls `on_poll`
    every POLL_S while it runs; interrupts it after `timeout_s` (SIGINT to its process group, SIGKILL after
    INTERRUPT_GRACE_S). Returns (status, seconds, note)."""
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
            code = _wait(process, started + max(timeout_s, 0), on_poll)
        except BaseException:  # the check itself is ending (SIGTERM, Ctrl-C): its step must not outlive it
            os.killpg(process.pid, signal.SIGKILL)
            raise
        if code is None:
            os.killpg(process.pid, signal.SIGINT)
            code = _wait(process, time.monotonic() + INTERRUPT_GRACE_S, on_poll)
            note = f"interrupted after {timeout_s:.0f} s"
            if code is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                note += f", killed {INTERRUPT_GRACE_S} s later"
            if on_poll is not None:
                on_poll()
            return "timed out", time.monotonic() - started, note
    if on_poll is not None:
        on_poll()
    seconds = time.monotonic() - started
    return ("ok", seconds, "") if code == 0 else ("failed", seconds, f"exit status {code}")


def _wait(process: subprocess.Popen, until: float, on_poll: Callable[[], None] | None) -> int | None:
    """The exit status of `process` once it ends, or None if it is still running at the monotonic time `until`."""
    while True:
        left = until - time.monotonic()
        if left <= 0:
            return process.poll()
        try:
            return process.wait(timeout=min(POLL_S, left))
        except subprocess.TimeoutExpired:
            if on_poll is not None:
                on_poll()


def read_tail(path: Path, start: int, limit: int = 1 << 16) -> str:
    """The last `limit` bytes written to `path` from offset `start` on."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        f.seek(max(start, end - limit))
        return f.read().decode(errors="replace")


class Check:
    """One run of the steps into `out`. `simulated_s` ({step name: seconds}) makes a step count as that much
    longer (the rehearsal of a slow build): the check's clock is advanced, so later steps get less time, and
    nothing sleeps. `on_poll(check)` is called while a step runs (every POLL_S) and after it ends; `finish(check)`
    writes the summary at the end and returns it."""

    def __init__(self, out: Path, rehearsal: bool, deadline_s: float, simulated_s: dict[str, float] | None = None,
                 on_poll: Callable[[Check], None] | None = None, finish: Callable[[Check], str] | None = None):
        self.out, self.rehearsal, self.deadline_s = out, rehearsal, deadline_s
        self.simulated_s = dict(simulated_s or {})
        self.on_poll, self.finish = on_poll, finish
        self.environment: dict = {}  # what the environment step reported
        self.versions: dict = {}  # what the versions step reported
        self.results: list[StepResult] = []
        self.started = time.monotonic()
        self._clock_offset_s = 0.0

    @property
    def has_gpu(self) -> bool:
        return bool(self.environment.get("cuda_available"))

    def elapsed(self) -> float:
        return time.monotonic() - self.started + self._clock_offset_s

    def say(self, message: str) -> None:
        minutes, seconds = divmod(int(self.elapsed()), 60)
        print(f"[+{minutes}:{seconds:02d}] {message}", flush=True)

    def allowance(self, steps: list[Step], index: int) -> float | None:
        """The seconds step `index` of `steps` may take if it starts now, or None if it must be skipped for lack
        of time (an optional step whose budget is no longer left)."""
        step, later = steps[index], steps[index + 1:]
        left = self.deadline_s - self.elapsed() - SUMMARY_RESERVE_S
        if step.reserved:
            return left - sum(s.budget_s for s in later if s.reserved)
        if left < step.budget_s:
            return None
        return max(step.budget_s, left - sum(s.budget_s for s in later if not s.reserved))

    def run(self, steps: list[Step]) -> int:
        """Runs `steps`; returns the exit status: 0 when every step that ran passed, else 1."""
        self.out.mkdir(parents=True, exist_ok=True)
        mode = "rehearsal on the CPU at the smoke size" if self.rehearsal else "GPU check at the full size"
        self.say(f"fused_resnet {mode}: {len(steps)} steps, deadline {self.deadline_s:.0f} s, into {self.out}")
        # Appending: every write lands at the end, the runner's and the steps' (which share the file) alike.
        with open(self.out / LOG_NAME, "ab") as log:
            try:
                self._run_steps(steps, log)
            finally:  # also when the check is stopped (SIGTERM): the summary of the steps that ended
                if self.finish is not None:
                    summary = self.finish(self)
                    self.say(f"summary written to {self.out}\n")
                    print(summary, flush=True)
        return 1 if any(result.failed for result in self.results) else 0

    def _run_steps(self, steps: list[Step], log) -> None:
        for index, step in enumerate(steps):
            position = f"{index + 1}/{len(steps)}"
            allowed = self.allowance(steps, index)
            if allowed is None:
                left = self.deadline_s - self.elapsed() - SUMMARY_RESERVE_S
                result = self._skip(step, position, f"not enough time left: {max(left, 0):.0f} s before the "
                                                    f"deadline, its budget is {step.budget_s:.0f} s", log)
            else:
                result = self._run_step(step, position, allowed, log)
            self.results.append(result)
            if self.on_poll is not None:
                self.on_poll(self)

    def _skip(self, step: Step, position: str, why: str, log) -> StepResult:
        self.say(f"{position} {step.name}: skipped ({why})")
        log.write(f"\n==== {step.name}: skipped ({why})\n".encode())
        log.flush()
        return StepResult(step.name, "skipped", 0.0, None, why)

    def _run_step(self, step: Step, position: str, allowed: float, log) -> StepResult:
        planned = step.plan(self)
        if isinstance(planned, str):
            return self._skip(step, position, planned, log)
        command = shlex.join(planned)  # as it would be typed, to rerun it by hand
        self.say(f"{position} {step.name}: started, allowed {allowed:.0f} s: {command}")
        log.write(f"\n==== {step.name} (at +{self.elapsed():.0f} s, allowed {allowed:.0f} s)\n$ {command}\n".encode())
        log.flush()
        start = os.fstat(log.fileno()).st_size
        on_poll = (lambda: self.on_poll(self)) if self.on_poll is not None else None
        status, seconds, note = run_command(planned, log, allowed - INTERRUPT_GRACE_S, step.env, on_poll)
        simulated = self.simulated_s.get(step.name, 0.0)
        if simulated:
            self._clock_offset_s += simulated
            seconds += simulated
            note = "; ".join(filter(None, [f"{simulated:.0f} s of it simulated", note]))
            if status == "ok" and seconds > allowed - INTERRUPT_GRACE_S:  # it would have been interrupted
                status = "timed out"
        result = StepResult(step.name, status, seconds, allowed, note, command)
        if step.conclude is not None:
            step.conclude(self, result, read_tail(self.out / LOG_NAME, start))
        log.write(f"==== {step.name}: {result.status} in {seconds:.1f} s"
                  f"{f' ({result.note})' if result.note else ''}\n".encode())
        log.flush()
        self.say(f"{position} {step.name}: {result.status} in {seconds:.0f} s"
                 + (f" ({result.note})" if result.note else ""))
        return result
