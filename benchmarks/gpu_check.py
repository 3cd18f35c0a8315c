"""The one-shot GPU check: versions, the build for this card, a correctness smoke of each GPU backend, then the
headline (ResNet-50 and ResNet-18 in bf16 channels_last at batch 256, train and eval steps, torchvision eager and
compiled against the fused backends), then in the time left the kernel suites, compute-sanitizer, the op and block
benchmarks and the other tests; all into one folder, by a deadline (default 540 s).

    make gpu-check OUT=<folder>              # on a CUDA machine: the python on PATH, no virtual environment, no
                                             # downloads (PYTHON=python3.12 to choose another)
    make gpu-check-rehearsal                 # the same steps on the CPU at the smoke size (part of `make test`)
    python -m benchmarks.gpu_check --out <folder> [--rehearsal] [--deadline SECONDS]
                                   [--simulate-build-seconds SECONDS] [--last-step NAME]

Every step runs in a subprocess with a time allowance (benchmarks/gpu_check_process.py says how allowances are
given); a step that fails or times out is recorded and the next one runs. The exit status is 0 when every step
that ran passed, else 1; stopped by SIGTERM (`timeout`), the check kills its running step, writes the summary of
the steps that ended and exits with 143. The steps are in benchmarks/gpu_check_steps.py; the rehearsal runs the same steps,
skipping or only collecting what needs a GPU and saying so.

The folder ends up with the layout of a benchmarks/results/<card>-<date>/ folder: summary.md (rewritten as each
headline row comes in, and after each step), headline.jsonl (the headline's rows, one JSON line each as measured),
report.json (every row, the steps, environment and targets) and speedup.png at the end, benchmarks/ (the op and
block benchmarks' own report), and log.txt (every step's full output): 7 files.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path

from benchmarks.gpu_check_process import LOG_NAME, Check
from benchmarks.gpu_check_steps import BENCHMARKS_DIR_NAME, HEADLINE_ROWS_NAME, STEPS
from benchmarks.gpu_check_summary import SUMMARY_NAME, Summary
from benchmarks.report import CHART_NAME, JSON_NAME

# The device machine takes one command of at most 600 s: the check ends 60 s before that, its files in place.
DEFAULT_DEADLINE_S = 540


def clear_previous_run(out: Path) -> None:
    """A stale file must not pass for this run's."""
    for name in (JSON_NAME, CHART_NAME, SUMMARY_NAME, LOG_NAME, HEADLINE_ROWS_NAME):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / BENCHMARKS_DIR_NAME, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True,
                        help="the folder to write summary.md, headline.jsonl, report.json, speedup.png, log.txt")
    parser.add_argument("--rehearsal", action="store_true", help="the same steps on the CPU at the smoke size")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S,
                        help=f"seconds the whole check may take (default {DEFAULT_DEADLINE_S})")
    parser.add_argument("--simulate-build-seconds", type=float, default=0.0,
                        help="count the build as this many seconds longer (the check's clock is advanced, nothing "
                             "sleeps): how the steps after a slow build fare")
    names = [step.name for step in STEPS]
    parser.add_argument("--last-step", choices=names, default=names[-1],
                        help="stop after this step (default: run every step)")
    args = parser.parse_args(argv)
    if args.deadline <= 0:
        parser.error(f"--deadline: expected a positive number of seconds, got {args.deadline}")
    if args.simulate_build_seconds < 0:
        parser.error(f"--simulate-build-seconds: expected seconds >= 0, got {args.simulate_build_seconds}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    clear_previous_run(out)
    summary = Summary(args.rehearsal)
    check = Check(out, args.rehearsal, args.deadline, simulated_s={"build": args.simulate_build_seconds},
                  on_poll=summary.refresh, finish=summary.finish)
    # `timeout` stops a command with SIGTERM: end as on Ctrl-C, the running step killed and the summary written.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return check.run(STEPS[:names.index(args.last_step) + 1])


if __name__ == "__main__":
    sys.exit(main())
