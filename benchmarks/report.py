"""The benchmark report: one run's rows with their ratios, the tables printed after it, report.json and the speedup
chart. The parts live beside it: report_rows.py (ratios, shares, predicted times), report_tables.py,
report_chart.py, report_targets.py (the targets a GPU run is judged against).

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
from pathlib import Path

from benchmarks.report_chart import draw_chart
from benchmarks.report_rows import grouped, with_memory_ratios, with_ratios, with_traffic_times
from benchmarks.report_tables import Table, tables_of

JSON_NAME = "report.json"
CHART_NAME = "speedup.png"


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
        self.rows = grouped(with_ratios([row for row in self.rows if row["suite"] != "traffic"]))
        self.memory_rows = grouped(with_memory_ratios(self.memory_rows))
        self.traffic_rows = grouped(with_traffic_times(self.traffic_rows, self.rows))

    @classmethod
    def load(cls, path: Path) -> Report:
        data = json.loads(Path(path).read_text())
        return cls(data["header"], data["rows"], data.get("memory", []),
                   {k: v for k, v in data.items() if k not in ("header", "rows", "memory", "traffic")},
                   data.get("traffic", []))

    def tables(self) -> list[Table]:
        return tables_of(self)

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
