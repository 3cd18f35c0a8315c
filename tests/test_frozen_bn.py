"""torchvision's FrozenBatchNorm2d (detection and segmentation backbones) in fused blocks: an eval-mode BatchNorm
in every mode of the module, with its own eps, whose statistics never change, while gradients still reach the
input and the convolutions; convert() fuses the blocks and stems built with it."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops.misc import Conv2dNormActivation, FrozenBatchNorm2d

import fused_resnet
from conftest import CPU_BACKENDS, assert_rel, fused_copy, to_layout
from fused_resnet import use_backend

pytestmark = pytest.mark.skipif(not CPU_BACKENDS, reason="no fused backend runs on the CPU here")


def randomize_frozen(model: nn.Module) -> nn.Module:
    """Non-trivial statistics and affine values in every FrozenBatchNorm2d (they start as the identity)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape) * 0.2)
                m.running_mean.copy_(torch.randn(m.running_mean.shape) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape) + 0.5)
    return model


def step(model, x, mode, seed=0):
    """Forward (and backward against a gradient drawn from `seed`) in `mode`; returns what to compare."""
    model.train(mode == "train")
    model.zero_grad()
    xi = x.clone().requires_grad_(mode != "inference")
    with torch.set_grad_enabled(mode != "inference"):
        out = model(xi)
    if mode != "inference":
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype))
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out, xi.grad, grads


def assert_matches(fused, reference, x, backend):
    """Same outputs, input gradient and parameter gradients (every conv weight and the classifier) in each mode,
    and the frozen statistics untouched by either."""
    frozen = {n: b.clone() for n, b in reference.named_buffers()}
    for mode in ("train", "eval-grad", "inference"):
        with use_backend(backend):
            out, gx, grads = step(fused, x, mode)
        ref, rgx, rgrads = step(reference, x, mode)
        assert_rel(out, ref, 1e-12, f"output ({mode})")
        if mode != "inference":
            assert_rel(gx, rgx, 1e-10, f"grad x ({mode})")
            assert sorted(grads) == sorted(rgrads) == sorted(n for n, _ in reference.named_parameters())
            for n in rgrads:
                assert_rel(grads[n], rgrads[n], 1e-10, f"grad {n} ({mode})", floor=1e-6)
        for model in (fused, reference):
            for n, b in model.named_buffers():
                assert torch.equal(b, frozen[n]), f"{n} changed ({mode})"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("name", "channels_last"), [("resnet18", False), ("resnet50", True)])
def test_converted_frozen_bn_resnet_matches_torchvision(backend, name, channels_last):
    reference = randomize_frozen(getattr(torchvision.models, name)(num_classes=5, norm_layer=FrozenBatchNorm2d))
    reference = reference.double()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fused_resnet.FusionWarning)
        fused = fused_copy(reference)
    assert type(fused).__name__ == "FusedStemResNet" and fused_resnet.unfused_modules(fused) == {}
    assert all(type(b) in (fused_resnet.BasicBlock, fused_resnet.Bottleneck) for b in fused.layer1)
    x = to_layout(torch.randn(2, 3, 33, 27, dtype=torch.float64), channels_last)
    assert_matches(fused, reference, x, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_frozen_bn_keeps_its_eps(backend):
    """A FrozenBatchNorm2d with a large eps, so that taking nn.BatchNorm2d's default instead would show."""
    norm = functools.partial(FrozenBatchNorm2d, eps=0.05)
    downsample = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), norm(16))
    reference = randomize_frozen(tv_resnet.Bottleneck(8, 4, 2, downsample, norm_layer=norm)).double()
    fused = randomize_frozen(fused_resnet.Bottleneck(8, 4, 2, copy.deepcopy(downsample), norm_layer=norm)).double()
    fused.load_state_dict(reference.state_dict(), strict=True)
    assert fused_resnet.unfused_modules(fused) == {}
    assert_matches(fused, reference, torch.randn(3, 8, 9, 7, dtype=torch.float64), backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_frozen_bn_conv_norm_activation_is_fused(backend):
    reference = randomize_frozen(Conv2dNormActivation(4, 6, 3, stride=2, norm_layer=FrozenBatchNorm2d)).double()
    fused = fused_copy(reference)
    assert type(fused) is fused_resnet.ConvBNReLU and fused_resnet.unfused_modules(fused) == {}
    assert_matches(fused, reference, torch.randn(2, 4, 11, 9, dtype=torch.float64), backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_detection_backbone_is_fused(backend):
    """resnet_fpn_backbone: FrozenBatchNorm2d everywhere, the early layers frozen (requires_grad=False), an FPN
    of plain convolutions on top; convert() fuses every residual block and says nothing of the FPN."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    reference = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=2)
    reference = randomize_frozen(reference).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fused_resnet.FusionWarning)
        fused = fused_copy(reference)
    body = fused.body
    blocks = [body.get_submodule(f"layer{i}.{j}") for i in range(1, 5) for j in (0, 1)]
    assert all(type(block) is fused_resnet.BasicBlock for block in blocks)
    x = torch.randn(2, 3, 40, 36, dtype=torch.float64)
    frozen = {n: b.clone() for n, b in reference.named_buffers()}
    for train in (True, False):
        fused.train(train)
        reference.train(train)
        with use_backend(backend):
            features = fused(x)
        expected = reference(x)
        assert list(features) == list(expected)
        for level in expected:
            assert_rel(features[level], expected[level], 1e-12, f"feature {level}")
        loss = sum(f.square().sum() for f in features.values())
        expected_loss = sum(f.square().sum() for f in expected.values())
        fused.zero_grad()
        reference.zero_grad()
        loss.backward()
        expected_loss.backward()
        trained = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
        trained_names = [n for n, _ in trained]
        assert any(n.startswith("body.layer4") for n in trained_names)
        assert not any(n.startswith("body.layer1") for n in trained_names)
        fused_params = dict(fused.named_parameters())
        for n, p in trained:
            assert_rel(fused_params[n].grad, p.grad, 1e-10, f"grad {n}", floor=1e-6)
        assert all(p.grad is None for n, p in fused.named_parameters() if not p.requires_grad)
        for n, b in fused.named_buffers():
            assert torch.equal(b, frozen[n]), n
