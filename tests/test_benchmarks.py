"""The benchmark machinery itself (the GPU check's in tests/test_gpu_check.py): the report's ratios, tables, chart
and target verdicts, the providers, the activation-memory measurement, and the memory-traffic
count."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torchvision.models.resnet import BasicBlock

# benchmarks/ is a folder of the repository, not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fused_resnet  # noqa: E402
from benchmarks import harness, report, report_chart, report_tables, report_targets, traffic  # noqa: E402
from benchmarks.measure import Measure, saved_for_backward_bytes  # noqa: E402
from benchmarks.test_models import build_model, model_inputs  # noqa: E402
from fused_resnet.kernels import REGISTRY  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# The report


def _row(suite, case, mode, provider, images_per_s, *, reference=False, gb_per_s=None, **extra):
    return {"suite": suite, "case": case, "mode": mode, "provider": provider, "is_reference": reference,
            "images_per_call": extra.pop("batch", 256), "dtype": "bfloat16", "memory_format": "channels_last",
            "images_per_s": images_per_s, "gb_per_s": gb_per_s, "median_s": 1.0, "peak_memory_mib": None, **extra}


def _h100_report(fused_train=3000.0, fused_memory=0.9, batch=256, fused_block=(160.0, 300.0),
                 lowmem_memory=0.45) -> report.Report:
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
                      model="resnet50", resolution=224), "saved_bytes_per_image": per_image, "memory_policy": policy}
              for provider, policy, per_image in (("torchvision", None, 100.0),
                                                  ("fused-cuda", "default", 100.0 * fused_memory),
                                                  ("fused-cuda-lowmem", "min", 100.0 * lowmem_memory))]
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
    assert result.memory_rows[1]["ratio"] == pytest.approx(0.9)


def test_a_paired_ratio_replaces_the_ratio_of_separate_medians_and_is_marked():
    rows = [_row("models", "resnet50 @160", "eval", "torchvision", 100.0, reference=True),
            _row("models", "resnet50 @160", "eval", "fused-cpu", 110.0, paired_ratio=1.25)]
    result = report.Report({"device": "cpu"}, rows, [])
    assert [row["ratio"] for row in result.rows] == [1.0, 1.25]
    lines = result.text_lines()
    assert any(line.endswith("110 (1.25x*)") for line in lines)
    assert report_tables.PAIRED_NOTE in lines


class _StubBenchmark:
    """pytest-benchmark's fixture as Measure uses it: pedantic calls setup before each warm-up and timed round and
    records `duration` per timed round."""

    def __init__(self, duration: float):
        self.duration, self.extra_info, self.group, self.stats = duration, {}, None, None

    def pedantic(self, target, setup=None, rounds=1, warmup_rounds=0):
        data = []
        for timed in [False] * warmup_rounds + [True] * rounds:
            if setup is not None:
                setup()
            target()
            if timed:
                data.append(self.duration)
        stats = type("Stats", (), {"data": data, "median": sorted(data)[len(data) // 2]})()
        self.stats = type("Metadata", (), {"stats": stats})()


def test_a_paired_case_times_the_reference_before_each_call_and_takes_the_median_ratio():
    session = harness.BenchSession(harness.size_config("smoke"), torch.device("cpu"), [], {}, Path("."), paired=True)
    calls = []
    # The reference step takes at least 20 ms, the measured one 10 ms (the stub's recorded duration).
    Measure(_StubBenchmark(0.010), session)(
        lambda: calls.append("fused"), suite="models", case="resnet18 @64", mode="eval", provider="fused-cpu",
        is_reference=False, images=2, layout=session.size.model_layouts[0],
        reference_step=lambda: (calls.append("reference"), time.sleep(0.020)))
    rounds = session.size.warmup_rounds + session.size.rounds
    assert calls == ["reference", "fused"] * rounds
    (row,) = session.rows
    assert row["paired_ratio"] >= 2.0 and row["images_per_s"] == pytest.approx(2 / 0.010)


def test_a_paired_run_records_the_paired_ratio_of_each_model_and_block_case_but_the_reference(tmp_path):
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_models.py", "benchmarks/test_blocks.py",
                          "-k", "eval and float32", "--size", "smoke", "--paired", "--providers",
                          "torchvision,fused-cpu", "-p", "no:cacheprovider", "--report-dir", str(tmp_path)],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    assert {row["suite"] for row in rows} == {"models", "blocks"}
    for row in rows:
        assert (row["paired_ratio"] is None) if row["provider"] == "torchvision" else row["paired_ratio"] > 0, row
    assert re.search(r"fused-cpu [\d.]+ images/s, [\d.]+x torchvision \(paired\)", run.stdout), run.stdout


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
    assert all("torch-compile-fused" not in c.what for c in report_targets.target_checks(_h100_report()))
    verdicts = {(c.key, c.verdict) for c in report_targets.target_checks(_h100_report())}
    assert verdicts == {("train_vs_eager", "met"), ("train_vs_compile", "met"), ("eval_vs_eager", "NOT MET"),
                        ("block_train_vs_eager", "met"), ("elementwise_vs_copy", "met"), ("memory", "NOT MET"),
                        ("memory", "met")}
    # Each memory policy against its own target: the default's 0.9x misses 0.88x, "min"'s 0.45x meets 0.5x.
    memory = {c.what.rsplit(", ", 1)[-1]: (c.goal, c.verdict) for c in report_targets.target_checks(_h100_report())
              if c.key == "memory"}
    assert memory == {"fused-cuda": ("<= 0.88x", "NOT MET"), "fused-cuda-lowmem": ("<= 0.50x", "met")}
    block = next(c for c in report_targets.target_checks(_h100_report()) if c.key == "block_train_vs_eager")
    assert block.value == pytest.approx((1.6 * 1.5) ** 0.5) and "geomean of 2 shapes, 1.50-1.60x" in block.measured
    assert {c.key: c.verdict for c in report_targets.target_checks(
        _h100_report(fused_train=2600, fused_memory=0.8, fused_block=(160.0, 260.0), lowmem_memory=0.5))} == {
        "train_vs_eager": "met", "train_vs_compile": "NOT MET", "eval_vs_eager": "NOT MET",
        "block_train_vs_eager": "NOT MET", "elementwise_vs_copy": "met", "memory": "met"}


def test_targets_are_not_judged_elsewhere():
    smaller = {c.key: c for c in report_targets.target_checks(_h100_report(batch=32))}
    assert smaller["train_vs_eager"].verdict == "not judged" and "batch 32" in smaller["train_vs_eager"].note
    cpu = _h100_report()
    cpu.header.update(device="AMD EPYC (2 threads)", size="smoke")
    checks = {c.key: c for c in report_targets.target_checks(cpu)}
    assert checks["train_vs_eager"].verdict == "not judged" and checks["train_vs_eager"].measured == "1.50x"
    assert checks["elementwise_vs_copy"].verdict == "not judged"
    # bytes saved do not depend on the device
    assert [c.verdict for c in report_targets.target_checks(cpu) if c.key == "memory"] == ["NOT MET", "met"]


def test_results_readme_row():
    result = _h100_report()
    row = report_targets.results_readme_row(result, report_targets.target_checks(result))
    assert row.startswith("| NVIDIA H100 80GB HBM3 | 2026-11-27 | 2.11 / 13.0 | 1.50x met | 1.20x met |")
    assert "[nvidia-h100-80gb-hbm3-2026-11-27](nvidia-h100-80gb-hbm3-2026-11-27/summary.md)" in row
    assert len(row.split(" | ")) == len(report_targets.RESULTS_COLUMNS)


def test_report_writes_json_and_chart(tmp_path):
    pytest.importorskip("matplotlib")
    json_path, chart_path, problem = _h100_report().write(tmp_path)
    assert problem is None and chart_path.read_bytes().startswith(b"\x89PNG")
    assert report.Report.load(json_path).rows == _h100_report().rows


def test_chart_draws_a_bar_for_every_provider_but_the_reference():
    panels = {panel.title.split(":")[0]: panel for panel in report_chart._panels(_h100_report())}
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
    # The "min" memory policy of the backend `auto` picks on the device runs beside it by default.
    lowmem = [p for p in chosen if p.trains_only]
    assert [(p.name, p.backend, p.memory) for p in lowmem] == [(f"fused-{device}-lowmem", device, "min")] or (
        not lowmem and f"fused-{device}-lowmem" in left_out)
    with pytest.raises(ValueError, match=r"--providers: unknown \['fused-gpu'\]"):
        harness.select_providers(["torchvision", "fused-gpu"], torch.device(device))


def test_compiled_providers_are_opt_in_on_a_cpu_and_default_on_a_gpu_for_cuda():
    """torch-compile and torch-compile-fused-<backend> run on a CPU only when asked for; on a GPU torch-compile and
    torch-compile-fused-cuda run by default (or are left out with the cuda backend's reason), the others only when
    asked for."""
    chosen, left_out = harness.select_providers(None, torch.device("cpu"))
    assert not [p.name for p in chosen if p.compiled]
    assert "on a CPU only through --providers" in left_out["torch-compile"]
    for fused in [p for p in chosen if p.is_fused and not p.trains_only]:
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


# ---------------------------------------------------------------------------------------------------------------
# Sizes for the machine


@pytest.mark.parametrize("cpuinfo, native", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx f16c fma avx2\nprocessor\t: 1\n", set()),  # f16c only converts
    ("flags\t\t: avx2 avx512f avx512bw avx512vl\n", set()),  # AVX-512 without its bf16 instructions
    ("flags\t\t: avx2 avx512f avx512bw avx512_bf16\n", {torch.bfloat16}),
    ("flags\t\t: avx512f amx_tile amx_bf16 avx512fp16\n", {torch.bfloat16, torch.float16}),
    ("Features\t: fp asimd fphp asimdhp bf16\n", {torch.bfloat16, torch.float16}),  # aarch64
    ("", set()),
], ids=["avx2", "avx512-without-bf16", "avx512-bf16", "amx-and-avx512-fp16", "aarch64", "no-cpuinfo"])
def test_low_precision_counts_as_native_only_with_its_instructions(cpuinfo, native):
    """The CPU's flags decide which low-precision dtypes the default size measures (AVX2, as on this project's
    machine, or AVX-512 without AVX512-BF16: none)."""
    assert harness.native_low_precision(torch.device("cpu"), harness.cpu_flags(cpuinfo)) == native


def test_default_size_measures_low_precision_only_where_native():
    """Without native bf16 the default size runs its bf16 layouts in float32 and the header says so (a run of
    emulated bf16 took over 30 minutes on the 2-core AVX2 CPU); `--dtype bf16` still runs them; with native bf16
    the layouts stay the size's, and so do the smoke and full sizes' everywhere."""
    default = harness.SIZES["default"]
    emulated = harness.size_config("default", native=frozenset())
    assert emulated.layouts == (harness.FP32_NCHW, harness.FP32_CHANNELS_LAST)
    assert emulated.model_layouts == (harness.FP32_NCHW, harness.FP32_CHANNELS_LAST)
    assert emulated.emulated_dtypes == (torch.bfloat16,)
    header = harness.BenchSession(emulated, torch.device("cpu"), [], {}, Path("out")).header_lines()
    assert any(line.startswith("bfloat16 layouts run in float32: this cpu") for line in header)
    native = harness.size_config("default", native=frozenset({torch.bfloat16}))
    assert (native.layouts, native.model_layouts, native.emulated_dtypes) == (default.layouts, default.model_layouts,
                                                                              ())
    asked = harness.size_config("default", harness.DTYPES["bf16"], native=frozenset())
    assert {layout.dtype for layout in asked.layouts + asked.model_layouts} == {torch.bfloat16}
    assert not asked.emulated_dtypes
    for name in ("smoke", "full"):
        assert harness.size_config(name, native=frozenset()) == harness.SIZES[name]


def _cpu_session(size: str = "default", device: str = "cpu") -> harness.BenchSession:
    return harness.BenchSession(harness.SIZES[size], torch.device(device), [], {}, Path("out"))


def test_the_run_announces_its_cases_and_expected_time():
    """The estimate before a run: each test's warm-up and timed calls (1 for an untimed measurement) at the seconds
    per call measured for its benchmark function; a test of another function, or a GPU run, is not estimated."""
    size = harness.SIZES["default"]
    per_call = {name: costs["default"] for name, (_, costs) in harness.CALL_COSTS.items()}
    expected = ((size.warmup_rounds + size.rounds) * (per_call["test_block"] + per_call["test_model"])
                + (size.warmup_rounds + size.op_rounds) * per_call["test_bn_add_relu"] + per_call["test_traffic"])
    line = _cpu_session().plan([("b", "test_block"), ("m", "test_model"), ("o", "test_bn_add_relu"),
                                ("t", "test_traffic"), ("n", "test_new")])
    assert line.startswith(f"fused_resnet benchmarks: 5 cases, expected to take about "
                           f"{int(expected // 60)}:{int(expected % 60):02d} (min:s)")
    assert line.endswith(", 1 cases not counted")
    assert _cpu_session(device="cuda").plan([("b", "test_block")]) == (
        "fused_resnet benchmarks: 1 cases; no time estimate (cuda, size default: no measured call costs)")


def test_each_finished_case_gets_a_line_with_its_ratio_to_the_reference(monkeypatch):
    """As the run goes: tests finished, time elapsed, the time left (the estimate of the remaining tests scaled by
    elapsed over the estimate of the finished ones), then the case, the provider, what it measured and its ratio to
    the reference provider of the same case in this run; a test that recorded nothing prints nothing."""
    clock = iter([1000.0, 1030.0, 1090.0, 1100.0, 1110.0])
    monkeypatch.setattr(harness.time, "monotonic", lambda: next(clock))
    size = harness.SIZES["default"]
    model_call_s = 9.0 / (size.warmup_rounds + size.rounds)  # 9 s a test
    monkeypatch.setitem(harness.CALL_COSTS, "test_model", ("rounds", {"default": model_call_s}))
    monkeypatch.setitem(harness.CALL_COSTS, "test_traffic", (None, {"default": 2.0}))
    session = _cpu_session()
    session.plan([("tv", "test_model"), ("fused", "test_model"), ("failed", "test_model"), ("memory", "test_traffic")])
    model = dict(model="resnet50", resolution=128, batch=4)
    session.rows.append(_row("models", "resnet50 @128", "train", "torchvision", 20.0, reference=True, **model))
    assert session.has_unshown_rows()
    assert session.finish("tv") == ["[1/4 0:30, ~1:06 left] models resnet50 @128 train bfloat16 channels_last: "
                                    "torchvision 20 images/s"]
    assert not session.has_unshown_rows()
    session.rows.append(_row("models", "resnet50 @128", "train", "fused-cpu", 25.0, **model))
    assert session.finish("fused") == ["[2/4 1:30, ~0:55 left] models resnet50 @128 train bfloat16 channels_last: "
                                       "fused-cpu 25 images/s, 1.25x torchvision"]
    assert session.finish("failed") == []
    session.memory_rows += [
        {**_row("memory", "resnet50 @128", "train", provider, 0.0, reference=provider == "torchvision"),
         "saved_bytes_per_image": saved} for provider, saved in (("torchvision", 2**21), ("fused-cpu", 1.5 * 2**20))]
    assert session.finish("memory") == [
        "[4/4 1:50] memory resnet50 @128 train bfloat16 channels_last: torchvision 2 MiB/image saved",
        "[4/4 1:50] memory resnet50 @128 train bfloat16 channels_last: fused-cpu 1.5 MiB/image saved, 0.75x "
        "torchvision"]


def test_a_benchmark_run_prints_its_estimate_and_a_line_per_case_instead_of_dots(tmp_path):
    """benchmarks/conftest.py's hooks, in a real run of the smoke size's two device copies: the announcement after
    collection, then each case's line where pytest would print its dot."""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_ops.py", "-k", "test_device_copy",
                          "--size", "smoke", "-p", "no:cacheprovider", "--report-dir", str(tmp_path)],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    announced = next(i for i, line in enumerate(lines) if line.startswith("fused_resnet benchmarks: 2 cases, expected"))
    first, second, progress = [line for line in lines[announced + 1:announced + 5] if line]
    assert re.fullmatch(r"\[1/2 0:\d\d, ~\d+:\d\d left\] copy 4x64x28x28 copy float32 nchw: torch copy_ [\d.]+ GB/s",
                        first), first
    assert re.fullmatch(r"\[2/2 0:\d\d\] copy 4x64x28x28 copy bfloat16 channels_last: torch copy_ [\d.]+ GB/s",
                        second), second
    assert progress.split() == ["[100%]"]  # no dots, nor the file's name again before each line


