"""What a run leaves: checkpoint.pth (rewritten every epoch, and what --resume reads) and the per-epoch log, as CSV
(log.csv) and JSON lines (log.jsonl): the epoch, the iterations done at its end, the learning rate of its first
step, the mean training loss, the validation loss, top-1 and top-5 accuracy (percent), the training images per
second of all processes together, the peak memory (MiB) and the epoch's wall time (seconds)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
from pathlib import Path

import torch

from .engine import Trainer

CHECKPOINT = "checkpoint.pth"
LOG_COLUMNS = ("epoch", "iteration", "lr", "train_loss", "val_loss", "top1", "top5", "images_per_s",
               "peak_memory_mib", "epoch_time_s")


def peak_memory_mib(device: torch.device) -> float:
    """The epoch's peak: torch.cuda.max_memory_allocated on CUDA (reset at each epoch's start by
    :func:`reset_peak_memory`); on the CPU the process's peak resident set size, since it started."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _json_safe(args: argparse.Namespace) -> dict:
    """The options as plain values (paths as strings), which torch.load(weights_only=True) and JSON read."""
    return {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()}


def save_checkpoint(trainer: Trainer, epoch: int) -> Path:
    """Writes checkpoint.pth in --output-dir: the plain model's state_dict (loads into torchvision's, timm's or
    cifar_resnet's own model with strict=True), the optimizer, the schedule, the gradient scaler, the finished
    epoch and iteration, and the options. Written beside and renamed, so an interrupted save keeps the last one."""
    path = Path(trainer.args.output_dir) / CHECKPOINT
    state = {
        "model": trainer.models.plain.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "lr_scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "epoch": epoch,
        "iteration": trainer.iteration,
        "args": _json_safe(trainer.args),
    }
    partial = path.with_suffix(".pth.partial")
    torch.save(state, partial)
    os.replace(partial, path)
    return path


def load_checkpoint(trainer: Trainer, path: Path) -> int:
    """Restores the model, optimizer, schedule, scaler and iteration count from `path`; the epoch to start at."""
    state = torch.load(path, map_location=trainer.runtime.device, weights_only=True)
    trainer.models.plain.load_state_dict(state["model"], strict=True)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["lr_scheduler"])
    if trainer.scaler is not None and state["scaler"] is not None:
        trainer.scaler.load_state_dict(state["scaler"])
    trainer.iteration = state["iteration"]
    return state["epoch"] + 1


class EpochLog:
    """log.csv and log.jsonl in `directory`, one row per epoch with LOG_COLUMNS; started afresh unless `append`
    (a resumed run continues the files)."""

    def __init__(self, directory: Path, append: bool) -> None:
        self.csv_path = directory / "log.csv"
        self.jsonl_path = directory / "log.jsonl"
        if not (append and self.csv_path.exists()):
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(LOG_COLUMNS)
            self.jsonl_path.write_text("")

    def write(self, row: dict) -> None:
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, LOG_COLUMNS).writerow(row)
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps({column: row[column] for column in LOG_COLUMNS}) + "\n")
