"""Bad input gets a clear error naming the argument, what was expected and what came, and changes nothing:
no running statistic, num_batches_tracked or parameter moves when a call fails."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fused_resnet
from conftest import ALL_BACKENDS
from fused_resnet import ops, use_backend


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, before):
    after = module.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed by a failed call"


def downsample(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))


CASES = [
    # (description, block factory, input factory, exception type, message pattern)
    ("rank", lambda: fused_resnet.BasicBlock(4, 4), lambda: torch.randn(4, 5, 5),
     ValueError, r"residual_block: expected x to be 4-D \(N, C, H, W\), got a torch.float32 tensor of shape \[4, 5, 5\]"),
    ("channels", lambda: fused_resnet.BasicBlock(4, 4), lambda: torch.randn(2, 3, 5, 5),
     ValueError, r"conv1/bn1.weight of shape \[4, 4, 3, 3\] with groups=1 expects an input with 4 channels, got one of shape \[2, 3, 5, 5\]"),
    ("dtype", lambda: fused_resnet.BasicBlock(4, 4), lambda: torch.randn(2, 4, 5, 5, dtype=torch.float64),
     TypeError, r"expected conv1/bn1.weight of dtype torch.float64 like the input, got a torch.float32 tensor"),
    ("device", lambda: fused_resnet.BasicBlock(4, 4), lambda: torch.randn(2, 4, 5, 5, device="meta"),
     RuntimeError, r"expected conv1/bn1.weight on meta like the input, got a torch.float32 tensor of shape \[4, 4, 3, 3\] on cpu"),
    ("integer input", lambda: fused_resnet.BasicBlock(4, 4), lambda: torch.ones(2, 4, 5, 5, dtype=torch.int64),
     TypeError, r"expected x to be floating-point, got a torch.int64 tensor"),
    ("empty batch", lambda: fused_resnet.BasicBlock(4, 4), lambda: torch.randn(0, 4, 5, 5),
     ValueError, r"expected a non-empty x, got a torch.float32 tensor of shape \[0, 4, 5, 5\]"),
    ("one value per channel", lambda: fused_resnet.BasicBlock(4, 4), lambda: torch.randn(1, 4, 1, 1),
     ValueError, r"Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 4, 1, 1\]\)"),
    ("one value per channel in the downsample", lambda: fused_resnet.BasicBlock(4, 8, 2, downsample(4, 8)),
     lambda: torch.randn(1, 4, 2, 1), ValueError, r"Expected more than 1 value per channel when training"),
    ("empty conv output", lambda: fused_resnet.ConvBNReLU(4, 4, kernel_size=5, padding=0),
     lambda: torch.randn(2, 4, 3, 3), ValueError, r"conv_bn_relu: 0/1 \(kernel \[5, 5\], stride \[1, 1\], padding \[0, 0\], dilation \[1, 1\]\) on an input of shape \[2, 4, 3, 3\] gives an empty output \(-1x-1\)"),
    ("identity shortcut shape", lambda: fused_resnet.BasicBlock(4, 8), lambda: torch.randn(2, 4, 5, 5),
     ValueError, r"an identity shortcut needs the block's output shape \[2, 8, 5, 5\] to equal its input's \[2, 4, 5, 5\]"),
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clearly_and_changes_nothing(backend, case):
    _, make_block, make_input, error, pattern = case
    block = make_block().train()
    before = snapshot(block)
    with use_backend(backend), pytest.raises(error, match=pattern):
        block(make_input())
    assert_unchanged(block, before)


def test_one_value_per_channel_message_is_pytorchs():
    bn = nn.BatchNorm2d(4)
    with pytest.raises(ValueError) as theirs:
        bn(torch.randn(1, 4, 1, 1))
    with pytest.raises(ValueError) as ours:
        ops.batch_norm_act(torch.randn(1, 4, 1, 1), None, None, training=True)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_batch_norm_act_rejects_mismatched_arguments(backend):
    x = torch.randn(2, 4, 3, 3)
    rm, rv = torch.zeros(4), torch.ones(4)
    with use_backend(backend):
        with pytest.raises(ValueError, match=r"batch_norm_act: expected weight to hold 4 per-channel values, got a torch.float32 tensor of shape \[5\]"):
            ops.batch_norm_act(x, rm, rv, torch.ones(5), torch.zeros(4))
        with pytest.raises(ValueError, match=r"expected residual of shape \[2, 4, 3, 3\] like input, got \[2, 4, 3, 2\]"):
            ops.batch_norm_act(x, rm, rv, residual=torch.randn(2, 4, 3, 2))
        with pytest.raises(TypeError, match="expected residual of dtype torch.float32 like input"):
            ops.batch_norm_act(x, rm, rv, residual=x.double())
        with pytest.raises(ValueError, match="running_mean and running_var are required when training=False"):
            ops.batch_norm_act(x, None, None, training=False)
        with pytest.raises(ValueError, match="expected eps > 0, got 0"):
            ops.batch_norm_act(x, rm, rv, eps=0.0)
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))


def test_unavailable_backend_changes_nothing():
    if fused_resnet.backend_status()["triton"] == "available":
        pytest.skip("triton is available here")
    block = fused_resnet.Bottleneck(16, 4, 2, downsample(16, 16)).train()
    before = snapshot(block)
    with use_backend("triton"), pytest.raises(RuntimeError, match="backend 'triton' is not available"):
        block(torch.randn(2, 16, 6, 6))
    assert_unchanged(block, before)


def test_convert_and_unfused_modules_reject_non_modules():
    with pytest.raises(TypeError, match="convert: expected a torch.nn.Module, got str"):
        fused_resnet.convert("resnet50")
    with pytest.raises(TypeError, match="unfused_modules: expected a torch.nn.Module, got int"):
        fused_resnet.unfused_modules(3)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_any_strided_input_is_read_correctly(backend):
    """A non-contiguous view (a slice, a permutation that is neither NCHW nor channels_last) gives the same result
    as its contiguous copy."""
    block = fused_resnet.BasicBlock(6, 6).double()
    reference = copy.deepcopy(block)
    base = torch.randn(2, 8, 9, 7, dtype=torch.float64)
    views = [base[:, 1:7], base.permute(0, 1, 3, 2)[:, :6], base[:, :6, ::2, :]]
    for view in views:
        with use_backend(backend):
            out = block(view)
        with use_backend("torch"):
            expected = reference(view.contiguous())
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
