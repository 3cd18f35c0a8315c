"""The training and validation data: an ImageFolder root, CIFAR-10 as torchvision reads it, or random images
(torchvision.datasets.FakeData), each process reading its own shard."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets
from torchvision import transforms as T

from .runtime import Runtime

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The validation images are resized to this multiple of the crop size, then center-cropped (224 from 256).
RESIZE_FOR_CROP = 256 / 224
SYNTHETIC_VAL_FRACTION = 4  # --synthetic validates on a quarter as many batches as it trains on


@dataclass
class Data:
    train: DataLoader
    val: DataLoader
    train_sampler: DistributedSampler
    num_classes: int


class SubtractPixelMean:
    """Subtracts a per-pixel mean image from an image tensor (He et al. 2015's CIFAR normalization)."""

    def __init__(self, mean: torch.Tensor) -> None:
        self.mean = mean

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image - self.mean


def build_data(args: argparse.Namespace, runtime: Runtime) -> Data:
    """The loaders: the training set shuffled anew each epoch (DistributedSampler.set_epoch) and split over the
    processes; the validation set split over them without repeats, so that the summed metrics are exact."""
    if args.synthetic:
        train, val, num_classes = _synthetic(args, runtime.world_size)
    elif args.dataset == "cifar10":
        train, val, num_classes = _cifar10(args)
    else:
        train, val, num_classes = _image_folder(args)
    sampler = DistributedSampler(train, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True,
                                 seed=args.seed)
    common = {"batch_size": args.batch_size, "num_workers": args.workers, "pin_memory": runtime.device.type == "cuda",
              "persistent_workers": args.workers > 0}
    # Full batches only: every step sees the same number of images, and BatchNorm never gets a batch of one.
    train_loader = DataLoader(train, sampler=sampler, drop_last=True, **common)
    if len(train_loader) == 0:
        raise SystemExit(f"--batch-size {args.batch_size}: larger than a process's share of the training set "
                         f"({len(sampler)} images)")
    val_indices = list(range(runtime.rank, len(val), runtime.world_size))
    val_loader = DataLoader(val, sampler=val_indices, **common)
    return Data(train_loader, val_loader, sampler, num_classes)


def _synthetic(args: argparse.Namespace, world_size: int) -> tuple[Dataset, Dataset, int]:
    shape = (3, args.image_size, args.image_size)
    per_batch = args.batch_size * world_size
    train_size = args.synthetic_batches * per_batch
    val_size = max(1, args.synthetic_batches // SYNTHETIC_VAL_FRACTION) * per_batch
    to_tensor = T.ToTensor()
    train = datasets.FakeData(train_size, shape, args.num_classes, transform=to_tensor, random_offset=args.seed)
    # FakeData draws image i from seed i + random_offset: the validation images start after the training ones.
    val = datasets.FakeData(val_size, shape, args.num_classes, transform=to_tensor,
                            random_offset=args.seed + train_size)
    return train, val, args.num_classes


def _cifar10(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    """He et al. 2015, §4.2: 32x32 images with the per-pixel mean (over the training set) subtracted; in
    training, 4 pixels of padding on each side, a random 32x32 crop and a random horizontal flip."""
    train = datasets.CIFAR10(args.data, train=True, download=False)
    mean = torch.from_numpy(train.data).float().div_(255).mean(0).permute(2, 0, 1).contiguous()
    normalize = [T.ToTensor(), SubtractPixelMean(mean)]
    # The crop pads the mean-subtracted image with zeros: with the mean.
    train.transform = T.Compose([*normalize, T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()])
    val = datasets.CIFAR10(args.data, train=False, download=False, transform=T.Compose(normalize))
    return train, val, len(train.classes)


def _image_folder(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    """torchvision's ImageNet training preset: random-resized crops and flips; center crops for validation."""
    size = args.image_size
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = datasets.ImageFolder(
        args.data / "train", T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *normalize]))
    val = datasets.ImageFolder(
        args.data / "val", T.Compose([T.Resize(round(size * RESIZE_FOR_CROP)), T.CenterCrop(size), *normalize]))
    if val.classes != train.classes:
        raise SystemExit(f"--data: expected the same class folders in {args.data / 'train'} and "
                         f"{args.data / 'val'}, got {train.classes} and {val.classes}")
    return train, val, len(train.classes)
