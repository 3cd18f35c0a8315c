"""The degradation experiment of He et al. 2015 (§4.2, Figure 6) on a small bundled data set.

Trains plain-20 and plain-56 (no shortcuts) and ResNet-20 and ResNet-56 (option A shortcuts), the paper's CIFAR
networks built from fused blocks, on scikit-learn's handwritten digits (1,797 8x8 images, shipped inside the
package: nothing is downloaded), upsampled. Writes the training and test error of every epoch as a CSV and a PNG
in the style of Figure 6: the paper's finding is that the deeper plain network trains to a *higher* training
error than the shallower one, while the deeper ResNet does not. Whether that shows at this scale is what the
run reports.

    python -m fused_resnet.experiments.degradation                  # a few minutes on a 2-core CPU
    python -m fused_resnet.experiments.degradation --resolution 32 --epochs 160 --device cuda   # closer to the paper
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cifar import cifar_resnet

DEFAULT_OUT = Path("degradation")


def load_digits(resolution: int, seed: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits, upsampled to `resolution`, as 3-channel images normalized over the training set;
    a stratified 75/25 split: (train images, train labels, test images, test labels)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target)
    train_idx, test_idx = train_test_split(
        range(len(labels)), test_size=0.25, random_state=seed, stratify=digits.target)
    x_train, x_test = images[train_idx], images[test_idx]
    mean, std = x_train.mean(), x_train.std()
    to_rgb = lambda x: ((x - mean) / std).expand(-1, 3, -1, -1).contiguous().to(device)
    return to_rgb(x_train), labels[train_idx].to(device), to_rgb(x_test), labels[test_idx].to(device)


@torch.no_grad()
def error_rate(model: torch.nn.Module, images: Tensor, labels: Tensor, batch_size: int) -> float:
    """Top-1 error in eval mode (running statistics), in percent."""
    model.eval()
    wrong = sum((model(images[i:i + batch_size]).argmax(1) != labels[i:i + batch_size]).sum().item()
                for i in range(0, len(labels), batch_size))
    return 100.0 * wrong / len(labels)


def train(name: str, model: torch.nn.Module, data: tuple[Tensor, ...], args: argparse.Namespace, progress) -> list[dict]:
    """SGD as in the paper (momentum 0.9, weight decay 1e-4, learning rate 0.1 divided by 10 at 50% and 75% of
    training), one row of errors per epoch."""
    x_train, y_train, x_test, y_test = data
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[args.epochs // 2, args.epochs * 3 // 4], gamma=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    rows, iteration = [], 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        for batch in torch.randperm(len(y_train), generator=generator).split(args.batch_size):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
            iteration += 1
        schedule.step()
        row = {"model": name, "epoch": epoch, "iteration": iteration,
               "train_error": error_rate(model, x_train, y_train, 512),
               "test_error": error_rate(model, x_test, y_test, 512)}
        rows.append(row)
        progress.set_postfix_str(f"{name} epoch {epoch}: train {row['train_error']:.2f}% test {row['test_error']:.2f}%")
        progress.update(1)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Figure 6's layout: plain networks left, ResNets right; thin dashed lines training error, bold test error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, family in zip(axes, ("plain", "ResNet")):
        names = sorted({r["model"] for r in rows if r["model"].startswith(family)}, key=lambda n: int(n.split("-")[1]))
        for color, name in zip(("tab:orange", "tab:red", "tab:blue", "tab:green"), names):
            mine = [r for r in rows if r["model"] == name]
            iterations = [r["iteration"] for r in mine]
            ax.plot(iterations, [r["train_error"] for r in mine], "--", color=color, linewidth=1, label=f"{name} train")
            ax.plot(iterations, [r["test_error"] for r in mine], "-", color=color, linewidth=2.2, label=f"{name} test")
        ax.set_title(family)
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("error (%)")
    axes[0].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 56], help="6n+2 depths to compare")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--resolution", type=int, default=16, help="upsampled image size (the paper's CIFAR: 32)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for degradation.csv and .png")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    from tqdm import tqdm

    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    data = load_digits(args.resolution, args.seed, device)
    runs = [(f"{'plain' if plain else 'ResNet'}-{depth}", depth, plain) for plain in (True, False)
            for depth in args.depths]
    rows = []
    start = time.perf_counter()
    with tqdm(total=len(runs) * args.epochs, unit="epoch") as progress:
        for name, depth, plain in runs:
            torch.manual_seed(args.seed)
            model = cifar_resnet(depth, "A", num_classes=10, plain=plain).to(device)
            rows += train(name, model, data, args, progress)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "degradation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    title = (f"digits upsampled to {args.resolution}x{args.resolution}, {args.epochs} epochs, "
             f"{len(data[1])} training images, {device.type}")
    plot(rows, args.out / "degradation.png", title)
    print(f"{time.perf_counter() - start:.0f} s; wrote {args.out / 'degradation.csv'} and {args.out / 'degradation.png'}")
    for name, _, _ in runs:
        final = [r for r in rows if r["model"] == name][-1]
        print(f"  {name:10s} final training error {final['train_error']:6.2f}%  test error {final['test_error']:6.2f}%")
    return rows


if __name__ == "__main__":
    main()
