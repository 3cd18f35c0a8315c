"""The benchmark report: ratios, the tables printed after a run, report.json, the speedup chart, and the targets a
GPU run is judged against.

Plain Python (matplotlib only for the chart, imported when drawing), so that the GPU runner can read a report
whatever state the build is in. A report holds three kinds of rows, each a dict as the benchmark suites record it:

* timed rows (suites ``blocks``, ``models``, ``ops``, ``copy``: the device's plain-copy bandwidth that the
  memory-bound ops are judged against, and ``bandwidth``: a large copy's, at which the memory traffic is timed),
  with ``images_per_s``, ``gb_per_s``, ``peak_memory_mib``;
* memory rows (suite ``memory``), with ``saved_bytes_per_image``;
* memory-traffic rows (suite ``traffic``, benchmarks/traffic.py), with ``conv_bytes_per_image``,
  ``other_bytes_per_image`` and ``other_forward_bytes_per_image``: recorded among the timed rows, kept apart here;

each carrying ``case``, ``mode``, ``provider``, ``is_reference``, ``dtype`` and ``memory_format``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import re
from collections.abc import Callable, Iterable
from pathlib import Path

JSON_NAME = "report.json"
CHART_NAME = "speedup.png"


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), or its architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------------------------
# Ratios


def case_key(row: dict) -> tuple:
    """What identifies one measurement across providers: the providers of a case share it."""
    return row["suite"], row["case"], row["mode"], row["dtype"], row["memory_format"]


def _with_ratios(rows: list[dict]) -> list[dict]:
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


def _with_memory_ratios(rows: list[dict]) -> list[dict]:
    """Each memory row with `ratio`: its bytes saved per image over the reference provider's (< 1 saves memory)."""
    reference = {case_key(row): row["saved_bytes_per_image"] for row in rows if row["is_reference"]}
    return [{**row, "ratio": row["saved_bytes_per_image"] / reference[case_key(row)]
             if reference.get(case_key(row)) else None} for row in rows]


def _copy_gb_per_s(rows: list[dict]) -> float | None:
    """The device's copy bandwidth measured in this run on a large copy (suite ``bandwidth``), or None."""
    return next((row["gb_per_s"] for row in rows if row["suite"] == "bandwidth" and row.get("gb_per_s")), None)


def _with_traffic_times(traffic: list[dict], rows: list[dict]) -> list[dict]:
    """Each traffic row with `ratio` (its non-convolution bytes over the reference provider's for the same case),
    `predicted_other_s_per_image` (those bytes at the copy bandwidth of `rows`), `measured_s_per_image` (the timed
    model row of the same case and provider, per image) and `predicted_share` (the first over the second)."""
    reference = {case_key(row): row["other_bytes_per_image"] for row in traffic if row["is_reference"]}
    measured = {(*case_key(row)[1:], row["provider"]): row["median_s"] / row["images_per_call"]
                for row in rows if row["suite"] == "models"}
    gb_per_s = _copy_gb_per_s(rows)
    out = []
    for row in traffic:
        base = reference.get(case_key(row))
        predicted = row["other_bytes_per_image"] / (gb_per_s * 1e9) if gb_per_s else None
        step = measured.get((*case_key(row)[1:], row["provider"]))
        out.append({**row, "ratio": row["other_bytes_per_image"] / base if base else None,
                    "predicted_other_s_per_image": predicted, "measured_s_per_image": step,
                    "predicted_share": predicted / step if predicted is not None and step else None})
    return out


def _grouped(rows: list[dict]) -> list[dict]:
    """`rows` with the providers of one measurement next to each other, the reference first (cases in the order
    they ran)."""
    first_seen: dict[tuple, int] = {}
    for row in rows:
        first_seen.setdefault(case_key(row), len(first_seen))
    return sorted(rows, key=lambda row: (first_seen[case_key(row)], not row["is_reference"]))


# ---------------------------------------------------------------------------------------------------------------
# Tables


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
    for row in _grouped(rows):
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


def _layout(row: dict) -> str:
    return f"{row['dtype']} {row['memory_format']}"


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