def test_size_overrides_replace_only_what_the_command_line_gives():
    default = harness.SIZES["default"]
    size = harness.size_config("default", model_batch=16, model_resolution=160)
    assert (size.model_batch, size.model_resolution) == (16, 160)
    assert size.block_batch == default.block_batch and size.op_shape == default.op_shape
    assert harness.size_config("default") == default


# ---------------------------------------------------------------------------------------------------------------
# Memory traffic


def _moved(step) -> dict[str, int]:
    """{op: bytes} of what `step()` dispatches."""
    with traffic.TrafficCounter() as counter:
        step()
    return {op: n for (_, op), n in counter.traffic.bytes_by_op.items()}


def test_an_op_reads_each_distinct_argument_and_writes_each_result_once():
    """The accounting of benchmarks/traffic.py on hand-checked cases: an add of two tensors moves three tensors'
    bytes; a view moves nothing; an in-place op reads and writes its tensor; copy_ and out= write without reading
    their destination; an expanded tensor is read once per distinct element; a tensor passed twice is read once."""
    a, b, out = torch.randn(4, 8), torch.randn(4, 8), torch.empty(4, 8)
    row = torch.randn(8)
    size = a.nbytes  # 128
    assert _moved(lambda: a + b) == {"aten::add": 3 * size}
    assert _moved(lambda: a.view(2, 16).transpose(0, 1)) == {}
    assert _moved(lambda: a + a) == {"aten::add": 2 * size}
    assert _moved(lambda: b.clone().relu_()) == {"aten::clone": 2 * size, "aten::relu_": 2 * size}
    assert _moved(lambda: out.copy_(a)) == {"aten::copy_": 2 * size}
    assert _moved(lambda: torch.add(a, b, out=out)) == {"aten::add": 3 * size}
    assert _moved(lambda: a * row.expand(4, 8)) == {"aten::mul": 2 * size + row.nbytes}
    assert _moved(lambda: torch.empty(4, 8)) == {}


