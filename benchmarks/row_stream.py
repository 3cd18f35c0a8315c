"""A pytest plugin for the benchmark suites (`-p benchmarks.row_stream`) that the GPU check's headline step loads:

* ``--rows-jsonl PATH``: every row a test records (timed, traffic, memory) is appended to PATH as one JSON line
  as soon as the test ends, so that a run cut off at any point has written every finished row;
* ``--headline-order``: the cases run model by model in ``--models``' order, each model's train step before its
  eval step, and within each the memory-traffic counts first, then the timed providers: torchvision first, the
  eager fused ones next, torch.compile of torchvision, then of a fused model (a minute of compiling each) last;
  the copy bandwidth, which the traffic prediction needs, before everything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import harness

MODES = ("train", "eval")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fused_resnet benchmarks")
    group.addoption("--rows-jsonl", type=Path, default=None,
                    help="append each recorded row to this file as a JSON line when its test ends")
    group.addoption("--headline-order", action="store_true", default=False,
                    help="run model by model (--models' order), train before eval, torchvision first")


def _provider_rank(provider: harness.Provider) -> int:
    """torchvision, the eager fused providers, torch.compile of torchvision, torch.compile of a fused model."""
    if provider.is_reference:
        return 0
    if not provider.compiled:
        return 1
    return 3 if provider.is_fused else 2


def headline_key(item: pytest.Item, models: list[str]) -> tuple:
    """Where `item` runs in the headline order (see the module's docstring); items it does not place keep their
    collection order after the placed ones."""
    params = item.callspec.params if hasattr(item, "callspec") else {}
    name = getattr(item, "originalname", item.name)
    if name == "test_copy_bandwidth":
        return (0,)
    model, mode = params.get("model_name"), params.get("mode")
    if model not in models or mode not in MODES:
        return (3,)
    if name == "test_traffic":
        return (1, models.index(model), MODES.index(mode), 0, 0)
    if name == "test_model":
        return (1, models.index(model), MODES.index(mode), 1, _provider_rank(params["provider"]))
    return (3,)


@pytest.hookimpl(trylast=True)  # after benchmarks/conftest.py has deselected what it deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--headline-order"):
        models = list(harness.session_of(config).size.models)
        items.sort(key=lambda item: headline_key(item, models))  # stable: ties keep their collection order


class RowStream:
    """Appends to `path` the rows recorded since the last test ended."""

    def __init__(self, path: Path, config: pytest.Config):
        self.path, self.config = path, config
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.written = {"rows": 0, "memory_rows": 0}

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "teardown":
            return
        session = harness.session_of(self.config)
        lines = []
        for kind in self.written:
            rows = getattr(session, kind)
            lines += [json.dumps(row) for row in rows[self.written[kind]:]]
            self.written[kind] = len(rows)
        if lines:
            with open(self.path, "a") as f:
                f.write("".join(line + "\n" for line in lines))


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--rows-jsonl")
    if path is not None:
        config.pluginmanager.register(RowStream(path, config), "fused_resnet_row_stream")