def format_number(value: float) -> str:
    """Three significant digits, and no decimals from 100 on: 0.152, 8.14, 45.1, 2650."""
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


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
        lines.append([row["case"], str(row["images_per_call"]), row["mode"], _layout(row), row["provider"],
                      _megabytes(row["conv_bytes_per_image"]), other,
                      f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-",
                      _milliseconds(row["predicted_other_s_per_image"]), _milliseconds(row["measured_s_per_image"]),
                      f"{share:.0%}" if share is not None else "-"])
    gb_per_s = _copy_gb_per_s(rows)
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


# ---------------------------------------------------------------------------------------------------------------
# The report


@dataclasses.dataclass
class Report:
    """One benchmark run: `header` (device, versions, size, providers...), its timed and memory rows, and
    `extra`: what a caller adds (the GPU runner's steps and targets)."""

    header: dict
    rows: list[dict]
    memory_rows: list[dict] = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)
    traffic_rows: list[dict] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        # The traffic rows are recorded among the timed ones (the benchmark session has one list for both).
        self.traffic_rows = self.traffic_rows + [row for row in self.rows if row["suite"] == "traffic"]
        self.rows = _grouped(_with_ratios([row for row in self.rows if row["suite"] != "traffic"]))
        self.memory_rows = _grouped(_with_memory_ratios(self.memory_rows))
        self.traffic_rows = _grouped(_with_traffic_times(self.traffic_rows, self.rows))

    @classmethod
    def load(cls, path: Path) -> Report:
        data = json.loads(Path(path).read_text())
        return cls(data["header"], data["rows"], data.get("memory", []),
                   {k: v for k, v in data.items() if k not in ("header", "rows", "memory", "traffic")},
                   data.get("traffic", []))

    def tables(self) -> list[Table]:
        timed = [row for row in self.rows if row["suite"] in ("blocks", "models")]
        throughput = _pivot(
            timed,
            "Throughput: images/s (ratio to torchvision eager in this run; peak GPU memory of a call)",
            [("suite", lambda r: r["suite"]), ("benchmark", lambda r: r["case"]), ("mode", lambda r: r["mode"]),
             ("layout", _layout)],
            _throughput_cell, [PAIRED_NOTE] if any(row.get("paired_ratio") is not None for row in timed) else [])
        copies = [row for row in self.rows if row["suite"] == "copy"]
        ops = _pivot(
            [row for row in self.rows if row["suite"] == "ops"],
            "Memory-bound ops: GB/s against the bytes the op must move (ratio to the unfused PyTorch sequence; "
            "share of the device's copy bandwidth)",
            [("op", lambda r: r["case"]), ("mode", lambda r: r["mode"]), ("layout", _layout)],
            _op_cell,
            [f"device copy bandwidth ({row['case']}, {_layout(row)}): {format_number(row['gb_per_s'])} GB/s"
             for row in copies])
        memory = _pivot(
            self.memory_rows,
            "Activation memory: MiB saved for backward per image, training (ratio to torchvision; peak GPU memory "
            "of a training step)",
            [("benchmark", lambda r: r["case"]), ("layout", _layout)],
            _memory_cell, [])
        traffic = _traffic_table(self.traffic_rows, self.rows)
        return [table for table in (throughput, ops, memory, traffic) if table is not None]

    def describe(self) -> str:
        h = self.header
        versions = f"torch {h.get('torch')}" + (f" (CUDA {h['cuda']})" if h.get("cuda") else "")
        versions += f", triton {h['triton']}" if h.get("triton") else ", no triton"
        return f"device: {h.get('device')}  {versions}  fused_resnet {h.get('fused_resnet')}  size={h.get('size')}"

    def text_lines(self) -> list[str]:
        out = [self.describe(),
               "medians of the timed calls; every ratio is to the reference provider measured in the same run "
               "(> 1 is faster; for memory < 1 is smaller)"]
        for table in self.tables():
            out += [""] + table.text_lines()
        return out

    def markdown_lines(self) -> list[str]:
        out: list[str] = []
        for table in self.tables():
            out += table.markdown_lines() + [""]
        return out

    def to_json(self) -> dict:
        return {"header": self.header, "rows": self.rows, "memory": self.memory_rows, "traffic": self.traffic_rows,
                **self.extra}

    def write(self, directory: Path) -> tuple[Path, Path | None, str | None]:
        """Writes report.json and the chart into `directory`: (json path, chart path or None, why no chart)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        json_path = directory / JSON_NAME
        json_path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        chart_path = directory / CHART_NAME
        problem = draw_chart(self, chart_path)
        return json_path, (chart_path if problem is None else None), problem


# ---------------------------------------------------------------------------------------------------------------
# The chart


@dataclasses.dataclass
class _Panel:
    title: str
    categories: list[str]  # one group of bars each, top to bottom
    bars: dict[str, list[float | None]]  # provider -> one value per category
    lines: dict[str, float]  # label -> x of a vertical line (parity, a target)
    xlabel: str


def _panels(report: Report) -> list[_Panel]:
    panels = []
    timed = [row for row in report.rows if row["suite"] in ("blocks", "models", "ops")]
    memory = report.memory_rows
    # A panel per suite and mode for blocks and models; one for the ops, their modes told apart in the labels.
    groups = list(dict.fromkeys((row["suite"], None if row["suite"] == "ops" else row["mode"]) for row in timed))
    for suite, mode in groups:
        rows = [row for row in timed if row["suite"] == suite and mode in (None, row["mode"])]
        title = f"{suite}{f' — {mode}' if mode else ''}: speedup over the reference (higher is better)"
        reference = "the unfused PyTorch sequence" if suite == "ops" else "torchvision eager"
        panels.append(_panel(title, rows, {"parity": 1.0}, f"throughput ratio to {reference}"))
    if memory:
        panels.append(_panel("activation memory saved for backward (lower is better)", memory,
                             {"parity": 1.0, **{f"target {policy} {target}x": target
                                                for policy, target in MEMORY_TARGETS.items()}},
                             "bytes saved per image, ratio to torchvision"))
    return [panel for panel in panels if panel.bars]


def _category(row: dict) -> str:
    """A bar group's label: the case and layout (and the mode, for the ops, whose modes share a panel)."""
    mode = f" · {row['mode']}" if row["suite"] == "ops" else ""
    return f"{row['case']}{mode} · {_layout(row)}"