@pytest.mark.skipif(REGISTRY["cpu"].missing is not None, reason="the compiled extension is not built")
def test_a_custom_op_counts_its_tensors_and_a_convolution_counts_as_one():
    """fused_resnet's compiled ops are counted like aten's, by their tensors: the fused BN + residual + ReLU reads
    y, the residual and three per-channel vectors and writes the output. Convolutions (aten's, and the Triton one
    by name) are told apart from the rest."""
    y, residual = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    mean, scale, shift = torch.randn(3), torch.rand(3), torch.randn(3)
    moved = _moved(lambda: torch.ops.fused_resnet.bn_act(y, mean, scale, shift, residual, None, None, None, True))
    assert moved == {"fused_resnet::bn_act": 3 * y.nbytes + 3 * scale.nbytes}
    weight = torch.randn(4, 3, 3, 3)
    with traffic.TrafficCounter() as counter:
        torch.nn.functional.conv2d(y, weight).relu()
    conv_out = 2 * 4 * 3 * 3 * 4
    assert counter.traffic.total(conv=True) == y.nbytes + weight.nbytes + conv_out
    assert counter.traffic.total(conv=False) == 2 * conv_out
    assert traffic.is_convolution("fused_resnet_triton::conv2d")
    assert traffic.is_convolution("aten::convolution_backward")
    assert not traffic.is_convolution("fused_resnet_triton::bn_act")


