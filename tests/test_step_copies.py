"""A converted model's train step copies no more than torchvision's: no per-step conversions of weights, gradients
or activations, no casts of per-channel vectors or scalars. Counted with PyTorch's profiler over one SGD step
(momentum, so that the optimizer's own copies are in both counts), NCHW and channels_last, on the cpu backend.

An NCHW model's blocks train channels_last on the cpu backend, its weights staying NCHW: the GEMMs read them as they
are, while oneDNN's convolution converts a 3x3 or 7x7 weight in each call (forward, backward) and its weight
gradient back. Which of the two runs each convolution is measured on the machine at hand, so the count is taken with
the GEMMs made the faster (CONVOLUTION_CHOICES's measurement replaced): every copy left is then the layout
plumbing's, which is what this test checks; the weight conversions of a layer measured faster with oneDNN are part
of the time that measurement compared."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
import torchvision

import fused_resnet
from fused_resnet import use_backend
from fused_resnet.kernels.native import CONVOLUTION_CHOICES

COPY_OPS = ("aten::copy_", "aten::_to_copy")


def copies_in_a_train_step(model: torch.nn.Module, x: torch.Tensor) -> collections.Counter:
    """{(op, 'scalar' | 'vector' | 'tensor'): calls} over the third of three train steps (the first two make what a
    model makes once: the optimizer's momentum buffers, folded or packed weights)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    step()
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profile:
        step()
    counts = collections.Counter()
    for event in profile.events():
        if event.name in COPY_OPS:
            rank = len(event.input_shapes[0]) if event.input_shapes and event.input_shapes[0] is not None else 0
            counts[event.name, "scalar" if rank == 0 else "vector" if rank == 1 else "tensor"] += 1
    return counts


@pytest.fixture
def gemms_measured_faster(monkeypatch):
    """Every training convolution's choice made afresh, the GEMM timed faster, and forgotten after the test."""
    CONVOLUTION_CHOICES.clear()
    monkeypatch.setattr(CONVOLUTION_CHOICES, "measure",
                        lambda candidates: {name: 1.0 if name == "gemm" else 2.0 for name in candidates})
    yield
    CONVOLUTION_CHOICES.clear()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_a_converted_resnet18_train_step_copies_no_more_than_torchvision(memory_format, gemms_measured_faster):
    """The fused path's own activation copies are counted exactly. In channels_last the last block's output
    gradient comes from the average pool's backward laid out NCHW, which the fused backward makes channels_last like
    the block's tensors (one activation-sized copy a step; torchvision's ReLU backward reads it as it comes). In NCHW
    the image is made channels_last before the stem and the last block's output NCHW again after it, whose gradient
    the fused backward makes channels_last (three copies a step). A projection
    block's two BatchNorms (main path and shortcut) have the same bias gradient, which one reduction computes; the
    cpu kernel set hands each its own tensor (with one shared, AccumulateGrad copied it for the second parameter:
    one vector a projection block)."""
    reference = torchvision.models.resnet18(num_classes=10).to(memory_format=memory_format)
    fused = fused_resnet.convert(copy.deepcopy(reference)).to(memory_format=memory_format)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=memory_format)
    theirs = copies_in_a_train_step(reference.train(), x)
    with use_backend("cpu"):
        ours = copies_in_a_train_step(fused.train(), x)
    assert sum(1 for m in fused.modules() if getattr(m, "downsample", None) is not None) == 3  # projection blocks
    assert fused_resnet.cpu_convolution_choices()  # the GEMMs were candidates
    allowed = {("aten::copy_", "tensor"): 1 if memory_format == torch.channels_last else 3}
    for key in set(ours) | set(theirs):
        assert ours[key] <= theirs[key] + allowed.get(key, 0), \
            f"{key}: {ours[key]} in a fused train step, torchvision's {theirs[key]} (all: {dict(ours)} vs {dict(theirs)})"
