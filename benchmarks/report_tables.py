"""The benchmark report's tables: providers side by side per measurement, as text and as markdown."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from benchmarks.report_rows import RunRows, case_key, copy_gb_per_s, format_number, grouped, layout_label


@dataclasses.dataclass
class Table:
    """A table of strings: the first `label_columns` columns name the measurement (left-aligned), the rest hold
    numbers (right-aligned). A row of None separates groups (a blank line in text)."""

    title: str
    columns: list[str]
    label_columns: int
    rows: list[list[str] | None]
    notes: list[str] = dataclasses.field(default_factory=list)

    def text_lines(self) -> list[str]:
        cells = [row for row in self.rows if row is not None]
        widths = [max(len(title), *(len(row[i]) for row in cells)) for i, title in enumerate(self.columns)]

        def line(values: list[str]) -> str:
            return "  ".join(value.ljust(width) if i < self.label_columns else value.rjust(width)
                             for i, (value, width) in enumerate(zip(values, widths))).rstrip()

        out = [self.title, line(self.columns), line(["-" * width for width in widths])]
        out += [line(row) if row is not None else "" for row in self.rows]
        return out + self.notes

    def markdown_lines(self, with_title: bool = True) -> list[str]:
        def line(values: list[str]) -> str:
            return "| " + " | ".join(value.replace("|", "\\|") for value in values) + " |"

        alignment = [":--" if i < self.label_columns else "--:" for i in range(len(self.columns))]
        out = ([f"**{self.title}**", ""] if with_title else []) + [line(self.columns), "|" + "|".join(alignment) + "|"]
        out += [line(row) for row in self.rows if row is not None]
        return out + ([""] + self.notes if self.notes else [])


def _pivot(
    rows: list[dict], title: str, label_columns: list[tuple[str, Callable[[dict], str]]],
    cell: Callable[[dict], str], notes: list[str],
) -> Table | None:
    """One line per measurement, one column per provider (the references first), `cell(row)` in each."""
    if not rows:
        return None
    providers = list(dict.fromkeys([row["provider"] for row in rows if row["is_reference"]]
                                   + [row["provider"] for row in rows]))
    by_case: dict[tuple, dict[str, dict]] = {}
    for row in grouped(rows):
        by_case.setdefault(case_key(row), {})[row["provider"]] = row
    lines: list[list[str] | None] = []
    previous_suite = None
    for key, of_provider in by_case.items():
        if previous_suite is not None and key[0] != previous_suite:
            lines.append(None)
        previous_suite = key[0]
        first = next(iter(of_provider.values()))
        lines.append([label(first) for _, label in label_columns]
                     + [cell(of_provider[p]) if p in of_provider else "" for p in providers])
    return Table(title, [name for name, _ in label_columns] + providers, len(label_columns), lines, notes)


def _with_details(value: str, details: Iterable[str | None]) -> str:
    shown = [d for d in details if d]
    return f"{value} ({', '.join(shown)})" if shown else value


PAIRED_MARK = "*"
PAIRED_NOTE = (f"{PAIRED_MARK} the median over the timed calls of torchvision's time over the provider's, the two "
               "alternating call by call (--paired)")


def _ratio(row: dict) -> str | None:
    if row["ratio"] is None or row["is_reference"]:
        return None
    return f"{row['ratio']:.2f}x" + (PAIRED_MARK if row.get("paired_ratio") is not None else "")


def _peak(row: dict) -> str | None:
    return f"{row['peak_memory_mib']:.0f} MiB" if row.get("peak_memory_mib") is not None else None


def _throughput_cell(row: dict) -> str:
    return _with_details(format_number(row["images_per_s"]), [_ratio(row), _peak(row)])


def _op_cell(row: dict) -> str:
    fraction = f"{row['copy_fraction']:.0%} of copy" if row["copy_fraction"] is not None else None
    return _with_details(format_number(row["gb_per_s"]), [_ratio(row), fraction])


def _megabytes(value: float) -> str:
    return format_number(value / 1e6)


def _milliseconds(seconds: float | None) -> str:
    return format_number(seconds * 1e3) if seconds is not None else "-"


def _traffic_table(traffic: list[dict], rows: list[dict]) -> Table | None:
    if not traffic:
        return None
    lines: list[list[str] | None] = []
    previous = None
    for row in traffic:
        key = case_key(row)
        if previous is not None and key != previous:
            lines.append(None)
        previous = key
        other = _megabytes(row["other_bytes_per_image"])
        if row["mode"] == "train":
            other += f" (fwd {_megabytes(row['other_forward_bytes_per_image'])})"
        share = row["predicted_share"]
        lines.append([row["case"], str(row["images_per_call"]), row["mode"], layout_label(row), row["provider"],
                      _megabytes(row["conv_bytes_per_image"]), other,
                      f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-",
                      _milliseconds(row["predicted_other_s_per_image"]), _milliseconds(row["measured_s_per_image"]),
                      f"{share:.0%}" if share is not None else "-"])
    gb_per_s = copy_gb_per_s(rows)
    bandwidth = next((row for row in rows if row["suite"] == "bandwidth"), None)
    notes = [
        f"copy bandwidth: {format_number(gb_per_s)} GB/s ({bandwidth['case']}, read + written, measured in this run)"
        if gb_per_s else "copy bandwidth: not measured in this run (benchmarks/test_traffic.py::test_copy_bandwidth), "
                         "so no predicted times",
        "an op counts each tensor it reads or writes once (ATen's training BatchNorm and its backward are one op "
        "each, though their kernels read their input twice); a train step is the forward (fwd), the loss and the "
        "backward, without the optimizer's update, which the measured train step includes",
    ]
    return Table(
        "Memory traffic per image: MB every op must read and write, counted on fake tensors at the model benchmarks' "
        "batch and resolution; the non-convolution MB at the copy bandwidth (predicted ms) beside the measured step",
        ["benchmark", "batch", "mode", "layout", "provider", "conv MB", "non-conv MB", "vs torchvision",
         "non-conv ms at copy GB/s", "measured step ms", "share"],
        5, lines, notes)


def _memory_cell(row: dict) -> str:
    peak = f"peak {row['peak_memory_mib']:.0f} MiB" if row.get("peak_memory_mib") is not None else None
    return _with_details(format_number(row["saved_bytes_per_image"] / 2**20), [_ratio(row), peak])


def tables_of(report: RunRows) -> list[Table]:
    """The tables of a report: throughput, memory-bound ops, activation memory, memory traffic (those with rows)."""
    timed = [row for row in report.rows if row["suite"] in ("blocks", "models")]
    throughput = _pivot(
        timed,
        "Throughput: images/s (ratio to torchvision eager in this run; peak GPU memory of a call)",
        [("suite", lambda r: r["suite"]), ("benchmark", lambda r: r["case"]), ("mode", lambda r: r["mode"]),
         ("layout", layout_label)],
        _throughput_cell, [PAIRED_NOTE] if any(row.get("paired_ratio") is not None for row in timed) else [])
    copies = [row for row in report.rows if row["suite"] == "copy"]
    ops = _pivot(
        [row for row in report.rows if row["suite"] == "ops"],
        "Memory-bound ops: GB/s against the bytes the op must move (ratio to the unfused PyTorch sequence; "
        "share of the device's copy bandwidth)",
        [("op", lambda r: r["case"]), ("mode", lambda r: r["mode"]), ("layout", layout_label)],
        _op_cell,
        [f"device copy bandwidth ({row['case']}, {layout_label(row)}): {format_number(row['gb_per_s'])} GB/s"
         for row in copies])
    memory = _pivot(
        report.memory_rows,
        "Activation memory: MiB saved for backward per image, training (ratio to torchvision; peak GPU memory "
        "of a training step)",
        [("benchmark", lambda r: r["case"]), ("layout", layout_label)],
        _memory_cell, [])
    traffic = _traffic_table(report.traffic_rows, report.rows)
    return [table for table in (throughput, ops, memory, traffic) if table is not None]
