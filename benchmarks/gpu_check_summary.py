"""The GPU check's summary: summary.md, rewritten whenever a headline row comes in and after every step, so that a
run cut off at any point leaves every finished row in it; at the end, report.json (every row of the headline and
of the op and block benchmarks, with the steps, environment and targets) and the speedup chart.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import subprocess

from benchmarks.gpu_check_environment import describe_versions
from benchmarks.gpu_check_process import ROOT, Check, StepResult
from benchmarks.gpu_check_steps import BENCHMARKS_DIR_NAME, HEADLINE_ROWS_NAME, load_rows
from benchmarks.report import JSON_NAME, Report
from benchmarks.report_rows import format_number
from benchmarks.report_tables import Table
from benchmarks.report_targets import (TargetCheck, results_folder_name, results_readme_row, target_checks,
                                       targets_table)

SUMMARY_NAME = "summary.md"
EVERY_MEASUREMENT = "## Every measurement"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def commit() -> str:
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


def _report_of(rows: list[dict], check: Check) -> Report:
    """The report of `rows` (the headline's, and the op and block benchmarks' once they ran), its header from
    what the rows say they were measured on."""
    timed = [row for row in rows if row["suite"] != "memory"]
    first = rows[0] if rows else {}
    header = {key: first.get(key) for key in ("device", "size", "torch", "triton", "cuda", "fused_resnet")}
    if not rows:
        header.update(device=check.environment.get("device"), torch=check.environment.get("torch"),
                      cuda=check.environment.get("cuda"), triton=check.environment.get("triton"))
    header["date"] = _now()
    return Report(header, timed, [row for row in rows if row["suite"] == "memory"])


def headline_table(report: Report) -> Table:
    """One line per model, mode and provider: images/s, the ratio to torchvision in this run, the step's peak GPU
    memory, the measured step time and, beside it, the predicted time of its non-convolution traffic at the copy
    bandwidth measured in the run (benchmarks/traffic.py; counted for torchvision and the eager fused providers)."""
    traffic = {(row["case"], row["mode"], row["provider"]): row for row in report.traffic_rows}
    lines: list[list[str] | None] = []
    previous = None
    for row in report.rows:
        if row["suite"] != "models":
            continue
        if previous is not None and (row["case"], row["mode"]) != previous:
            lines.append(None)
        previous = (row["case"], row["mode"])
        counted = traffic.get((row["case"], row["mode"], row["provider"]), {})
        predicted = counted.get("predicted_other_s_per_image")
        share = counted.get("predicted_share")
        lines.append([
            row["case"], f"{row['images_per_call']}", row["mode"], row["provider"], format_number(row["images_per_s"]),
            f"{row['ratio']:.2f}x" if row.get("ratio") is not None else "-",
            f"{row['peak_memory_mib']:.0f}" if row.get("peak_memory_mib") is not None else "-",
            format_number(row["median_s"] * 1e3),
            format_number(predicted * row["images_per_call"] * 1e3) if predicted is not None else "-",
            f"{share:.0%}" if share is not None else "-"])
    return Table("Headline", ["model", "batch", "mode", "provider", "images/s", "vs torchvision", "peak MiB",
                              "step ms", "non-conv traffic ms (predicted)", "predicted share"], 4, lines)


class Summary:
    """Writes summary.md (and at the end report.json and the chart) for a check; `refresh` rewrites it when the
    headline's rows or the steps changed since the last write."""

    def __init__(self, rehearsal: bool):
        self.rehearsal = rehearsal
        self._written: tuple | None = None
        self.commit = commit()

    def refresh(self, check: Check) -> None:
        rows_path = check.out / HEADLINE_ROWS_NAME
        state = (rows_path.stat().st_size if rows_path.exists() else 0, len(check.results))
        if state != self._written:
            self._written = state
            self.write(check, final=False)

    def finish(self, check: Check) -> str:
        """Writes the final summary.md, report.json and chart; returns the summary without its tables of every
        measurement, which it points to: what the check prints last (a device run returns only the last 12,000
        characters of the output, and the headline must be among them)."""
        summary = self.write(check, final=True)
        head, every, _ = summary.partition(EVERY_MEASUREMENT)
        return head + (f"{EVERY_MEASUREMENT}\n\nin {check.out / SUMMARY_NAME}\n" if every else "")

    def write(self, check: Check, final: bool) -> str:
        rows = load_rows(check.out / HEADLINE_ROWS_NAME)
        benchmarks_json = check.out / BENCHMARKS_DIR_NAME / JSON_NAME
        if final and benchmarks_json.exists():
            data = json.loads(benchmarks_json.read_text())
            rows += data["rows"] + data.get("memory", [])
        report = _report_of(rows, check)
        checks = target_checks(report) if final else []
        if final:
            report.extra["gpu_check"] = {
                "rehearsal": check.rehearsal, "deadline_s": check.deadline_s, "seconds": check.elapsed(),
                "commit": self.commit, "versions": check.versions, "environment": check.environment,
                "steps": [dataclasses.asdict(r) for r in check.results],
                "targets": [dataclasses.asdict(c) for c in checks]}
            report.write(check.out)  # report.json and the chart
        summary = "\n".join(self._lines(check, report, checks, final)) + "\n"
        # Written whole and renamed: a reader (or a kill) never finds half a file.
        partial = check.out / f".{SUMMARY_NAME}.partial"
        partial.write_text(summary)
        partial.replace(check.out / SUMMARY_NAME)
        return summary

    def _lines(self, check: Check, report: Report, checks: list[TargetCheck], final: bool) -> list[str]:
        device = check.environment.get("device") or check.versions.get("device") or report.header.get("device")
        title = f"rehearsal on the CPU ({device})" if check.rehearsal else str(device)
        state = (f"finished in {check.elapsed():.0f} s of a {check.deadline_s:.0f} s deadline" if final
                 else f"in progress: +{check.elapsed():.0f} s of a {check.deadline_s:.0f} s deadline, "
                      f"{len(check.results)} steps done")
        run = ("the steps rehearsed on the CPU at the smoke size (numbers are not results)" if check.rehearsal
               else "the full size")
        lines = [f"# fused_resnet GPU check: {title}, {_now()[:10]}", "", f"- run: {run}; {state}",
                 f"- software: {describe_versions(check.versions) if check.versions else 'not reported yet'}; "
                 f"fused_resnet commit {self.commit}"]
        if check.versions.get("nvidia_smi"):
            lines.append(f"- nvidia-smi: {check.versions['nvidia_smi']}")
        counts = {status: sum(r.status == status for r in check.results)
                  for status in ("ok", "failed", "timed out", "skipped")}
        lines.append("- steps: " + (", ".join(f"{n} {status}" for status, n in counts.items() if n) or "none yet"))
        if final:
            verdicts = {v: sum(c.verdict == v for c in checks)
                        for v in ("met", "NOT MET", "not judged", "not measured")}
            lines.append("- targets: " + ", ".join(f"{n} {verdict}" for verdict, n in verdicts.items() if n))
            if (report.rows or report.memory_rows) and not check.rehearsal:
                lines += [f"- to keep this run: copy this folder to benchmarks/results/{results_folder_name(report)}/ "
                          "and add its line to benchmarks/results/README.md:", "",
                          "  " + results_readme_row(report, checks)]
        lines += ["", "## Headline: bf16 channels_last, train step and eval step", ""]
        if any(row["suite"] == "models" for row in report.rows):
            lines += headline_table(report).markdown_lines(with_title=False)
            bandwidth = next((row for row in report.rows if row["suite"] == "bandwidth"), None)
            if bandwidth is not None:
                lines += ["", f"Predicted: the step's non-convolution bytes (benchmarks/traffic.py) at the copy "
                              f"bandwidth measured in this run, {format_number(bandwidth['gb_per_s'])} GB/s."]
        else:
            lines.append("(no headline row yet)")
        lines += ["", "## Steps", ""] + _steps_table(check.results).markdown_lines(with_title=False)
        if final:
            lines += ["", "## Targets", ""] + targets_table(checks).markdown_lines(with_title=False)
            if report.rows or report.memory_rows:
                lines += ["", EVERY_MEASUREMENT, "", report.describe(), "", *report.markdown_lines()]
        return lines


def _steps_table(results: list[StepResult]) -> Table:
    return Table("Steps", ["step", "status", "seconds", "allowed", "note"], 5,
                 [[r.name, r.status, f"{r.seconds:.0f}", f"{r.allowed_s:.0f}" if r.allowed_s is not None else "-",
                   r.note] for r in results])
