"""Checkpoints of converted models: whole modules through torch.save/torch.load (in this process and in a fresh
one), and state_dict round trips with torchvision and timm (strict, both ways, weights_only loads)."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

import fused_resnet
from conftest import assert_rel, randomize_batchnorms

timm = pytest.importorskip("timm")

NARROW = {"channels": (8, 16, 24, 32), "stem_width": 8}


def torchvision_model():
    return torchvision.models.resnet18(num_classes=5)


def frozen_bn_model():
    return torchvision.models.resnet18(num_classes=5, norm_layer=FrozenBatchNorm2d)


def timm_model():
    return timm.create_model("resnet50d", num_classes=5, **NARROW)


FACTORIES = {"torchvision": torchvision_model, "frozen-bn": frozen_bn_model, "timm": timm_model}


def converted(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fused_resnet.FusionWarning)  # resnet50d's avg-pool downsamples
        return fused_resnet.convert(model)


def trained(model, x):
    """`model` after two SGD steps in training mode (so running statistics and num_batches_tracked moved)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), torch.arange(x.shape[0]) % 5)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    return model


def saved(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_whole_module_round_trip_keeps_class_state_and_training(kind):
    x = torch.randn(4, 3, 24, 24)
    model = trained(converted(randomize_batchnorms(FACTORIES[kind]())), x)
    loaded = torch.load(saved(model), weights_only=False)
    assert type(loaded) is type(model)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    assert fused_resnet.unfused_modules(loaded) == fused_resnet.unfused_modules(model)
    assert_same_state(loaded, model)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))
    # Training goes on identically: the same next step from the same state.
    trained(loaded, x)
    trained(model, x)
    assert_same_state(loaded, model)


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_state_dict_round_trips_with_the_original_library(kind):
    x = torch.randn(4, 3, 24, 24)
    original = randomize_batchnorms(FACTORIES[kind]())
    model = trained(converted(copy.deepcopy(original)), x)
    # Fused → original library, through a weights_only file, strict.
    fresh_original = FACTORIES[kind]()
    fresh_original.load_state_dict(torch.load(saved(model.state_dict()), weights_only=True), strict=True)
    assert_same_state(fresh_original, model)
    # Original library → a freshly converted model, strict.
    trained(original, x)
    fresh_fused = converted(FACTORIES[kind]())
    fresh_fused.load_state_dict(torch.load(saved(original.state_dict()), weights_only=True), strict=True)
    assert_same_state(fresh_fused, original)
    with torch.no_grad():
        assert_rel(fresh_fused.eval()(x), original.eval()(x), 1e-5)
        assert_rel(fresh_original.eval()(x), model.eval()(x), 1e-5)


def test_a_fresh_process_loads_a_converted_timm_model(tmp_path):
    """Unpickling finds fused_resnet.convert.FusedTimmResNet and the timm blocks without any convert() call."""
    model = converted(randomize_batchnorms(timm_model())).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.save({"model": model, "x": x}, tmp_path / "model.pt")
    script = (
        "import sys, torch\n"
        "saved = torch.load(sys.argv[1], weights_only=False)\n"
        "model = saved['model']\n"
        "assert type(model).__qualname__ == 'FusedTimmResNet', type(model)\n"
        "import fused_resnet\n"
        "assert fused_resnet.unfused_modules(model) == {}\n"
        "with torch.no_grad():\n"
        "    torch.save(model(saved['x']), sys.argv[2])\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(fused_resnet.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "model.pt"), str(tmp_path / "out.pt")],
                   check=True, env=env, timeout=120)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt"), model(x))