@pytest.mark.skipif(REGISTRY["cpu"].missing is not None, reason="the compiled extension is not built")
@pytest.mark.parametrize("provider_name, mode", [("torchvision", "train"), ("fused-cpu", "train"),
                                                 ("fused-cpu", "eval")])
def test_traffic_on_fake_tensors_is_what_the_real_step_moves(provider_name, mode):
    """The benchmark counts on fake tensors (no computation, any shape): the same bytes, op by op, as a real step
    of the same model and shape. fused-cpu's eval runs oneDNN's fused convolutions, whose shapes the count supplies
    on fake tensors; its float32 NCHW train step converts to channels_last and back."""
    provider = harness.known_providers()[provider_name]
    layout, batch, resolution, cpu = harness.FP32_NCHW, 2, 32, torch.device("cpu")
    module = provider.prepare(build_model("resnet18", cpu, layout))
    x, labels = model_inputs(batch, resolution, cpu, layout)
    real = traffic.count_step(module, x, labels, provider, mode)
    fake = traffic.count_model_step("resnet18", provider, mode, layout, batch, resolution, cpu)
    assert fake.bytes_by_op == real.bytes_by_op and fake.calls_by_op == real.calls_by_op
    assert fake.total(conv=True) > 0 and fake.total(conv=False) > 0


