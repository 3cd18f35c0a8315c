"""Whole models: the factories against torchvision's, and convert() on torchvision ResNets end to end.

Equality of the computation is checked in float64, where fused and torchvision agree to rounding. In float32 a
whole ResNet-50's parameter gradients are only determined to about 1e-2 even for torchvision itself (ReLU kinks
and max-pool ties flip with the last bit of an activation), so float32 is checked on outputs and on a few
optimizer steps; the float32 precision of every gradient is checked block by block in test_modules.py."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torchvision
from torch import nn

import fused_resnet
from conftest import CPU_BACKENDS, assert_rel, fused_copy, randomize_batchnorms, rel_err, run_model, to_layout
from fused_resnet import use_backend

FACTORIES = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
             "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]


@pytest.mark.parametrize("name", FACTORIES)
def test_factory_has_torchvision_structure_and_keys(name):
    kwargs = dict(num_classes=10)
    ours, tv = getattr(fused_resnet, name)(**kwargs), getattr(torchvision.models, name)(**kwargs)
    ours_sd, tv_sd = ours.state_dict(), tv.state_dict()
    assert list(ours_sd) == list(tv_sd)
    assert all(ours_sd[k].shape == tv_sd[k].shape for k in tv_sd)
    ours.load_state_dict(tv_sd, strict=True)
    tv.load_state_dict(ours.state_dict(), strict=True)
    assert fused_resnet.unfused_modules(ours) == {}


def test_factory_options_follow_torchvision():
    ours = fused_resnet.resnet50(zero_init_residual=True, replace_stride_with_dilation=[False, True, True])
    tv = torchvision.models.resnet50(zero_init_residual=True, replace_stride_with_dilation=[False, True, True])
    assert all(torch.equal(b.bn3.weight, torch.zeros_like(b.bn3.weight)) for b in ours.modules()
               if isinstance(b, fused_resnet.Bottleneck))
    assert [m.dilation for m in ours.modules() if isinstance(m, nn.Conv2d)] == \
        [m.dilation for m in tv.modules() if isinstance(m, nn.Conv2d)]
    with pytest.raises(ValueError, match="expected value 32 but got 8"):
        fused_resnet.resnext50_32x4d(groups=8)
    with pytest.raises(ValueError, match="does not download weights"):
        fused_resnet.resnet18(weights="IMAGENET1K_V1")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_converted_model_matches_torchvision_in_float64(backend, name, train, channels_last):
    tv = randomize_batchnorms(getattr(torchvision.models, name)(num_classes=10)).double()
    fused = fused_copy(tv)
    assert type(fused).__name__ == "FusedStemResNet" and isinstance(fused, torchvision.models.ResNet)
    assert fused_resnet.unfused_modules(fused) == {}
    x = to_layout(torch.randn(2, 3, 48, 40, dtype=torch.float64), channels_last)
    with use_backend(backend):
        out, gx, grads, buffers = run_model(fused, x, train)
    ref, rgx, rgrads, rbuffers = run_model(tv, x, train)
    assert_rel(out, ref, 1e-10, "output")
    assert_rel(gx, rgx, 1e-9, "grad x")
    for n in rgrads:
        assert_rel(grads[n], rgrads[n], 1e-9, f"grad {n}")
    for n in rbuffers:
        assert_rel(buffers[n], rbuffers[n], 1e-10, n)


# Winograd's F(4x4, 3x3) rounds a 3x3 layer ~30x more than a direct convolution (4-6e-6 of its largest output
# against ~1.5e-7); through these networks the end error measured 2.5-2.7x torchvision's.
CPU_CONVOLUTION_BOUNDS = {"direct": 2, "auto": 4}  # the bound's multiple of torchvision's error


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("convolutions", ["direct", "auto"])
def test_converted_model_outputs_match_in_float32(backend, name, channels_last, convolutions):
    """Float32 outputs and running statistics are as close to the exact (float64) ones as torchvision's are, with
    direct convolutions: in training a ResNet-50 at this size normalizes layer4 over 8 values per channel, which
    amplifies rounding to ~1e-4 for torchvision too. With the cpu backend's Winograd convolutions ("auto"), within
    twice that."""
    tv = randomize_batchnorms(getattr(torchvision.models, name)(num_classes=10))
    fused, exact = fused_copy(tv), copy.deepcopy(tv).double()
    x = to_layout(torch.randn(2, 3, 64, 64), channels_last)

    def close_as_torchvision(ours, theirs, truth, what):
        bound = CPU_CONVOLUTION_BOUNDS[convolutions] * rel_err(theirs, truth) + 1e-6
        assert rel_err(ours, truth) <= bound, f"{what}: {rel_err(ours, truth):.2e} > {bound:.2e}"

    for train in (True, False):
        for grad_enabled in (True, False):
            for model in (tv, fused, exact):
                model.train(train)
            with torch.set_grad_enabled(grad_enabled):
                with use_backend(backend), fused_resnet.use_cpu_convolutions(convolutions):
                    out = fused(x)
                theirs, truth = tv(x), exact(x.double())
            close_as_torchvision(out, theirs, truth, f"output (train={train}, grad={grad_enabled})")
    for (n, b), rb, eb in zip(fused.named_buffers(), tv.buffers(), exact.buffers()):
        close_as_torchvision(b, rb, eb, n)


def record_block_layouts(model):
    """{"layer1": its output's layout, "avgpool input": the last stage's features' layout}, filled by hooks."""
    layouts = {}
    model.layer1.register_forward_hook(
        lambda module, args, out: layouts.__setitem__("layer1", "cl" if to_layout(out, True) is out else "nchw"))
    model.avgpool.register_forward_pre_hook(
        lambda module, args: layouts.__setitem__("avgpool input", "nchw" if args[0].is_contiguous() else "other"))
    return layouts


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the cpu backend is not available here")
def test_nchw_input_runs_inference_channels_last_and_returns_nchw():
    """In inference on the cpu backend an NCHW input runs in channels_last (oneDNN's faster layout, the weights
    folded in it once) from the stem to the last stage, whose features go back to NCHW: the same values as a
    channels_last input's, after one exact conversion."""
    tv = randomize_batchnorms(torchvision.models.resnet18(num_classes=10)).eval()
    fused, fused_for_cl = fused_copy(tv), fused_copy(tv)
    layouts = record_block_layouts(fused)
    x = torch.randn(2, 3, 64, 64)
    with use_backend("cpu"), torch.no_grad():
        out, out_cl = fused(x), fused_for_cl(to_layout(x, True))
        expected = tv(x)
    assert layouts == {"layer1": "cl", "avgpool input": "nchw"}
    assert torch.equal(out, out_cl)
    assert_rel(out, expected, 1e-4)


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="the cpu backend is not available here")
@pytest.mark.parametrize("convolutions", ["auto", "direct"])
@pytest.mark.parametrize("train", [False, True])
def test_nchw_input_under_autograd_keeps_nchw_parameters_and_gradients(train, convolutions):
    """Under autograd (training, or eval with gradients) an NCHW input's blocks run channels_last where the cpu
    backend's GEMMs may run ("auto"), which read the NCHW weights as they are and give NCHW weight gradients; with
    oneDNN's convolutions alone ("direct") in the input's own layout, as torchvision's model does, since oneDNN
    would convert each weight in every call. Either way the features come back NCHW, the input gradient and every
    parameter gradient are NCHW, and they agree with torchvision's."""
    tv = randomize_batchnorms(torchvision.models.resnet18(num_classes=10)).train(train)
    fused = fused_copy(tv)
    layouts = record_block_layouts(fused)
    x = torch.randn(2, 3, 64, 64)
    with use_backend("cpu"), fused_resnet.use_cpu_convolutions(convolutions):
        out, grad_x, grads, buffers = run_model(fused, x, train)
    out_tv, _, grads_tv, buffers_tv = run_model(tv, x, train)
    assert layouts == {"layer1": "cl" if convolutions == "auto" else "nchw", "avgpool input": "nchw"}
    assert grad_x.is_contiguous()
    assert_rel(out, out_tv, 1e-4)
    # (Not torchvision's float32 input gradient: at this size a rounding difference flips a ReLU kink in about 1 draw
    # in 6 and moves the whole input gradient by 1e-2, on either side; block tests check the gradients' accuracy.)
    for name, grad in grads.items():
        assert grad.is_contiguous(), f"{name}: laid out as its NCHW parameter"
        assert grad.shape == grads_tv[name].shape, name
    for name, buffer in buffers.items():
        assert_rel(buffer, buffers_tv[name], 1e-4)


