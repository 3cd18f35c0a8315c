"""The benchmark report's chart: one horizontal bar panel per suite and mode, each provider's ratio to the reference."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from benchmarks.report_rows import RunRows, layout_label
from benchmarks.report_targets import MEMORY_TARGETS


@dataclasses.dataclass
class _Panel:
    title: str
    categories: list[str]  # one group of bars each, top to bottom
    bars: dict[str, list[float | None]]  # provider -> one value per category
    lines: dict[str, float]  # label -> x of a vertical line (parity, a target)
    xlabel: str


def _panels(report: RunRows) -> list[_Panel]:
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
    return f"{row['case']}{mode} · {layout_label(row)}"


def _panel(title: str, rows: list[dict], lines: dict[str, float], xlabel: str) -> _Panel:
    compared = [row for row in rows if not row["is_reference"] and row["ratio"] is not None]
    categories = list(dict.fromkeys(_category(row) for row in compared))
    bars: dict[str, list[float | None]] = {row["provider"]: [None] * len(categories) for row in compared}
    for row in compared:
        bars[row["provider"]][categories.index(_category(row))] = row["ratio"]
    return _Panel(title, categories, bars, lines, xlabel)


def draw_chart(report: RunRows, path: Path) -> str | None:
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