def test_fused_resnet18_moves_fewer_non_convolution_bytes_than_torchvision():
    """What fusing is for, counted (resnet18, batch 8 at 64x64, bf16 channels_last, MB per image): the forward of a
    train step moves fewer non-convolution bytes fused (torchvision 2.37, fused-cpu 1.79: statistics, apply and
    residual in two passes; fused-triton 1.13: the BatchNorm-ReLU before a convolution applied as it loads its
    input); so does the whole train step on triton (5.93 against 5.48). On cpu it does not (6.14): its backward
    recomputes each BatchNorm-ReLU output for the next convolution's weight gradient and reads it again for the
    ReLU mask, where ATen's BatchNorm backward counts as one op over its input."""
    layout, cpu = harness.BF16_CHANNELS_LAST, torch.device("cpu")
    counted, _ = traffic.counted_providers(cpu)
    fused = [p for p in counted if p.backend in ("cpu", "triton")]
    if not fused:
        pytest.skip("neither the cpu nor the triton backend can run here")
    torchvision = traffic.count_model_step("resnet18", harness.known_providers()["torchvision"], "train", layout, 8,
                                           64, cpu)
    for provider in fused:
        counts = traffic.count_model_step("resnet18", provider, "train", layout, 8, 64, cpu)
        forward, reference = counts.total(conv=False, phase="forward"), torchvision.total(conv=False, phase="forward")
        assert forward < reference, (provider.name, forward / 8e6, reference / 8e6)
        if provider.backend == "triton":
            assert counts.total(conv=False) < torchvision.total(conv=False), (
                counts.total(conv=False) / 8e6, torchvision.total(conv=False) / 8e6)


