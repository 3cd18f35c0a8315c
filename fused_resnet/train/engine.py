"""The optimization: SGD with an iteration-stepped learning-rate schedule, one training epoch, and validation."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import ChainedScheduler, ConstantLR, LRScheduler, MultiStepLR
from torch.utils.data import DataLoader
from tqdm import tqdm

from .model import Models
from .runtime import Runtime

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOP_K = 5


@dataclass
class Trainer:
    models: Models
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler | None
    runtime: Runtime
    args: argparse.Namespace
    iteration: int = 0  # optimizer steps taken so far, over all epochs
    total_iterations: int = 0  # where training stops

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.args.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.runtime.device.type, dtype=AMP_DTYPES[self.args.amp])

    def to_device(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory_format = torch.channels_last if self.args.channels_last else torch.contiguous_format
        device = self.runtime.device
        return (images.to(device, non_blocking=True, memory_format=memory_format),
                targets.to(device, non_blocking=True))


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """SGD with momentum; weight decay on every parameter, as in He et al. 2015."""
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, milestones: Sequence[int], gamma: float,
                    warmup_iterations: int = 0, warmup_lr: float | None = None) -> LRScheduler:
    """The learning rate per iteration (the scheduler steps after every optimizer step): times `gamma` at each
    milestone iteration, and `warmup_lr` for the first `warmup_iterations`."""
    schedulers: list[LRScheduler] = [MultiStepLR(optimizer, list(milestones), gamma)]
    if warmup_iterations:
        base_lr = optimizer.param_groups[0]["lr"]
        schedulers.insert(0, ConstantLR(optimizer, factor=warmup_lr / base_lr, total_iters=warmup_iterations))
    return ChainedScheduler(schedulers, optimizer)


def milestone_iterations(args: argparse.Namespace, iterations_per_epoch: int) -> list[int]:
    """--lr-milestones in iterations."""
    scale = iterations_per_epoch if args.schedule_unit == "epoch" else 1
    return [milestone * scale for milestone in args.lr_milestones]


def train_one_epoch(trainer: Trainer, loader: DataLoader, epoch: int) -> dict[str, float]:
    """One pass over this process's shard (or fewer steps, where the run's last iteration comes first); the mean
    training loss over every process's images and the images per second of all processes together."""
    runtime, args = trainer.runtime, trainer.args
    model = trainer.models.train
    model.train()
    criterion = nn.CrossEntropyLoss()
    # Summed on the device: reading the loss every step would wait for the GPU every step.
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    images_seen = 0
    start = time.perf_counter()
    steps = min(len(loader), trainer.total_iterations - trainer.iteration)
    bar = tqdm(itertools.islice(loader, steps), total=steps, desc=f"epoch {epoch}", disable=not runtime.is_main,
               dynamic_ncols=True)
    for step, (images, targets) in enumerate(bar):
        images, targets = trainer.to_device(images, targets)
        with trainer.autocast():
            loss = criterion(model(images), targets)
        trainer.optimizer.zero_grad(set_to_none=True)
        if trainer.scaler is not None:
            trainer.scaler.scale(loss).backward()
            trainer.scaler.step(trainer.optimizer)
            trainer.scaler.update()
        else:
            loss.backward()
            trainer.optimizer.step()
        trainer.scheduler.step()
        trainer.iteration += 1
        loss_sum += loss.detach().double() * len(targets)
        images_seen += len(targets)
        if runtime.is_main and (step + 1) % args.print_freq == 0:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{trainer.optimizer.param_groups[0]['lr']:.4g}",
                            img_s=f"{images_seen * runtime.world_size / elapsed:.1f}")
    bar.close()
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    elapsed = time.perf_counter() - start
    totals = runtime.all_reduce_sum(torch.stack([loss_sum, loss_sum.new_tensor(images_seen)]))
    return {"train_loss": (totals[0] / totals[1]).item(), "images_per_s": totals[1].item() / elapsed}


@torch.no_grad()
def evaluate(trainer: Trainer, loader: DataLoader) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy (percent) over the whole validation set, every process's share summed."""
    model = trainer.models.eval
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    sums = torch.zeros(4, dtype=torch.float64, device=trainer.runtime.device)  # loss, top-1, top-k, images
    for images, targets in loader:
        images, targets = trainer.to_device(images, targets)
        with trainer.autocast():
            logits = model(images)
        top = logits.topk(min(TOP_K, logits.shape[1]), dim=1).indices == targets[:, None]
        sums += torch.stack([criterion(logits.float(), targets).double(), top[:, 0].sum().double(),
                             top.any(dim=1).sum().double(), sums.new_tensor(len(targets))])
    loss, top1, top5, count = trainer.runtime.all_reduce_sum(sums).tolist()
    return {"val_loss": loss / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count}