def loss_trajectory(model, x, target, backend, steps=5):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        with use_backend(backend):
            loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_training_steps_track_torchvision(backend):
    """Five SGD steps of a converted model follow torchvision's loss trajectory exactly (in float64)."""
    tv = torchvision.models.resnet18(num_classes=5)
    x, target = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    exact = loss_trajectory(copy.deepcopy(tv).double(), x.double(), target, "torch")
    fused64 = loss_trajectory(fused_copy(tv).double(), x.double(), target, backend)
    assert exact[-1] < exact[0], "the model should learn this batch"
    assert all(abs(a - b) <= 1e-9 * exact[0] for a, b in zip(fused64, exact)), (fused64, exact)
    # No float32 trajectory here: rounding amplified by the kinks of ReLU makes torchvision's own float32 drift
    # from the exact trajectory reach 2e-2 of the loss in 5 steps (1 draw in 36), while a 10% error in every BN
    # bias gradient drifts only 2e-3; such a check could not tell. Float32 gradients are checked block by block.


def test_checkpoints_load_both_ways_and_models_pickle():
    tv = randomize_batchnorms(torchvision.models.resnet18(num_classes=7))
    fused = fused_copy(tv).eval()
    assert list(fused.state_dict()) == list(tv.state_dict())
    fresh_tv = torchvision.models.resnet18(num_classes=7)
    fresh_tv.load_state_dict(fused.state_dict(), strict=True)
    fresh_fused = fused_resnet.resnet18(num_classes=7)
    fresh_fused.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = tv.eval()(x)
        buffer = io.BytesIO()
        torch.save(fused, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert type(loaded) is type(fused)
        for model in (fresh_tv.eval(), fresh_fused.eval(), loaded, pickle.loads(pickle.dumps(fused)), copy.deepcopy(fused)):
            assert_rel(model(x), expected, 1e-5)


def test_convert_swaps_blocks_in_place_and_keeps_tensors():
    tv = torchvision.models.resnet50()
    params = {n: p for n, p in tv.named_parameters()}
    fused = fused_resnet.convert(tv)
    assert fused is tv
    assert all(p is params[n] for n, p in fused.named_parameters())
    kinds = {type(m).__name__ for m in fused.modules()}
    assert "Bottleneck" in kinds and all(type(b) is fused_resnet.Bottleneck for b in fused.layer1)


def test_convert_reports_what_it_cannot_fuse():
    class CustomBlock(torchvision.models.resnet.BasicBlock):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(torchvision.models.resnet.BasicBlock(4, 4), CustomBlock(4, 4),
                          torchvision.ops.Conv2dNormActivation(4, 4, norm_layer=nn.InstanceNorm2d))
    with pytest.warns(fused_resnet.FusionWarning) as record:
        fused_resnet.convert(model)
    message = str(record[0].message)
    assert "1: CustomBlock subclasses torchvision's BasicBlock" in message
    assert "2: 1 is a InstanceNorm2d" in message
    assert type(model[0]) is fused_resnet.BasicBlock and type(model[1]) is CustomBlock


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="convert: expected a torch.nn.Module, got dict"):
        fused_resnet.convert({"conv": 1})
