"""``python -m fused_resnet.train``: trains a ResNet with fused_resnet's blocks, or torchvision's for an A/B run
(--no-fused), on an ImageFolder root, CIFAR-10 or random images; under torchrun with DistributedDataParallel.

    python -m fused_resnet.train --arch resnet50 --data /path/to/imagenet --amp bf16 --channels-last
    python -m fused_resnet.train --arch resnet18 --synthetic --no-fused           # the unfused baseline
    python -m fused_resnet.train --recipe he2015-cifar --arch cifar_resnet110 --dataset cifar10 --data DIR
    torchrun --nproc_per_node 8 -m fused_resnet.train --arch resnet50 --data DIR --sync-bn

Each epoch ends with a row in --output-dir's log.csv and log.jsonl and a checkpoint.pth (see :mod:`.records`)
whose model state_dict is the plain torchvision (timm, cifar_resnet) model's. ``python -m fused_resnet.train -h``
lists the options.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Sequence

import torch

from ..backends import use_backend
from . import runtime as runtimes
from .cli import parse_args
from .data import build_data
from .engine import Trainer, build_optimizer, build_scheduler, evaluate, milestone_iterations, train_one_epoch
from .model import backend_for, build_model, describe, prepare
from .records import EpochLog, load_checkpoint, peak_memory_mib, reset_peak_memory, save_checkpoint

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line `argv` (sys.argv's by default); 0 when training finished."""
    args = parse_args(argv)
    runtime = runtimes.start(args.device)
    try:
        backend = backend_for(args)
        with use_backend(backend) if backend is not None else contextlib.nullcontext():
            train(args, runtime)
    finally:
        runtimes.stop(runtime)
    return 0


def train(args: argparse.Namespace, runtime: runtimes.Runtime) -> None:
    """Builds everything, resumes if asked, and trains to the last epoch (or iteration)."""
    torch.manual_seed(args.seed)  # the same initial model on every process
    data = build_data(args, runtime)
    models = prepare(build_model(args, data.num_classes), args, runtime)
    iterations_per_epoch = len(data.train)
    total = args.iterations if args.iterations is not None else args.epochs * iterations_per_epoch
    optimizer = build_optimizer(models.plain, args)
    scheduler = build_scheduler(optimizer, milestone_iterations(args, iterations_per_epoch), args.lr_gamma,
                                args.warmup_iterations, args.warmup_lr)
    scaler = torch.amp.GradScaler(runtime.device.type) if args.amp == "fp16" else None
    trainer = Trainer(models, optimizer, scheduler, scaler, runtime, args, total_iterations=total)
    start_epoch = load_checkpoint(trainer, args.resume) if args.resume is not None else 0
    epochs = math.ceil(total / iterations_per_epoch)
    if runtime.is_main:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        log = EpochLog(args.output_dir, append=args.resume is not None)
        print(f"{describe(models.plain, args, runtime)}; epochs {start_epoch}..{epochs - 1} of "
              f"{iterations_per_epoch} iterations, {total} iterations in all", flush=True)
    for epoch in range(start_epoch, epochs):
        data.train_sampler.set_epoch(epoch)
        reset_peak_memory(runtime.device)
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        row = {"epoch": epoch, **train_one_epoch(trainer, data.train, epoch), **evaluate(trainer, data.val)}
        if runtime.is_main:
            row.update(iteration=trainer.iteration, lr=lr, peak_memory_mib=peak_memory_mib(runtime.device),
                       epoch_time_s=time.perf_counter() - started)
            log.write(row)
            save_checkpoint(trainer, epoch)
            print(f"epoch {epoch}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
                  f"top-1 {row['top1']:.2f}%, top-5 {row['top5']:.2f}%, {row['images_per_s']:.1f} images/s",
                  flush=True)
