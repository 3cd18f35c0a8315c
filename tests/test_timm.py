"""convert() on timm's ResNet family: the same state_dict keys (strict loads both ways), and timm's outputs,
gradients and running statistics in float64, in training and in eval; blocks it cannot fuse left as they are
and reported."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fused_resnet
from conftest import CPU_BACKENDS, assert_rel, randomize_batchnorms, run_model, to_layout
from fused_resnet import TimmBasicBlock, TimmBottleneck, use_backend

timm = pytest.importorskip("timm")
timm_resnet = timm.models.resnet

MODELS = ["resnet18", "resnet26", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "resnet50d"]
# Narrow stages keep the float64 runs short; the architecture (blocks, stem, downsamples) is the named model's.
NARROW = {"channels": (8, 16, 24, 32), "stem_width": 8}
NARROW_RESNEXT = {"channels": (32, 32, 64, 64), "stem_width": 8}  # 32 groups need widths of 32 and more


def converted(model: nn.Module) -> nn.Module:
    """A converted deep copy of `model`, without the FusionWarning of the blocks convert() is known to leave."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fused_resnet.FusionWarning)
        return fused_resnet.convert(copy.deepcopy(model))


def timm_blocks(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (timm_resnet.BasicBlock, timm_resnet.Bottleneck))}


def fused_block_count(model: nn.Module) -> int:
    return sum(isinstance(m, (TimmBasicBlock, TimmBottleneck)) for m in model.modules())


@pytest.mark.parametrize("name", MODELS)
def test_converted_timm_model_keeps_its_keys_and_reports_what_it_leaves(name):
    original = timm.create_model(name, num_classes=10)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fused = fused_resnet.convert(copy.deepcopy(original))
    assert type(fused).__name__ == "FusedTimmResNet" and isinstance(fused, timm_resnet.ResNet)
    assert fused_block_count(fused) == len(timm_blocks(original))
    assert [w.message for w in record if issubclass(w.category, fused_resnet.FusionWarning)] == []
    assert fused_resnet.unfused_modules(fused) == {}
    assert list(fused.state_dict()) == list(original.state_dict())
    fused.load_state_dict(original.state_dict(), strict=True)
    fresh = timm.create_model(name, num_classes=10)
    fresh.load_state_dict(fused.state_dict(), strict=True)


