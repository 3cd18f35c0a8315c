"""The model: built from --arch, fused or not, on its device, synchronized, wrapped for DistributedDataParallel and
compiled; and the plain module whose state_dict the checkpoints hold (torchvision's or timm's keys, no wrapper's
`module.` or `_orig_mod.` prefix)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..cifar import cifar_resnet
from ..convert import convert, convert_sync_batchnorm
from .cli import CIFAR_ARCH, TIMM_PREFIX
from .runtime import Runtime


@dataclass
class Models:
    """One network, three views: `plain` holds the parameters and gives the checkpoint's state_dict; `train` is
    what the training steps call (DistributedDataParallel and torch.compile around it, as asked); `eval` is what
    validation calls (compiled but never DistributedDataParallel, whose forward would wait for the other processes,
    which may validate on one batch fewer)."""

    plain: nn.Module
    train: nn.Module
    eval: nn.Module


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The --arch network with `num_classes` outputs: fused (fused_resnet.convert keeps the original's parameters
    and state_dict keys) or, with --no-fused, the original. A cifar_resnet is always the library's own; unfused it
    runs on the reference composite (see :func:`backend_for`)."""
    depth = CIFAR_ARCH.fullmatch(args.arch)
    if depth:
        return cifar_resnet(int(depth.group(1)), num_classes=num_classes, memory=args.memory)
    if args.arch.startswith(TIMM_PREFIX):
        import timm

        model = timm.create_model(args.arch[len(TIMM_PREFIX):], num_classes=num_classes)
    else:
        import torchvision

        model = getattr(torchvision.models, args.arch)(num_classes=num_classes)
    return convert(model, memory=args.memory) if args.fused else model


def backend_for(args: argparse.Namespace) -> str | None:
    """The fused ops' backend for this run (None: the default choice). An unfused cifar_resnet runs its blocks on
    the ``torch`` backend: torch.nn.functional's convolution, batch_norm and relu under ordinary autograd."""
    if not args.fused and CIFAR_ARCH.fullmatch(args.arch):
        return "torch"
    return args.backend


def prepare(model: nn.Module, args: argparse.Namespace, runtime: Runtime) -> Models:
    """`model` on the run's device and memory format, its BatchNorms synchronized with --sync-bn, wrapped in
    DistributedDataParallel under torchrun and compiled with --compile."""
    model.to(runtime.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    on_cuda = runtime.device.type == "cuda"
    if args.sync_bn and on_cuda:
        model = convert_sync_batchnorm(model)
    train_model = model
    if runtime.distributed:
        train_model = DistributedDataParallel(model, device_ids=[runtime.device.index] if on_cuda else None)
    if args.sync_bn and not on_cuda:
        # DistributedDataParallel refuses to wrap a CPU module holding nn.SyncBatchNorm (which runs only on GPUs);
        # the fused ops synchronize on the CPU too, so the BatchNorms become SyncBatchNorms after the wrapping,
        # keeping the parameter and buffer tensors DistributedDataParallel holds.
        convert_sync_batchnorm(model)
    if args.compile:
        return Models(model, torch.compile(train_model), torch.compile(model))
    return Models(model, train_model, model)


def describe(model: nn.Module, args: argparse.Namespace, runtime: Runtime) -> str:
    """One line on what runs: the network, fused or not, its size, and where."""
    parameters = sum(p.numel() for p in model.parameters())
    sync = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    kind = f"fused (backend {backend_for(args) or 'default'})" if args.fused else "unfused"
    return (f"{args.arch}: {kind}, {parameters / 1e6:.2f}M parameters, {sync} SyncBatchNorm layers, "
            f"{runtime.world_size} process(es) on {runtime.device.type}")
