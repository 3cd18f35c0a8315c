"""The benchmark machinery itself: the GPU check keeps going past failing and overrunning steps, the report's
ratios, tables, chart and target verdicts, the providers, and the activation-memory measurement."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torchvision.models.resnet import BasicBlock

# benchmarks/ is a folder of the repository, not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fused_resnet  # noqa: E402
from benchmarks import gpu_check, harness, report  # noqa: E402
from benchmarks.measure import saved_for_backward_bytes  # noqa: E402
from fused_resnet.kernels import REGISTRY  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# The GPU check's steps


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_run_command_reports_failure_and_interrupts_an_overrunning_command(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "INTERRUPT_GRACE_S", 5)
    with open(tmp_path / "log", "ab") as log:
        assert gpu_check.run_command(_python("print('fine')"), log, 30, {})[0] == "ok"
        status, _, note = gpu_check.run_command(_python("import sys; sys.exit(3)"), log, 30, {})
        assert (status, note) == ("failed", "exit status 3")
        status, seconds, note = gpu_check.run_command(_python("import time; time.sleep(60)"), log, 0.5, {})
        assert status == "timed out" and seconds < 10 and note == "interrupted after 0 s"
    assert "fine" in (tmp_path / "log").read_text()


def test_check_keeps_going_past_failed_and_overrunning_steps(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "INTERRUPT_GRACE_S", 1)
    steps = [
        gpu_check.Step("fails", 2, lambda check: _python("import sys; print('broken'); sys.exit(2)")),
        gpu_check.Step("overruns", 3, lambda check: _python("import time; time.sleep(60)")),
        gpu_check.Step("skipped", 10, lambda check: "needs a GPU"),
        gpu_check.Step("passes", 10, lambda check: _python("print('3 passed in 0.01s')"),
                       conclude=gpu_check._note_pytest_outcome),
    ]
    deadline = 2 + 3 + 10 + 10 + gpu_check.SUMMARY_RESERVE_S
    check = gpu_check.Check(tmp_path, rehearsal=True, deadline_s=deadline)
    assert check.run(steps) == 1
    results = {r.name: r for r in check.results}
    assert [r.status for r in check.results] == ["failed", "timed out", "skipped", "ok"]
    assert results["passes"].note == "3 passed in 0.01s"
    # Each step may use its own budget plus what the earlier ones left unused; the later ones keep theirs.
    assert results["fails"].allowed_s == pytest.approx(2, abs=0.5)
    assert results["overruns"].allowed_s == pytest.approx(3 + 2, abs=0.5)
    assert check.elapsed() < deadline
    summary = (tmp_path / "summary.md").read_text()
    assert "| overruns | timed out |" in summary and "| skipped | skipped |" in summary
    assert summary in capsys.readouterr().out  # printed last
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [s["status"] for s in saved["gpu_check"]["steps"]] == ["failed", "timed out", "skipped", "ok"]
    assert "broken" in (tmp_path / "log.txt").read_text()


def test_pytest_outcome_is_the_closing_line():
    output = "....s\n[100%]\n==== 12 passed, 3 skipped in 4.20s ====\n"
    assert gpu_check._pytest_outcome(output) == "12 passed, 3 skipped in 4.20s"
    assert gpu_check._pytest_outcome("2619 tests collected in 2.50s\n") == "2619 tests collected in 2.50s"


@pytest.mark.parametrize("status, output, note", [
    ("ok", "44 passed in 30.0s\n========= ERROR SUMMARY: 0 errors\n", "clean: 0 memcheck errors; 44 passed in 30.0s"),
    ("failed", "========= Invalid __global__ read of size 2\n========= ERROR SUMMARY: 3 errors\n",
     "3 memcheck errors (see log.txt); exit status 1"),
    ("timed out", "10 passed in 40.0s\n========= ERROR SUMMARY: 0 errors\n",
     "clean: 0 memcheck errors in the tests that ran; 10 passed in 40.0s; interrupted after 30 s"),
])
def test_sanitizer_verdict(status, output, note):
    result = gpu_check.StepResult("compute-sanitizer memcheck", status, 1.0, 45.0,
                                  {"ok": "", "failed": "exit status 1", "timed out": "interrupted after 30 s"}[status])
    gpu_check._conclude_sanitizer(None, result, output)
    assert result.note == note


# ---------------------------------------------------------------------------------------------------------------
# The report


def _row(suite, case, mode, provider, images_per_s, *, reference=False, gb_per_s=None, **extra):
    return {"suite": suite, "case": case, "mode": mode, "provider": provider, "is_reference": reference,
            "images_per_call": extra.pop("batch", 256), "dtype": "bfloat16", "memory_format": "channels_last",
            "images_per_s": images_per_s, "gb_per_s": gb_per_s, "median_s": 1.0, "peak_memory_mib": None, **extra}


def _h100_report(fused_train=3000.0, fused_memory=0.8, batch=256, fused_block=(160.0, 300.0)) -> report.Report:
    model = dict(model="resnet50", resolution=224, batch=batch)
    rows = [
        _row("models", "resnet50 @224", "train", "torchvision", 2000.0, reference=True, **model),
        _row("models", "resnet50 @224", "train", "torch-compile", 2500.0, **model),
        _row("models", "resnet50 @224", "train", "fused-cuda", fused_train, **model),
        _row("models", "resnet50 @224", "train", "torch-compile-fused-cuda", 3200.0, **model),
        _row("models", "resnet50 @224", "eval", "torchvision", 6000.0, reference=True, **model),
        _row("models", "resnet50 @224", "eval", "fused-cuda", 7000.0, **model),
        _row("ops", "bn+add+relu", "eval fwd", "torch-unfused", 100.0, reference=True, gb_per_s=1000.0),
        _row("ops", "bn+add+relu", "eval fwd", "fused-cuda", 250.0, gb_per_s=2500.0),
        _row("ops", "bn+add+relu", "eval fwd", "torch-compile-fused-cuda", 240.0, gb_per_s=2400.0),
        _row("copy", "256x256x56x56", "copy", "torch copy_", 120.0, reference=True, gb_per_s=3000.0),
        _row("blocks", "Bottleneck 256/64@56", "train", "torchvision", 100.0, reference=True),
        _row("blocks", "Bottleneck 256/64@56", "train", "fused-cuda", fused_block[0]),
        _row("blocks", "Bottleneck 512/128@28", "train", "torchvision", 200.0, reference=True),
        _row("blocks", "Bottleneck 512/128@28", "train", "fused-cuda", fused_block[1]),
    ]
    memory = [{**_row("memory", "resnet50 @224", "train", provider, 0.0, reference=provider == "torchvision",
                      model="resnet50", resolution=224), "saved_bytes_per_image": per_image}
              for provider, per_image in (("torchvision", 100.0), ("fused-cuda", 100.0 * fused_memory))]
    header = {"device": "NVIDIA H100 80GB HBM3", "size": "full", "torch": "2.11", "cuda": "13.0",
              "date": "2026-11-27T12:00:00+00:00"}
    return report.Report(header, rows, memory)


def test_ratios_are_to_the_reference_of_the_same_case():
    result = _h100_report()
    ratio = {(r["mode"], r["provider"]): r["ratio"] for r in result.rows}
    assert ratio["train", "fused-cuda"] == pytest.approx(1.5)
    assert ratio["eval", "fused-cuda"] == pytest.approx(7 / 6)
    ops = next(r for r in result.rows if r["provider"] == "fused-cuda" and r["suite"] == "ops")
    assert ops["copy_fraction"] == pytest.approx(2500 / 3000)
    assert result.memory_rows[1]["ratio"] == pytest.approx(0.8)


def test_tables_put_the_providers_side_by_side():
    lines = _h100_report().text_lines()
    header = next(line for line in lines if line.startswith("suite"))
    assert header.split()[-4:] == ["torchvision", "torch-compile", "fused-cuda", "torch-compile-fused-cuda"]
    train = next(line for line in lines if "resnet50 @224" in line and "train" in line)
    assert "2000" in train and "2500 (1.25x)" in train and "3000 (1.50x)" in train and "3200 (1.60x)" in train
    eval_line = next(line for line in lines if "resnet50 @224" in line and "eval" in line)
    assert eval_line.endswith("7000 (1.17x)")  # empty cells for the providers that did not run this case
    ops_header = next(line for line in lines if line.startswith("op "))
    assert ops_header.split()[-3:] == ["torch-unfused", "fused-cuda", "torch-compile-fused-cuda"]
    assert any("2500 (2.50x, 83% of copy)" in line and line.endswith("2400 (2.40x, 80% of copy)") for line in lines)
    markdown = _h100_report().markdown_lines()
    assert any(line.startswith("| suite |") and line.endswith("| fused-cuda | torch-compile-fused-cuda |")
               for line in markdown)


def test_targets_are_judged_on_an_h100_at_the_full_configuration():
    """On the eager fused providers: torch-compile-fused-cuda's rows are shown, not judged."""
    assert all("torch-compile-fused" not in c.what for c in report.target_checks(_h100_report()))
    verdicts = {(c.key, c.verdict) for c in report.target_checks(_h100_report())}
    assert verdicts == {("train_vs_eager", "met"), ("train_vs_compile", "met"), ("eval_vs_eager", "NOT MET"),
                        ("block_train_vs_eager", "met"), ("elementwise_vs_copy", "met"), ("memory", "NOT MET")}
    block = next(c for c in report.target_checks(_h100_report()) if c.key == "block_train_vs_eager")
    assert block.value == pytest.approx((1.6 * 1.5) ** 0.5) and "geomean of 2 shapes, 1.50-1.60x" in block.measured
    assert {c.key: c.verdict for c in report.target_checks(
        _h100_report(fused_train=2600, fused_memory=0.5, fused_block=(160.0, 260.0)))} == {
        "train_vs_eager": "met", "train_vs_compile": "NOT MET", "eval_vs_eager": "NOT MET",
        "block_train_vs_eager": "NOT MET", "elementwise_vs_copy": "met", "memory": "met"}