def _panel(title: str, rows: list[dict], lines: dict[str, float], xlabel: str) -> _Panel:
    compared = [row for row in rows if not row["is_reference"] and row["ratio"] is not None]
    categories = list(dict.fromkeys(_category(row) for row in compared))
    bars: dict[str, list[float | None]] = {row["provider"]: [None] * len(categories) for row in compared}
    for row in compared:
        bars[row["provider"]][categories.index(_category(row))] = row["ratio"]
    return _Panel(title, categories, bars, lines, xlabel)


def draw_chart(report: Report, path: Path) -> str | None:
    """Draws one horizontal bar panel per suite and mode (each provider's ratio to the reference per case) into
    the PNG `path`. Returns None, or why nothing was drawn."""
    panels = _panels(report)
    if not panels:
        return "no ratios to draw (did the reference provider run?)"
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed"
    matplotlib.use("Agg")  # files only: no display on a benchmark machine
    import matplotlib.pyplot as plt

    heights = [1.2 + 0.28 * len(panel.categories) * max(1, len(panel.bars)) for panel in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(heights)), gridspec_kw={"height_ratios": heights},
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    providers = list(dict.fromkeys(p for panel in panels for p in panel.bars))
    for ax, panel in zip(axes[:, 0], panels):
        bar_height = 0.8 / len(panel.bars)
        for i, (provider, values) in enumerate(panel.bars.items()):
            ys = [c + (i - (len(panel.bars) - 1) / 2) * bar_height for c in range(len(panel.categories))]
            drawn = [(y, v) for y, v in zip(ys, values) if v is not None]
            ax.barh([y for y, _ in drawn], [v for _, v in drawn], height=bar_height, label=provider,
                    color=colors[providers.index(provider) % len(colors)])
            for y, v in drawn:
                ax.text(v, y, f" {v:.2f}x", va="center", fontsize=7)
        for i, (label, x) in enumerate(panel.lines.items()):
            ax.axvline(x, color="black" if i == 0 else "tab:red", linestyle="-" if i == 0 else "--", linewidth=0.8,
                       label=None if i == 0 else label)
        ax.set_yticks(range(len(panel.categories)), panel.categories, fontsize=8)
        ax.invert_yaxis()  # the first case on top, as in the tables
        ax.set_title(panel.title, fontsize=10, loc="left")
        ax.set_xlabel(panel.xlabel, fontsize=8)
        ax.margins(x=0.15)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(report.describe(), fontsize=8, y=1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Targets (issue 3): what a GPU run of the full configuration is judged against

TARGET_CARDS = ("H100", "H200")
TARGET_MODEL, TARGET_BATCH, TARGET_RESOLUTION = "resnet50", 256, 224
TARGET_DTYPE, TARGET_MEMORY_FORMAT = "bfloat16", "channels_last"
# (key, mode, baseline provider, the fused/baseline throughput ratio to reach)
SPEED_TARGETS = [("train_vs_eager", "train", "torchvision", 1.3), ("train_vs_compile", "train", "torch-compile", 1.1),
                 ("eval_vs_eager", "eval", "torchvision", 1.3)]
BLOCK_TARGET = 1.5  # issues 4 and 5: a ResNet-50 Bottleneck's train step against torchvision eager
COPY_FRACTION_TARGET = 0.8  # fused memory-bound ops: GB/s against the device's plain-copy GB/s
# resnet50 training: bytes saved for backward, fused over torchvision, per memory policy (issue 15: "min" at most
# half; the default no worse than its 0.85-0.88x before the policies existed)
MEMORY_TARGETS = {"default": 0.88, "min": 0.5}


@dataclasses.dataclass(frozen=True)
class TargetCheck:
    key: str  # which target (train_vs_eager, train_vs_compile, eval_vs_eager, elementwise_vs_copy, memory)
    what: str
    goal: str
    value: float | None  # the measured ratio or fraction, None when not measured
    measured: str  # the measured value, formatted, or "-"
    verdict: str  # met, NOT MET, not measured, or not judged
    note: str  # where it was measured, and why it is not judged


def _on_target_card(report: Report) -> bool:
    return any(card in str(report.header.get("device")) for card in TARGET_CARDS)


def _is_judged(provider: str) -> bool:
    """Whether the targets judge `provider`: the eager fused ones (fused-<backend>), which the targets are set on.
    torch.compile of a fused model (torch-compile-fused-<backend>) is shown in the tables and the chart only."""
    return provider.startswith("fused-")


def _fused_providers(rows: list[dict]) -> list[str]:
    return sorted({row["provider"] for row in rows if _is_judged(row["provider"])})


def _verdict(value: float, goal: float, at_least: bool) -> str:
    return "met" if (value >= goal if at_least else value <= goal) else "NOT MET"


def target_checks(report: Report) -> list[TargetCheck]:
    """Each target with its measured value and verdict. Speed targets are judged only on an H100/H200 at the full
    configuration (bf16, channels_last, ResNet-50 at batch 256, 224x224); elsewhere the value is shown, not judged.
    The activation-memory ratio is judged wherever it was measured (it does not depend on the device)."""
    in_layout = [row for row in report.rows
                 if (row["dtype"], row["memory_format"]) == (TARGET_DTYPE, TARGET_MEMORY_FORMAT)]
    off_card = (None if _on_target_card(report)
                else f"targets are for an {'/'.join(TARGET_CARDS)}, not {report.header.get('device')}")
    return [*_speed_checks(report, in_layout, off_card), *_block_checks(report, in_layout, off_card),
            *_copy_checks(report, in_layout, off_card), *_memory_checks(report)]


def _block_checks(report: Report, in_layout: list[dict], off_card: str | None) -> list[TargetCheck]:
    """Issues 4 and 5: a ResNet-50 Bottleneck's train step against torchvision eager, per fused provider: the
    geometric mean of its ratios over the Bottleneck shapes that ran (each one ResNet-50 stage's)."""
    layout, target = f"{TARGET_DTYPE} {TARGET_MEMORY_FORMAT}", f">= {BLOCK_TARGET:.2f}x"
    what = "ResNet-50 Bottleneck train step vs torchvision"
    rows = [row for row in in_layout if row["suite"] == "blocks" and row["mode"] == "train"
            and row["case"].startswith("Bottleneck") and _is_judged(row["provider"])
            and row["ratio"] is not None]
    if not rows:
        return [TargetCheck("block_train_vs_eager", what, target, None, "-", "not measured",
                            f"no fused Bottleneck train step ran in {layout}")]
    not_judged = off_card or (None if report.header.get("size") == "full" else
                              f"judged at the full size, not the {report.header.get('size')} size")
    checks = []
    for provider in sorted({row["provider"] for row in rows}):
        ratios = [row["ratio"] for row in rows if row["provider"] == provider]
        value = math.prod(ratios) ** (1 / len(ratios))
        checks.append(TargetCheck(
            "block_train_vs_eager", f"{what}, {provider}", target, value,
            f"{value:.2f}x (geomean of {len(ratios)} shapes, {min(ratios):.2f}-{max(ratios):.2f}x)",
            "not judged" if not_judged else _verdict(value, BLOCK_TARGET, at_least=True),
            layout + (f"; {not_judged}" if not_judged else "")))
    return checks


def _speed_checks(report: Report, in_layout: list[dict], off_card: str | None) -> list[TargetCheck]:
    layout = f"{TARGET_DTYPE} {TARGET_MEMORY_FORMAT}"
    models = [row for row in in_layout if row["suite"] == "models" and row.get("model") == TARGET_MODEL]
    checks = []
    for key, mode, baseline, goal in SPEED_TARGETS:
        what, target = f"ResNet-50 {mode} step vs {baseline}", f">= {goal:.2f}x"
        rows = {row["provider"]: row for row in models if row["mode"] == mode}
        fused = _fused_providers(list(rows.values()))
        if baseline not in rows or not fused:
            missing = baseline if baseline not in rows else "a fused provider"
            why = report.header.get("providers_left_out", {}).get(missing)
            checks.append(TargetCheck(key, what, target, None, "-", "not measured",
                                      f"{missing} did not run in {layout}" + (f" ({why})" if why else "")))
            continue
        base = rows[baseline]
        shape = f"batch {base['images_per_call']} @{base.get('resolution')}"
        off_shape = (None if (base["images_per_call"], base.get("resolution")) == (TARGET_BATCH, TARGET_RESOLUTION)
                     else f"targets are for batch {TARGET_BATCH} @{TARGET_RESOLUTION}, not {shape}")
        not_judged = off_card or off_shape
        for provider in fused:
            value = rows[provider]["images_per_s"] / base["images_per_s"]
            checks.append(TargetCheck(
                key, f"{what}, {provider}", target, value, f"{value:.2f}x",
                "not judged" if not_judged else _verdict(value, goal, at_least=True),
                f"{layout}, {shape}" + (f"; {not_judged}" if not_judged else "")))
    return checks


def _copy_checks(report: Report, in_layout: list[dict], off_card: str | None) -> list[TargetCheck]:
    layout, target = f"{TARGET_DTYPE} {TARGET_MEMORY_FORMAT}", f">= {COPY_FRACTION_TARGET:.0%}"
    ops = [row for row in in_layout if row["suite"] == "ops" and _is_judged(row["provider"])]
    if not ops:
        return [TargetCheck("elementwise_vs_copy", "fused memory-bound op vs device copy GB/s", target, None, "-",
                            "not measured", f"no fused op ran in {layout}")]
    size = report.header.get("size")
    not_judged = off_card or (None if size == "full" else f"judged at the full size's op shape, not the {size} size's")
    checks = []
    for row in ops:
        what = f"{row['case']} {row['mode']} vs device copy, {row['provider']}"
        if row["copy_fraction"] is None:
            checks.append(TargetCheck("elementwise_vs_copy", what, target, None, "-", "not measured",
                                      "no device copy row"))
            continue
        checks.append(TargetCheck(
            "elementwise_vs_copy", what, target, row["copy_fraction"],
            f"{row['copy_fraction']:.0%} ({format_number(row['gb_per_s'])} GB/s)",
            "not judged" if not_judged else _verdict(row["copy_fraction"], COPY_FRACTION_TARGET, at_least=True),
            layout + (f"; {not_judged}" if not_judged else "")))
    return checks


def _memory_checks(report: Report) -> list[TargetCheck]:
    what = "ResNet-50 training: bytes saved for backward vs torchvision"
    rows = [row for row in report.memory_rows
            if row.get("model") == TARGET_MODEL and row["ratio"] is not None and not row["is_reference"]]
    if not rows:
        return [TargetCheck("memory", what, "<= " + ", ".join(f"{t:.2f}x ({p})" for p, t in MEMORY_TARGETS.items()),
                            None, "-", "not measured", "no ResNet-50 memory rows")]
    checks = []
    for row in rows:
        target = MEMORY_TARGETS[row.get("memory_policy") or "default"]
        checks.append(TargetCheck(
            "memory", f"{what}, {row['provider']}", f"<= {target:.2f}x", row["ratio"],
            f"{row['ratio']:.2f}x ({format_number(row['saved_bytes_per_image'] / 2**20)} MiB/image)",
            _verdict(row["ratio"], target, at_least=False),
            f"{_layout(row)}, batch {row['images_per_call']} @{row.get('resolution')}"))
    return checks


def targets_table(checks: list[TargetCheck]) -> Table:
    return Table("Targets (issue 3)", ["target", "goal", "measured", "verdict", "measured at / note"], 5,
                 [[c.what, c.goal, c.measured, c.verdict, c.note] for c in checks])


# ---------------------------------------------------------------------------------------------------------------
# benchmarks/results/: one folder per GPU run, one README line per card

RESULTS_COLUMNS = ["card", "date", "torch / CUDA", "ResNet-50 train vs eager (>= 1.3x)",
                   "train vs torch.compile (>= 1.1x)", "eval vs eager (>= 1.3x)",
                   "fused ops vs copy GB/s (>= 80%, worst)", "activation memory vs torchvision (<= 0.6x)", "run"]


def results_folder_name(report: Report) -> str:
    """`<card>-<date>`, e.g. nvidia-h100-80gb-hbm3-2026-11-27: the folder under benchmarks/results/ of a run."""
    card = re.sub(r"[^a-z0-9]+", "-", str(report.header.get("device", "unknown")).lower()).strip("-")
    return f"{card}-{str(report.header.get('date', 'undated'))[:10]}"


def results_readme_row(report: Report, checks: list[TargetCheck]) -> str:
    """The line of benchmarks/results/README.md's table for this run: each target's first measured check (the
    first fused provider), the worst of the fused ops."""
    def cell(key: str, worst: Callable[[list[TargetCheck]], TargetCheck] = lambda found: found[0]) -> str:
        found = [c for c in checks if c.key == key and c.value is not None]
        if not found:
            return "-"
        check = worst(found)
        value = f"{check.value:.0%}" if key == "elementwise_vs_copy" else f"{check.value:.2f}x"
        return f"{value} {check.verdict}"

    h = report.header
    folder = results_folder_name(report)
    cells = [str(h.get("device")), str(h.get("date", ""))[:10], f"{h.get('torch')} / {h.get('cuda')}",
             cell("train_vs_eager"), cell("train_vs_compile"), cell("eval_vs_eager"),
             cell("elementwise_vs_copy", lambda found: min(found, key=lambda c: c.value)), cell("memory"),
             f"[{folder}]({folder}/summary.md)"]
    return "| " + " | ".join(cells) + " |"