def assert_same_step(fused, original, x, train, backend):
    with use_backend(backend):
        out, gx, grads, buffers = run_model(fused, x, train)
    ref, rgx, rgrads, rbuffers = run_model(original, x, train)
    assert_rel(out, ref, 1e-10, "output")
    assert_rel(gx, rgx, 1e-9, "grad x")
    assert list(grads) == list(rgrads)
    for n in rgrads:
        assert_rel(grads[n], rgrads[n], 1e-9, f"grad {n}", floor=1e-6)
    for n in rbuffers:
        assert_rel(buffers[n], rbuffers[n], 1e-10, n)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_converted_timm_model_matches_timm_in_float64(backend, name):
    narrow = NARROW_RESNEXT if name.startswith("resnext") else NARROW
    original = randomize_batchnorms(timm.create_model(name, num_classes=5, **narrow)).double()
    fused = converted(original)
    assert fused_resnet.unfused_modules(fused) == {}
    # An odd input size: the deep stem, the strided blocks and the avg-pool downsample's ceil mode all see it.
    x = to_layout(torch.randn(2, 3, 35, 29, dtype=torch.float64), channels_last=name == "resnet50d")
    for train in (True, False):
        assert_same_step(fused, original, x, train, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_timm_deep_stem_runs_as_one_op(backend):
    """The deep stem's three conv-BN-ReLU units run as one fused op (the stem's output comes from the fused
    BN-ReLU node); a hook on one of its modules makes it run timm's modules instead, and says so."""
    fused = converted(timm.create_model("resnet50d", num_classes=5, **NARROW))
    stem_outputs = []
    fused.maxpool.register_forward_pre_hook(lambda m, i: stem_outputs.append(i[0]))
    with use_backend(backend):
        fused.train()(torch.randn(2, 3, 16, 16, requires_grad=True))
    assert "BatchNormActFunction" in type(stem_outputs[0].grad_fn).__name__
    called = []
    fused.conv1[4].register_forward_hook(lambda m, i, o: called.append(m))
    assert "conv1.4 has hooks" in fused_resnet.unfused_modules(fused)["(the model)"]
    with use_backend(backend):
        fused(torch.randn(2, 3, 16, 16, requires_grad=True))
    assert called == [fused.conv1[4]]


@pytest.mark.parametrize("case", ["se", "anti-aliasing", "silu"])
def test_blocks_with_what_cannot_be_fused_are_left_to_timm_and_reported(case):
    name, kwargs, reason, carries_it = {
        "se": ("seresnet18", {}, "se is a SEModule", lambda block: True),
        # Anti-aliasing replaces the stride of the strided blocks only.
        "anti-aliasing": ("resnet18", {"aa_layer": timm.layers.BlurPool2d}, "aa is a BlurPool2d",
                          lambda block: block.stride == 2),
        "silu": ("resnet26", {"act_layer": nn.SiLU}, "act1 is a SiLU", lambda block: True),
    }[case]
    original = randomize_batchnorms(timm.create_model(name, num_classes=5, **NARROW, **kwargs)).double()
    with pytest.warns(fused_resnet.FusionWarning) as record:
        fused = fused_resnet.convert(copy.deepcopy(original))
    message = str(record[0].message)
    blocks = timm_blocks(original)
    left = [n for n, m in blocks.items() if carries_it(m)]
    assert 0 < len(left) and fused_block_count(fused) == len(blocks) - len(left)
    assert all(type(fused.get_submodule(n)) is type(blocks[n]) for n in left)
    assert all(f"{block}: {reason}" in message for block in left), message
    unfused = fused_resnet.unfused_modules(fused)
    assert all(reason in unfused[block] for block in left)
    # 4 images of 40x40: layer4's BatchNorms normalize over 16 values per channel. Over the 2 values of 2 images at
    # 20x20, training BatchNorm's gradient is so ill-conditioned that two exact-in-algebra float64 evaluations (the
    # fused backward's and autograd's) differed by 2e-8 relative for some seeds.
    x = torch.randn(4, 3, 40, 40, dtype=torch.float64)
    for train in (True, False):
        assert_same_step(fused, original, x, train, CPU_BACKENDS[0] if CPU_BACKENDS else "torch")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_depth_fuses_in_eval_and_runs_timm_in_training(backend):
    original = randomize_batchnorms(
        timm.create_model("resnet26", num_classes=5, drop_path_rate=0.3, drop_block_rate=0.2, **NARROW)).double()
    with pytest.warns(fused_resnet.FusionWarning, match="runs unfused while training") as record:
        fused = fused_resnet.convert(copy.deepcopy(original))
    assert "layer4.1: runs unfused while training (drop_block drops" in str(record[0].message)
    assert fused_block_count(fused) == 8
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert fused_resnet.unfused_modules(fused.eval()) == {}
    assert_same_step(fused, original, x, False, backend)
    training = fused_resnet.unfused_modules(fused.train())
    assert "drop_path drops with probability" in training["layer1.1"] and "layer1.0" not in training
    # Unfused in training means timm's own forward, random draws included.
    for seed in (1, 2):
        torch.manual_seed(seed)
        with use_backend(backend):
            out, gx, grads, buffers = run_model(fused, x, True)
        torch.manual_seed(seed)
        ref, rgx, rgrads, rbuffers = run_model(original, x, True)
        assert_rel(out, ref, 1e-10, "output")
        assert_rel(gx, rgx, 1e-9, "grad x")
        for n in rgrads:
            assert_rel(grads[n], rgrads[n], 1e-9, f"grad {n}", floor=1e-6)
        for n in rbuffers:
            assert_rel(buffers[n], rbuffers[n], 1e-10, n)


BLOCKS = {
    "basic-projection": (TimmBasicBlock, timm_resnet.BasicBlock, lambda: dict(
        inplanes=6, planes=12, stride=2, downsample=timm_resnet.downsample_conv(6, 12, 1, stride=2))),
    "bottleneck-3x3-projection": (TimmBottleneck, timm_resnet.Bottleneck, lambda: dict(
        inplanes=8, planes=4, stride=2, downsample=timm_resnet.downsample_conv(8, 16, 3, stride=2))),
    "bottleneck-avg-identity-pool": (TimmBottleneck, timm_resnet.Bottleneck, lambda: dict(
        inplanes=8, planes=4, downsample=timm_resnet.downsample_avg(8, 16, 1, stride=1))),
    "bottleneck-avg-pool": (TimmBottleneck, timm_resnet.Bottleneck, lambda: dict(
        inplanes=8, planes=4, stride=2, downsample=timm_resnet.downsample_avg(8, 16, 1, stride=2))),
    "resnext-dilated": (TimmBottleneck, timm_resnet.Bottleneck, lambda: dict(
        inplanes=32, planes=8, cardinality=4, base_width=16, dilation=2, reduce_first=2)),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_fused_timm_blocks_take_timms_constructor(backend, name):
    fused_class, timm_class, kwargs = BLOCKS[name]
    torch.manual_seed(0)
    ours = fused_class(**kwargs())
    torch.manual_seed(0)
    theirs = timm_class(**kwargs())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    randomize_batchnorms(theirs).double()
    ours.double().load_state_dict(theirs.state_dict(), strict=True)
    assert fused_resnet.unfused_modules(ours) == {}
    x = torch.randn(3, theirs.conv1.in_channels, 9, 7, dtype=torch.float64)
    for train in (True, False):
        assert_same_step(ours, theirs, x, train, backend)