def test_targets_are_not_judged_elsewhere():
    smaller = {c.key: c for c in report.target_checks(_h100_report(batch=32))}
    assert smaller["train_vs_eager"].verdict == "not judged" and "batch 32" in smaller["train_vs_eager"].note
    cpu = _h100_report()
    cpu.header.update(device="AMD EPYC (2 threads)", size="smoke")
    checks = {c.key: c for c in report.target_checks(cpu)}
    assert checks["train_vs_eager"].verdict == "not judged" and checks["train_vs_eager"].measured == "1.50x"
    assert checks["elementwise_vs_copy"].verdict == "not judged"
    assert checks["memory"].verdict == "NOT MET"  # bytes saved do not depend on the device


def test_results_readme_row():
    result = _h100_report()
    row = report.results_readme_row(result, report.target_checks(result))
    assert row.startswith("| NVIDIA H100 80GB HBM3 | 2026-11-27 | 2.11 / 13.0 | 1.50x met | 1.20x met |")
    assert "[nvidia-h100-80gb-hbm3-2026-11-27](nvidia-h100-80gb-hbm3-2026-11-27/summary.md)" in row
    assert len(row.split(" | ")) == len(report.RESULTS_COLUMNS)


def test_report_writes_json_and_chart(tmp_path):
    pytest.importorskip("matplotlib")
    json_path, chart_path, problem = _h100_report().write(tmp_path)
    assert problem is None and chart_path.read_bytes().startswith(b"\x89PNG")
    assert report.Report.load(json_path).rows == _h100_report().rows


