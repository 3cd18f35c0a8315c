"""A converted model's float32 training step rounds no more than torchvision's, so that its gradients are as accurate.

Why the forward's rounding, and not each gradient's distance from float64 in one step: a ReLU input that lies within
rounding of zero can land on the other side in float32 than in float64, and where BatchNorm normalizes over few
values (layer4 of a resnet18 at batch 4 and 96x96 pixels: 3x3 pixels x 4 images) one such flip moves that channel's
BatchNorm gradients by a few percent, and every gradient behind it. Which elements flip is a lottery, for
torchvision's float32 too: measured here (20 seeds of resnet18 at 96x96, batch 4, NCHW), a step's worst gradient was
more than 4x torchvision's distance from float64 in 9 of 20 steps with the fused model's direct convolutions and in
15 of 20 with Winograd's, while torchvision's was more than 4x the fused model's in 4 and 2 of the same steps; in
resnet50s torchvision's own float32 flips 2-10 block outputs per step. A per-step bound on every gradient fails at
random for any float32 path that is not bitwise torchvision's. What decides how often a path flips is how far its
forward is from the exact one, which has no lottery in it: a flipped element is near zero, so it moves the forward by
near nothing. That distance is bounded here, for every block output and the logits of a training step.

The reference is torchvision in the input's own layout: on an AVX-512 CPU oneDNN's channels_last convolutions round
about twice as much as its NCHW ones (torchvision resnet18 at 96x96: 2.4e-6 against 1.3e-6 of the exact block
outputs), so each layout is held to its own. An NCHW model's blocks train channels_last on the cpu backend, but each
forward convolution runs as a GEMM or as oneDNN's NCHW convolution, never oneDNN's channels_last one (docs/design.md
§4; with it resnet18 at 96x96 measured 1.3-1.7x torchvision's NCHW distance, and failed here). Winograd's F(4x4, 3x3) in training
(use_cpu_convolutions("winograd"), channels_last only) measured 1.7-2.3x torchvision's distance (resnet18) and fails
here in channels_last. The forward runs with autograd recording, as in a training step: under no_grad a model's
blocks run channels_last whatever the input's layout (inference's preferred layout)."""

from __future__ import annotations

import copy
import re
import statistics

import pytest
import torch
import torchvision
from torch import nn

from conftest import CPU_BACKENDS, fused_copy, randomize_batchnorms, rel_err, to_layout
from fused_resnet import use_backend

BOUND = 1.5  # the multiple of torchvision's distance from float64 in the same layout
SEEDS = 3
CASES = [  # (model, batch, height, width): small images (layer4 at 2x2 pixels) and larger ones (3x3)
    ("resnet18", 4, 48, 40), ("resnet18", 4, 96, 96),
    ("resnet50", 4, 48, 40), ("resnet50", 2, 96, 96),
    ("resnext50_32x4d", 2, 48, 40), ("resnext50_32x4d", 2, 96, 96),
    ("wide_resnet50_2", 2, 48, 40), ("wide_resnet50_2", 2, 96, 96),
]


def training_forward(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """{block name: its output, "logits": the model's} of a training step's forward (train mode, autograd recording,
    as a training loop runs it), in float64. The hooks sit on the blocks themselves, not on their submodules, so they
    leave a fused block fused."""
    outputs, handles = {}, []
    for name, module in model.named_modules():
        if re.fullmatch(r"layer\d\.\d+", name):
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: outputs.__setitem__(name, out.detach().double())))
    try:
        outputs["logits"] = model.train()(x).detach().double()
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def distance(outputs: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    """The median over the block outputs and logits of their relative distance from the exact ones."""
    return statistics.median(rel_err(outputs[name], exact[name]) for name in exact)


def flips(outputs: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> int:
    """How many block-output elements the ReLU zeroed in one and not the other."""
    return sum(int(((outputs[n] > 0) != (exact[n] > 0)).sum()) for n in exact if n != "logits")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name,batch,height,width", CASES, ids=[f"{c[0]}-{c[2]}x{c[3]}" for c in CASES])
def test_a_training_step_rounds_no_more_than_torchvision(backend, channels_last, name, batch, height, width):
    held, report = 0, []
    for seed in range(SEEDS):
        generator = torch.Generator().manual_seed(torch.initial_seed() + seed)
        tv = randomize_batchnorms(getattr(torchvision.models, name)(num_classes=10), generator)
        x = torch.randn(batch, 3, height, width, generator=generator)
        exact = training_forward(copy.deepcopy(tv).double(), x.double())
        theirs = training_forward(copy.deepcopy(tv), to_layout(x, channels_last))
        with use_backend(backend):
            ours = training_forward(fused_copy(tv), to_layout(x, channels_last))
        ratio = distance(ours, exact) / distance(theirs, exact)
        held += ratio <= BOUND
        report.append(f"seed {seed}: {distance(ours, exact):.2e} from float64, {ratio:.2f}x torchvision's; "
                      f"block-output ReLU flips against float64 {flips(ours, exact)}, torchvision's "
                      f"{flips(theirs, exact)}")
    assert held >= 2, f"within {BOUND}x torchvision's distance in {held} of {SEEDS} seeds:\n" + "\n".join(report)
