"""python -m fused_resnet.train, on the CPU with tiny images: the runs it makes (synthetic, ImageFolder, CIFAR-10,
unfused, resumed, compiled, under torchrun with synchronized BatchNorm), what they leave (the per-epoch CSV and
JSON-lines log, a checkpoint whose model state_dict is the plain model's), the he2015-cifar recipe, and the errors
for a bad --data or --arch. Runs are in-process through main(argv) except the torchrun one."""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torchvision
from PIL import Image

import fused_resnet
from fused_resnet.train import main
from fused_resnet.train.cli import parse_args
from fused_resnet.train.engine import Trainer, build_optimizer, build_scheduler, milestone_iterations
from fused_resnet.train.model import backend_for, build_model, prepare
from fused_resnet.train.records import CHECKPOINT, LOG_COLUMNS, save_checkpoint
from fused_resnet.train.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--batch-size", "4", "--workers", "0", "--image-size", "32", "--lr", "0.01", "--print-freq", "1"]


def run(tmp_path: Path, *argv: str, output: str = "out") -> Path:
    """main() on `argv` plus tiny settings, writing into tmp_path/output; that directory."""
    out = tmp_path / output
    assert main([*TINY, "--output-dir", str(out), *argv]) == 0
    return out


def read_log(out: Path) -> tuple[list[dict], list[dict]]:
    with open(out / "log.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == LOG_COLUMNS
        rows = list(reader)
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return rows, lines


def checkpoint(out: Path) -> dict:
    return torch.load(out / CHECKPOINT, weights_only=True)


def test_synthetic_run_writes_the_log_and_a_checkpoint(tmp_path):
    """Two epochs on random data: a row per epoch in log.csv and log.jsonl with every column filled (finite
    losses, accuracies in [0, 100], throughput and peak memory > 0), and a checkpoint of the last epoch holding
    the model, optimizer, schedule, epoch, iteration and options."""
    out = run(tmp_path, "--synthetic", "--arch", "cifar_resnet20", "--synthetic-batches", "2", "--epochs", "2")
    rows, lines = read_log(out)
    assert [int(r["epoch"]) for r in rows] == [0, 1] and [line["epoch"] for line in lines] == [0, 1]
    assert [int(r["iteration"]) for r in rows] == [2, 4]
    for row, line in zip(rows, lines):
        assert set(line) == set(LOG_COLUMNS)
        assert float(row["train_loss"]) == pytest.approx(line["train_loss"])
        assert np.isfinite([line["train_loss"], line["val_loss"]]).all()
        assert 0 <= line["top1"] <= line["top5"] <= 100
        assert line["images_per_s"] > 0 and line["peak_memory_mib"] > 0
    state = checkpoint(out)
    assert state["epoch"] == 1 and state["iteration"] == 4
    assert state["args"]["arch"] == "cifar_resnet20" and state["args"]["output_dir"] == str(out)
    assert state["optimizer"]["state"], "the optimizer's momentum buffers are saved"
    assert state["lr_scheduler"]["_schedulers"][-1]["last_epoch"] == 4  # stepped every iteration
    fused_resnet.cifar_resnet(20).load_state_dict(state["model"], strict=True)


def _write_image_folder(root: Path, classes=("cat", "dog"), per_class=(4, 2)) -> None:
    generator = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = generator.integers(0, 256, (40, 36, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_image_folder_checkpoint_loads_into_torchvision_with_the_same_outputs(tmp_path):
    """A fused resnet18 trained on an ImageFolder (class count from its folders): the checkpoint's state_dict loads
    into torchvision's own resnet18 with strict=True, which then computes what the fused model does."""
    _write_image_folder(tmp_path / "images")
    out = run(tmp_path, "--data", str(tmp_path / "images"), "--arch", "resnet18", "--epochs", "1")
    rows, _ = read_log(out)
    assert len(rows) == 1 and int(rows[0]["iteration"]) == 2  # 8 training images, batches of 4
    weights = checkpoint(out)["model"]
    plain = torchvision.models.resnet18(num_classes=2)
    plain.load_state_dict(weights, strict=True)
    fused = fused_resnet.convert(torchvision.models.resnet18(num_classes=2))
    fused.load_state_dict(weights, strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), plain.eval()(x), rtol=1e-4, atol=1e-4)


def _write_cifar10(root: Path, monkeypatch) -> None:
    """A CIFAR-10 in torchvision's python layout with 8 training and 4 test images, its checksums not checked."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    generator = np.random.default_rng(0)
    files = [name for name, _ in torchvision.datasets.CIFAR10.train_list + torchvision.datasets.CIFAR10.test_list]
    for name in files:
        count = 4 if name == "test_batch" else 2
        batch = {"data": generator.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8),
                 "labels": generator.integers(0, 10, count).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)


def test_cifar10_recipe_runs_on_torchvisions_reader(tmp_path, monkeypatch):
    """--recipe he2015-cifar --dataset cifar10 reads --data with torchvision's CIFAR10 (10 classes) and trains
    for --iterations, which overrides the recipe's 64k (and --batch-size its 128)."""
    _write_cifar10(tmp_path / "cifar", monkeypatch)
    out = run(tmp_path, "--recipe", "he2015-cifar", "--arch", "cifar_resnet20", "--dataset", "cifar10", "--data",
              str(tmp_path / "cifar"), "--iterations", "3")
    rows, _ = read_log(out)
    assert [int(r["iteration"]) for r in rows] == [2, 3]  # 8 images in batches of 4: 2 per epoch, 3 in all
    state = checkpoint(out)
    assert state["args"]["batch_size"] == 4 and state["args"]["lr_milestones"] == [32000, 48000]
    assert state["model"]["fc.weight"].shape == (10, 64)


def test_no_fused_trains_the_plain_model(tmp_path):
    """--no-fused builds torchvision's model as it is (the A side of an A/B run) and trains it; --fused (the
    default) the converted one, which runs every block fused. An unfused cifar_resnet runs on the reference
    composite."""
    argv = ["--synthetic", "--arch", "resnet18"]
    plain = build_model(parse_args([*argv, "--no-fused"]), 10)
    assert type(plain) is torchvision.models.ResNet
    assert len(fused_resnet.unfused_modules(plain)) == 8  # torchvision's blocks, which convert() would swap
    assert fused_resnet.unfused_modules(build_model(parse_args(argv), 10)) == {}
    assert backend_for(parse_args(["--synthetic", "--arch", "cifar_resnet20", "--no-fused"])) == "torch"
    out = run(tmp_path, *argv, "--no-fused", "--synthetic-batches", "1", "--epochs", "1")
    torchvision.models.resnet18(num_classes=10).load_state_dict(checkpoint(out)["model"], strict=True)


def test_memory_policy_reaches_every_fused_module(tmp_path, capsys):
    """--memory min sets the policy of every fused module (torchvision's and the CIFAR networks'); with
    --no-fused, which has no fused module, it is an argparse error."""
    for arch in ("resnet18", "cifar_resnet20"):
        model = build_model(parse_args(["--synthetic", "--arch", arch, "--memory", "min"]), 10)
        assert {m.memory for m in model.modules() if hasattr(m, "memory")} == {"min"}
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--synthetic", "--memory", "min", "--no-fused"])
    assert exit_info.value.code == 2
    assert "--memory min: the fused model's memory policy, which --no-fused does not use" in capsys.readouterr().err


def test_resume_continues_as_if_never_stopped(tmp_path):
    """One epoch, then --resume for a second, ends where two epochs in one run do: the model, the optimizer's
    momentum and the schedule are restored (without the optimizer's state the second epoch would start with no
    momentum, and the weights would differ), the log continues and the epoch and iteration counts go on."""
    argv = ["--synthetic", "--arch", "cifar_resnet20", "--synthetic-batches", "1", "--lr-milestones", "1",
            "--schedule-unit", "iteration", "--momentum", "0.9"]
    straight = run(tmp_path, *argv, "--epochs", "2", output="straight")
    stopped = run(tmp_path, *argv, "--epochs", "1", output="resumed")
    assert checkpoint(stopped)["epoch"] == 0
    run(tmp_path, *argv, "--epochs", "2", "--resume", str(stopped / CHECKPOINT), output="resumed")
    rows, lines = read_log(stopped)
    assert [int(r["epoch"]) for r in rows] == [0, 1] and [line["iteration"] for line in lines] == [1, 2]
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.01, 0.001])  # the milestone at iteration 1
    expected, got = checkpoint(straight), checkpoint(stopped)
    assert got["epoch"] == 1 and got["iteration"] == 2
    for name, tensor in expected["model"].items():
        torch.testing.assert_close(got["model"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    for index, buffers in expected["optimizer"]["state"].items():
        torch.testing.assert_close(got["optimizer"]["state"][index]["momentum_buffer"], buffers["momentum_buffer"],
                                   rtol=1e-5, atol=1e-6)


def test_compiled_run_saves_the_plain_state_dict(tmp_path):
    """With --compile the training steps call torch.compile's wrapper, whose state_dict keys start with
    `_orig_mod.`; the checkpoint holds the model's own keys. (torch.compile is lazy: nothing compiles here.)"""
    args = parse_args([*TINY, "--synthetic", "--arch", "cifar_resnet20", "--compile", "--output-dir", str(tmp_path)])
    models = prepare(build_model(args, 10), args, Runtime(torch.device("cpu")))
    assert all(key.startswith("_orig_mod.") for key in models.train.state_dict())
    optimizer = build_optimizer(models.plain, args)
    trainer = Trainer(models, optimizer, build_scheduler(optimizer, [], 0.1), None, Runtime(torch.device("cpu")), args)
    weights = torch.load(save_checkpoint(trainer, 0), weights_only=True)["model"]
    fused_resnet.cifar_resnet(20).load_state_dict(weights, strict=True)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed, gloo")
def test_torchrun_with_sync_bn(tmp_path):
    """Two processes under torchrun (gloo on the CPU) with --sync-bn: every BatchNorm becomes a SyncBatchNorm,
    the run finishes, rank 0 alone logs, and the checkpoint holds the plain model's keys (no DDP `module.`)."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fused_resnet.train", *TINY, "--synthetic", "--arch", "cifar_resnet20", "--sync-bn",
               "--device", "cpu", "--synthetic-batches", "2", "--epochs", "1", "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("19 SyncBatchNorm layers, 2 process(es) on cpu") == 1, result.stdout
    rows, _ = read_log(out)
    assert len(rows) == 1 and int(rows[0]["iteration"]) == 2  # each process: 2 batches of its own 4 images
    fused_resnet.cifar_resnet(20).load_state_dict(checkpoint(out)["model"], strict=True)


def test_he2015_recipe_sets_the_papers_schedule_and_flags_override_it():
    """--recipe he2015-cifar: SGD lr 0.1, momentum 0.9, weight decay 1e-4, batch 128, lr / 10 at 32k and 48k
    iterations, 64k in all; ResNet-110 warms up at 0.01 for 400 iterations, ResNet-56 does not; explicit flags
    win over the recipe."""
    args = parse_args(["--recipe", "he2015-cifar", "--arch", "cifar_resnet110", "--synthetic"])
    assert (args.lr, args.momentum, args.weight_decay, args.batch_size) == (0.1, 0.9, 1e-4, 128)
    assert (args.iterations, args.image_size, args.warmup_iterations, args.warmup_lr) == (64000, 32, 400, 0.01)
    assert (args.lr_milestones, args.schedule_unit, args.lr_gamma) == ([32000, 48000], "iteration", 0.1)
    assert milestone_iterations(args, 391) == [32000, 48000]
    # The schedule's shape, scaled down: warm-up for 4 iterations, milestones at 6 and 9.
    optimizer = build_optimizer(torch.nn.Linear(2, 2), args)
    scheduler = build_scheduler(optimizer, [6, 9], args.lr_gamma, 4, args.warmup_lr)
    lrs = []
    for _ in range(11):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.01] * 4 + [0.1] * 2 + [0.01] * 3 + [0.001] * 2)

    assert parse_args(["--recipe", "he2015-cifar", "--arch", "cifar_resnet56", "--synthetic"]).warmup_iterations == 0
    args = parse_args(["--recipe", "he2015-cifar", "--arch", "cifar_resnet110", "--synthetic", "--lr", "0.05",
                       "--epochs", "3", "--warmup-iterations", "10"])
    assert (args.lr, args.epochs, args.iterations, args.warmup_iterations, args.momentum) == (0.05, 3, None, 10, 0.9)


@pytest.mark.parametrize("case", ["missing", "no_val", "no_cifar", "unknown_arch", "bad_depth", "bad_device"])
def test_bad_data_or_arch_is_an_argparse_error(tmp_path, capsys, case):
    """A missing --data directory, one without val/ (or without CIFAR-10's folder), an unknown --arch, a CIFAR
    depth that is not 6n+2 and an unknown --device exit with status 2 and a message naming the argument and what
    was expected, before anything is built or written."""
    images = tmp_path / "images"
    (images / "train").mkdir(parents=True)
    argv, message = {
        "missing": (["--data", str(tmp_path / "nowhere")], f"--data: expected a directory, {tmp_path / 'nowhere'}"),
        "no_val": (["--data", str(images)], "--data: expected an ImageFolder root with train/ and val/ subfolders"),
        "no_cifar": (["--data", str(images), "--dataset", "cifar10"], "--data: expected CIFAR-10's python version"),
        "unknown_arch": (["--synthetic", "--arch", "resnet19"], "--arch: unknown architecture 'resnet19'; expected"),
        "bad_depth": (["--synthetic", "--arch", "cifar_resnet21"], "--arch cifar_resnet21: a CIFAR ResNet has 6n+2"),
        "bad_device": (["--synthetic", "--device", "gpu0"], "--device: expected cpu or cuda, got 'gpu0'"),
    }[case]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--output-dir", str(out)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_default_data_workers_fit_the_cpus(monkeypatch):
    """At most one data-loading process per CPU this process may use (4 on 2 cores made DataLoader warn)."""
    import fused_resnet.train.cli as cli

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert cli.default_workers() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert cli.default_workers() == 4
    assert parse_args(["--synthetic"]).workers == min(4, len(os.sched_getaffinity(0)))