def test_chart_draws_a_bar_for_every_provider_but_the_reference():
    panels = {panel.title.split(":")[0]: panel for panel in report._panels(_h100_report())}
    assert list(panels["models — train"].bars) == ["torch-compile", "fused-cuda", "torch-compile-fused-cuda"]
    assert panels["models — train"].bars["torch-compile-fused-cuda"] == [pytest.approx(1.6)]
    assert list(panels["ops"].bars) == ["fused-cuda", "torch-compile-fused-cuda"]


# ---------------------------------------------------------------------------------------------------------------
# Providers


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fused_providers_run_where_the_registry_says_their_backend_runs(device):
    """Each fused backend but the reference composite runs by default where the registry says it can (not when its
    kernels are interpreted), and is left out with the registry's reason elsewhere."""
    chosen, left_out = harness.select_providers(None, torch.device(device))
    for name, backend in REGISTRY.items():
        provider = f"fused-{name}"
        if name == "torch":
            assert provider in left_out
        elif backend.why_not(device) is None and not backend.interpreted:
            assert provider in [p.name for p in chosen]
        else:
            assert left_out[provider] == (backend.why_not(device) or harness.INTERPRETED)
    assert chosen[0].is_reference
    with pytest.raises(ValueError, match=r"--providers: unknown \['fused-gpu'\]"):
        harness.select_providers(["torchvision", "fused-gpu"], torch.device(device))


