"""Mixed precision: under torch.autocast (CPU, bf16) fused blocks behave like torchvision's: convolutions in the
autocast dtype, BatchNorm statistics and parameters in fp32, the output dtype torchvision gives, fp32 gradients
for fp32 parameters, and an error against float64 within 2x of torchvision's own."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import fused_resnet
from conftest import CPU_BACKENDS, fused_copy, randomize_batchnorms, rel_err
from fused_resnet import use_backend

pytestmark = pytest.mark.skipif(not CPU_BACKENDS, reason="no fused backend runs on the CPU here")

BLOCKS = {
    "basic": lambda: torchvision.models.resnet.BasicBlock(16, 16),
    "bottleneck-projection": lambda: torchvision.models.resnet.Bottleneck(
        16, 8, 2, nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))),
}


def run(model, x, mode, backend):
    model.train(mode == "train")
    xi = x.clone().requires_grad_(mode != "inference")
    with torch.autocast("cpu", dtype=torch.bfloat16), use_backend(backend), torch.set_grad_enabled(mode != "inference"):
        out = model(xi)
    if mode != "inference":
        out.float().sum().backward()
    return out, xi.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("mode", ["train", "eval-grad", "inference"])
def test_blocks_under_autocast_behave_like_torchvision(backend, name, mode):
    tv = randomize_batchnorms(BLOCKS[name]())
    fused, exact = fused_copy(tv), copy.deepcopy(tv).double()
    x = torch.randn(4, 16, 8, 8)
    out, gx = run(fused, x, mode, backend)
    ref, rgx = run(tv, x, mode, "torch")
    exact.train(mode == "train")
    truth = exact(x.double())
    assert out.dtype == ref.dtype == torch.bfloat16
    assert rel_err(out, truth) <= 2 * rel_err(ref, truth) + 1e-3
    if mode != "inference":
        assert gx.dtype == rgx.dtype == torch.float32
        for (pname, p), q in zip(fused.named_parameters(), tv.parameters()):
            assert p.grad.dtype == q.grad.dtype == torch.float32, pname
        for (bname, b), r in zip(fused.named_buffers(), tv.buffers()):
            assert b.dtype == r.dtype, bname


def test_training_with_a_grad_scaler():
    """GradScaler's loop (scale, backward, unscale, step, update) on a converted model under autocast."""
    model = fused_resnet.convert(torchvision.models.resnet18(num_classes=4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    x, target = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
