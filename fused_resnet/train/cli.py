"""The command line of ``python -m fused_resnet.train``: the options, the recipes, and the checks that reject a bad
--arch or --data before anything is built (argparse's error: the usage, a message naming the argument, exit 2)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from ..backends import BACKENDS
from ..memory import MEMORY_POLICIES

TORCHVISION_ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
    "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
)
CIFAR_ARCH = re.compile(r"cifar_resnet(\d+)")
TIMM_PREFIX = "timm:"
CIFAR_FOLDER = "cifar-10-batches-py"  # what torchvision.datasets.CIFAR10 reads under its root

# The values of the options a recipe may set when neither the recipe nor the command line gives one.
DEFAULTS = {
    "epochs": 90, "iterations": None, "batch_size": 32, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
    "lr_milestones": [30, 60], "lr_gamma": 0.1, "schedule_unit": "epoch", "warmup_iterations": 0, "warmup_lr": None,
    "image_size": None,
}

# He et al. 2015, "Deep Residual Learning for Image Recognition", §4.2 (CIFAR-10): SGD with momentum 0.9, weight
# decay 1e-4, mini-batches of 128, learning rate 0.1 divided by 10 at 32k and 48k iterations, 64k iterations in
# all. The augmentation (4-pixel padding, random 32x32 crops, horizontal flips, per-pixel mean subtracted) is what
# --dataset cifar10 always does (see data.py).
RECIPES = {
    "he2015-cifar": {
        "batch_size": 128, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "iterations": 64000,
        "lr_milestones": [32000, 48000], "lr_gamma": 0.1, "schedule_unit": "iteration", "image_size": 32,
    },
}
# For ResNet-110 "the initial learning rate of 0.1 is slightly too large to start converging. So we use 0.01 to
# warm up the training until the training error is below 80% (about 400 iterations), and then go back to 0.1."
# The recipe warms up for a fixed 400 iterations, the paper's approximation. The 1202-layer network is "trained as
# described above", so it warms up too.
HE2015_WARMUP = {"warmup_iterations": 400, "warmup_lr": 0.01}
HE2015_WARMUP_MIN_DEPTH = 110


def default_workers() -> int:
    """4 data-loading processes, at most one per CPU this process may use (more only contend with the training
    threads, and DataLoader warns about them)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, cpus)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fused_resnet.train",
        description="Train a ResNet with fused_resnet's blocks (or torchvision's, with --no-fused). Run it under "
                    "torchrun for DistributedDataParallel (one process per GPU; gloo on the CPU).",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--arch", default="resnet18",
                       help=f"{', '.join(TORCHVISION_ARCHS)}; cifar_resnet<depth> (depth 6n+2: 20, 32, 44, 56, "
                            "110, 1202); or timm:<name> with timm installed (default: resnet18)")
    model.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                       help="fused_resnet's blocks (default), or with --no-fused the plain model: torchvision's or "
                            "timm's own; a cifar_resnet on the pure-PyTorch reference composite (backend 'torch')")
    model.add_argument("--backend", choices=BACKENDS, default=None,
                       help="the fused ops' backend (default: FUSED_RESNET_BACKEND, else auto)")
    model.add_argument("--memory", choices=MEMORY_POLICIES, default=None,
                       help="the fused model's memory policy of training: min keeps under half of torchvision's "
                            "activations for backward, at the cost of recomputing each block's last convolution "
                            "(default: FUSED_RESNET_MEMORY, else default)")
    model.add_argument("--sync-bn", action="store_true", help="BatchNorm statistics over all processes")
    model.add_argument("--channels-last", action="store_true", help="the model and its inputs in channels_last")
    model.add_argument("--compile", action="store_true", help="torch.compile the model")
    model.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="torch.autocast in this dtype")

    data = parser.add_argument_group("data (one of --data DIR and --synthetic)")
    data.add_argument("--data", type=Path, default=None,
                      help="an ImageFolder root with train/ and val/ subfolders; with --dataset cifar10, the root "
                           f"torchvision.datasets.CIFAR10 reads ({CIFAR_FOLDER}/ inside; nothing is downloaded)")
    data.add_argument("--dataset", choices=("imagefolder", "cifar10"), default="imagefolder",
                      help="how to read --data (default: imagefolder)")
    data.add_argument("--synthetic", action="store_true", help="random images and labels instead of --data")
    data.add_argument("--synthetic-batches", type=_positive_int, default=10,
                      help="training batches per epoch and process with --synthetic (default: 10)")
    data.add_argument("--num-classes", type=_positive_int, default=10, help="classes with --synthetic (default: 10)")
    data.add_argument("--image-size", type=_positive_int, default=None,
                      help="training crop size (default: 32 for CIFAR data and cifar_resnet, else 224)")
    data.add_argument("--workers", type=_non_negative_int, default=default_workers(),
                      help="data loading processes (default: 4, or the CPUs this process may run on if fewer: "
                           f"{default_workers()} here)")

    optim = parser.add_argument_group("optimization (SGD with momentum; a recipe sets these unless given)")
    optim.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                       help="he2015-cifar: He et al. 2015's CIFAR-10 schedule (lr 0.1, momentum 0.9, weight decay "
                            "1e-4, batch 128, lr /10 at 32k and 48k iterations, 64k iterations; a 400-iteration "
                            "warm-up at lr 0.01 for cifar_resnet110 and deeper)")
    optim.add_argument("--epochs", type=_positive_int, default=None, help=f"default: {DEFAULTS['epochs']}")
    optim.add_argument("--iterations", type=_positive_int, default=None,
                       help="train for this many optimizer steps in all instead of whole --epochs")
    optim.add_argument("--batch-size", type=_positive_int, default=None,
                       help=f"per process (default: {DEFAULTS['batch_size']})")
    optim.add_argument("--lr", type=_positive_float, default=None, help=f"default: {DEFAULTS['lr']}")
    optim.add_argument("--momentum", type=_non_negative_float, default=None, help=f"default: {DEFAULTS['momentum']}")
    optim.add_argument("--weight-decay", type=_non_negative_float, default=None,
                       help=f"default: {DEFAULTS['weight_decay']}")
    optim.add_argument("--lr-milestones", type=_non_negative_int, nargs="*", default=None,
                       help="multiply the learning rate by --lr-gamma at each of these (in --schedule-unit; "
                            "default: 30 60)")
    optim.add_argument("--lr-gamma", type=_positive_float, default=None, help=f"default: {DEFAULTS['lr_gamma']}")
    optim.add_argument("--schedule-unit", choices=("epoch", "iteration"), default=None,
                       help="what --lr-milestones count (default: epoch); the schedule steps every iteration")
    optim.add_argument("--warmup-iterations", type=_non_negative_int, default=None,
                       help="run the first iterations at --warmup-lr (default: 0)")
    optim.add_argument("--warmup-lr", type=_positive_float, default=None, help="the warm-up learning rate")

    run = parser.add_argument_group("run")
    run.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    run.add_argument("--output-dir", type=Path, default=Path("train_output"),
                     help="where checkpoint.pth, log.csv and log.jsonl go (default: train_output)")
    run.add_argument("--resume", type=Path, default=None, help="a checkpoint.pth to continue from")
    run.add_argument("--seed", type=int, default=0, help="model initialization and data order (default: 0)")
    run.add_argument("--print-freq", type=_positive_int, default=10,
                     help="refresh the progress bar's loss every this many iterations (default: 10)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options, with the recipe's and the defaults' values where the command line gives none; exits as
    argparse does (status 2, a message naming the argument) when the arguments cannot make a run."""
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = {name for name, value in vars(args).items() if value is not None}
    settings = dict(DEFAULTS)
    if args.recipe is not None:
        settings.update(RECIPES[args.recipe])
        if args.recipe == "he2015-cifar" and _cifar_depth(args.arch) >= HE2015_WARMUP_MIN_DEPTH:
            settings.update(HE2015_WARMUP)
        if "epochs" in explicit and "iterations" not in explicit:
            settings["iterations"] = None  # an explicit length replaces the recipe's
    for name, value in settings.items():
        if name not in explicit:
            setattr(args, name, value)
    if args.image_size is None:
        args.image_size = 32 if args.dataset == "cifar10" or CIFAR_ARCH.fullmatch(args.arch) else 224
    _check(parser, args)
    return args


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _check_arch(parser, args.arch)
    if args.synthetic == (args.data is not None):
        parser.error("expected exactly one of --data DIR and --synthetic")
    if args.data is not None:
        _check_data(parser, args.data, args.dataset)
    if args.dataset == "cifar10" and args.image_size != 32:
        parser.error(f"--image-size: CIFAR-10's images are 32x32, got {args.image_size}")
    if args.warmup_iterations and args.warmup_lr is None:
        parser.error("--warmup-iterations: expected a --warmup-lr to warm up with")
    if args.warmup_lr is not None and args.warmup_lr > args.lr:
        parser.error(f"--warmup-lr: expected at most --lr ({args.lr}), got {args.warmup_lr}")
    if not args.fused and args.memory is not None:
        parser.error(f"--memory {args.memory}: the fused model's memory policy, which --no-fused does not use")
    if not args.fused and args.backend not in (None, "torch"):
        parser.error(f"--backend {args.backend}: the fused ops' backend, which --no-fused does not use")
    if args.device is not None:
        _check_device(parser, args.device)
    if args.resume is not None and not args.resume.is_file():
        parser.error(f"--resume: expected a checkpoint file, {args.resume} is not one")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.sync_bn and not args.fused and distributed:
        if CIFAR_ARCH.fullmatch(args.arch):
            parser.error("--sync-bn: the unfused cifar_resnet runs on the reference composite, which does not "
                         "synchronize BatchNorm statistics; use --fused")
        if args.device == "cpu" or (args.device is None and not torch.cuda.is_available()):
            parser.error("--sync-bn with --no-fused needs CUDA: torch.nn.SyncBatchNorm does not run on the CPU "
                         "(fused_resnet's fused ops do: use --fused)")


def _check_arch(parser: argparse.ArgumentParser, arch: str) -> None:
    expected = (f"expected one of {', '.join(TORCHVISION_ARCHS)}, cifar_resnet<depth> (depth 6n+2 >= 8), or "
                "timm:<name>")
    if arch in TORCHVISION_ARCHS:
        return
    if CIFAR_ARCH.fullmatch(arch):
        depth = _cifar_depth(arch)
        if depth < 8 or (depth - 2) % 6:
            parser.error(f"--arch {arch}: a CIFAR ResNet has 6n+2 layers (20, 32, 44, 56, 110, 1202), not {depth}")
        return
    if arch.startswith(TIMM_PREFIX):
        if importlib.util.find_spec("timm") is None:
            parser.error(f"--arch {arch}: timm is not installed")
        import timm

        name = arch[len(TIMM_PREFIX):]
        if not timm.is_model(name):
            parser.error(f"--arch {arch}: timm has no model named {name!r}")
        return
    parser.error(f"--arch: unknown architecture {arch!r}; {expected}")


def _check_data(parser: argparse.ArgumentParser, root: Path, dataset: str) -> None:
    if not root.is_dir():
        parser.error(f"--data: expected a directory, {root} is not one")
    if dataset == "cifar10":
        if not (root / CIFAR_FOLDER).is_dir():
            parser.error(f"--data: expected CIFAR-10's python version under {root} ({root / CIFAR_FOLDER} is "
                         "missing; torchvision.datasets.CIFAR10's layout, nothing is downloaded)")
        return
    missing = [name for name in ("train", "val") if not (root / name).is_dir()]
    if missing:
        parser.error(f"--data: expected an ImageFolder root with train/ and val/ subfolders; {root} has no "
                     f"{' and no '.join(name + '/' for name in missing)}")


def _check_device(parser: argparse.ArgumentParser, device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError:
        parser.error(f"--device: expected cpu or cuda, got {device!r}")
    if kind not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu or cuda, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")


def _cifar_depth(arch: str) -> int:
    match = CIFAR_ARCH.fullmatch(arch)
    return int(match.group(1)) if match else 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text}")
    return value