def test_compiled_providers_are_opt_in_on_a_cpu_and_default_on_a_gpu_for_cuda():
    """torch-compile and torch-compile-fused-<backend> run on a CPU only when asked for; on a GPU torch-compile and
    torch-compile-fused-cuda run by default (or are left out with the cuda backend's reason), the others only when
    asked for."""
    chosen, left_out = harness.select_providers(None, torch.device("cpu"))
    assert not [p.name for p in chosen if p.compiled]
    assert "on a CPU only through --providers" in left_out["torch-compile"]
    for fused in [p for p in chosen if p.is_fused]:
        assert "on a CPU only through --providers" in left_out[f"torch-compile-{fused.name}"]
    chosen, left_out = harness.select_providers(None, torch.device("cuda"))
    compiled = [p.name for p in chosen if p.compiled]
    cuda_reason = REGISTRY["cuda"].why_not("cuda")
    if cuda_reason is None:
        assert compiled == ["torch-compile", "torch-compile-fused-cuda"]
    else:
        assert compiled == ["torch-compile"] and left_out["torch-compile-fused-cuda"] == cuda_reason
    assert "torch-compile-fused-triton" not in compiled and "torch-compile-fused-torch" not in compiled


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_compiled_fused_provider_is_torch_compile_of_the_fused_provider(device):
    known = harness.known_providers()
    for name, backend in REGISTRY.items():
        compiled, fused = known[f"torch-compile-fused-{name}"], known[f"fused-{name}"]
        assert (compiled.backend, compiled.compiled, compiled.is_fused, compiled.is_reference) == (name, True, True,
                                                                                                     False)
        assert harness.why_not_runnable(compiled, torch.device(device)) == harness.why_not_runnable(
            fused, torch.device(device))
    chosen, left_out = harness.select_providers(["torchvision", "torch-compile-fused-torch"], torch.device(device))
    assert [p.name for p in chosen] == ["torchvision", "torch-compile-fused-torch"] and not left_out


def test_prepare_compiles_the_fused_copy_for_a_compiled_fused_provider():
    """Compilation is lazy: this checks what is compiled, without compiling it."""
    reference = BasicBlock(8, 8)
    known = harness.known_providers()
    prepared = known["torch-compile-fused-torch"].prepare(reference)
    assert isinstance(prepared, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(prepared._orig_mod, fused_resnet.BasicBlock)
    assert torch.equal(prepared._orig_mod.conv1.weight, reference.conv1.weight)
    assert known["torch-compile"].prepare(reference)._orig_mod is reference
    assert known["fused-torch"].compile(reference) is reference


# ---------------------------------------------------------------------------------------------------------------
# Activation memory


def test_saved_bytes_count_each_storage_once_and_leave_parameters_out():
    linear = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)

    def forward():
        hidden = torch.relu(linear(x))  # linear saves x (and its weight, a parameter); relu saves its output
        return hidden[:2] * hidden[2:]  # two views of relu's output: the same storage again

    assert saved_for_backward_bytes(linear, forward) == x.nbytes + 4 * 8 * 4


def test_size_overrides_replace_only_what_the_command_line_gives():
    default = harness.SIZES["default"]
    size = harness.size_config("default", model_batch=16, model_resolution=160)
    assert (size.model_batch, size.model_resolution) == (16, 160)
    assert size.block_batch == default.block_batch and size.op_shape == default.op_shape
    assert harness.size_config("default") == default
