"""The degradation experiment runs end to end and writes its CSV and its figure (a tiny configuration)."""

from __future__ import annotations

import csv

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from fused_resnet.experiments import degradation  # noqa: E402


def test_degradation_experiment_writes_its_csv_and_figure(tmp_path):
    rows = degradation.main(["--depths", "8", "14", "--epochs", "2", "--resolution", "8", "--batch-size", "256",
                             "--device", "cpu", "--out", str(tmp_path)])
    with open(tmp_path / "degradation.csv") as f:
        written = list(csv.DictReader(f))
    assert [r["model"] for r in written] == [r["model"] for r in rows]
    assert {r["model"] for r in written} == {"plain-8", "plain-14", "ResNet-8", "ResNet-14"}
    assert all(0 <= float(r["train_error"]) <= 100 and 0 <= float(r["test_error"]) <= 100 for r in written)
    # 2 epochs of ceil(1347 / 256) = 6 iterations each.
    assert [int(r["iteration"]) for r in written if r["model"] == "plain-8"] == [6, 12]
    png = (tmp_path / "degradation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