def _traffic_row(provider, mode, other, forward=None):
    return {"suite": "traffic", "case": "resnet50 @224", "mode": mode, "provider": provider,
            "is_reference": provider == "torchvision", "images_per_call": 256, "dtype": "bfloat16",
            "memory_format": "channels_last", "model": "resnet50", "resolution": 224, "counted_on": "cuda",
            "conv_bytes_per_image": 100e6, "other_bytes_per_image": other,
            "other_forward_bytes_per_image": forward if forward is not None else other, "other_bytes_by_op": {}}


def test_report_sets_the_traffic_beside_the_measured_step(tmp_path):
    """The traffic rows, recorded among the timed ones, make their own table: non-convolution MB per image, the
    ratio to torchvision, their time at the copy bandwidth measured in the run and the measured step time per
    image of the same model, mode and provider; report.json carries them and loads back."""
    result = _h100_report()
    result = report.Report(result.header, [
        *result.rows, _row("bandwidth", "copy 1024 MiB", "copy", "torch copy_", 1.0, reference=True, gb_per_s=4000.0),
        _traffic_row("torchvision", "train", 300e6, 120e6), _traffic_row("fused-cuda", "train", 240e6, 40e6),
        _traffic_row("torchvision", "eval", 120e6), _traffic_row("fused-cuda", "eval", 4e6)], result.memory_rows)
    assert not [row for row in result.rows if row["suite"] == "traffic"]
    fused_train = next(r for r in result.traffic_rows if r["provider"] == "fused-cuda" and r["mode"] == "train")
    assert fused_train["ratio"] == pytest.approx(0.8)
    assert fused_train["predicted_other_s_per_image"] == pytest.approx(240e6 / 4000e9)
    assert fused_train["measured_s_per_image"] == pytest.approx(1 / 256)  # the timed row: median 1 s for 256
    lines = result.text_lines()
    line = next(line for line in lines if "resnet50 @224" in line and "fused-cuda" in line and "train" in line)
    # conv MB, non-conv MB (forward's), vs torchvision, non-conv ms at 4000 GB/s, measured ms per image, share
    assert line.split()[-8:] == ["100", "240", "(fwd", "40)", "0.80x", "0.06", "3.91", "2%"]
    assert any(line.startswith("copy bandwidth: 4000 GB/s") for line in lines)
    assert any(line.startswith("| resnet50 @224 | 256 | eval | bfloat16 channels_last | fused-cuda |")
               for line in result.markdown_lines())
    json_path, _, _ = result.write(tmp_path)
    saved = json.loads(json_path.read_text())
    assert [row["provider"] for row in saved["traffic"]] == ["torchvision", "fused-cuda"] * 2
    assert report.Report.load(json_path).traffic_rows == result.traffic_rows


def test_a_low_memory_provider_runs_training_cases_only():
    """fused-cpu-lowmem differs from fused-cpu only in training: its eval and op cases are deselected, its memory
    rows kept (benchmarks/conftest.py)."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_models.py", "benchmarks/test_ops.py",
         "benchmarks/test_memory.py", "--size", "smoke", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=root, capture_output=True, text=True, check=True)
    lowmem = [line for line in result.stdout.splitlines() if "lowmem" in line]
    assert lowmem and all("-train]" in line or "test_memory.py" in line for line in lowmem), lowmem
    assert any("test_memory.py" in line for line in lowmem)
