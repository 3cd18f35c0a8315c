"""The benchmark report's rows: what identifies a measurement, and the ratios, shares and predicted times computed
from the rows of one run (benchmarks/report.py describes the rows)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Protocol


class RunRows(Protocol):
    """What the tables, the chart and the targets read of a run's report (benchmarks/report.py's Report): its
    header and rows, typed here so that those modules need not import the report that imports them."""

    header: dict
    rows: list[dict]
    memory_rows: list[dict]
    traffic_rows: list[dict]

    def describe(self) -> str: ...


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), or its architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def case_key(row: dict) -> tuple:
    """What identifies one measurement across providers: the providers of a case share it."""
    return row["suite"], row["case"], row["mode"], row["dtype"], row["memory_format"]


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each timed row with `ratio` (its images/s over the reference provider's for the same case, in this run; its
    `paired_ratio` where it timed the reference call by call, measure.Measure's reference_step) and, for the op
    rows, `copy_fraction` (its GB/s over the device copy's of the same dtype and memory format)."""
    reference = {case_key(row): row["images_per_s"] for row in rows if row["is_reference"]}
    copy = {(row["dtype"], row["memory_format"]): row["gb_per_s"] for row in rows if row["suite"] == "copy"}
    out = []
    for row in rows:
        ratio = row["images_per_s"] / reference[case_key(row)] if case_key(row) in reference else None
        if row.get("paired_ratio") is not None:
            ratio = row["paired_ratio"]
        copy_gb_per_s = copy.get((row["dtype"], row["memory_format"]))
        fraction = (row["gb_per_s"] / copy_gb_per_s
                    if row["suite"] == "ops" and row.get("gb_per_s") is not None and copy_gb_per_s else None)
        out.append({**row, "ratio": ratio, "copy_fraction": fraction})
    return out


def with_memory_ratios(rows: list[dict]) -> list[dict]:
    """Each memory row with `ratio`: its bytes saved per image over the reference provider's (< 1 saves memory)."""
    reference = {case_key(row): row["saved_bytes_per_image"] for row in rows if row["is_reference"]}
    return [{**row, "ratio": row["saved_bytes_per_image"] / reference[case_key(row)]
             if reference.get(case_key(row)) else None} for row in rows]


def copy_gb_per_s(rows: list[dict]) -> float | None:
    """The device's copy bandwidth measured in this run on a large copy (suite ``bandwidth``), or None."""
    return next((row["gb_per_s"] for row in rows if row["suite"] == "bandwidth" and row.get("gb_per_s")), None)


def with_traffic_times(traffic: list[dict], rows: list[dict]) -> list[dict]:
    """Each traffic row with `ratio` (its non-convolution bytes over the reference provider's for the same case),
    `predicted_other_s_per_image` (those bytes at the copy bandwidth of `rows`), `measured_s_per_image` (the timed
    model row of the same case and provider, per image) and `predicted_share` (the first over the second)."""
    reference = {case_key(row): row["other_bytes_per_image"] for row in traffic if row["is_reference"]}
    measured = {(*case_key(row)[1:], row["provider"]): row["median_s"] / row["images_per_call"]
                for row in rows if row["suite"] == "models"}
    gb_per_s = copy_gb_per_s(rows)
    out = []
    for row in traffic:
        base = reference.get(case_key(row))
        predicted = row["other_bytes_per_image"] / (gb_per_s * 1e9) if gb_per_s else None
        step = measured.get((*case_key(row)[1:], row["provider"]))
        out.append({**row, "ratio": row["other_bytes_per_image"] / base if base else None,
                    "predicted_other_s_per_image": predicted, "measured_s_per_image": step,
                    "predicted_share": predicted / step if predicted is not None and step else None})
    return out


def grouped(rows: list[dict]) -> list[dict]:
    """`rows` with the providers of one measurement next to each other, the reference first (cases in the order
    they ran)."""
    first_seen: dict[tuple, int] = {}
    for row in rows:
        first_seen.setdefault(case_key(row), len(first_seen))
    return sorted(rows, key=lambda row: (first_seen[case_key(row)], not row["is_reference"]))


def layout_label(row: dict) -> str:
    return f"{row['dtype']} {row['memory_format']}"


def format_number(value: float) -> str:
    """Three significant digits, and no decimals from 100 on: 0.152, 8.14, 45.1, 2650."""
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
