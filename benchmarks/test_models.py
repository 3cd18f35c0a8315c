"""Whole models: torchvision's resnet18 and resnet50 vs fused_resnet.convert of the same model (same weights),
a training step (forward, cross-entropy, backward, SGD step) and an inference forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from benchmarks.conftest import (
    Provider, eval_step, memory_format_name, random_activation, to_benchmark_layout, train_step,
)

NUM_CLASSES = 1000

MODELS_BY_SIZE = {
    "smoke": ["resnet18"],  # at the smoke size's tiny resolution
    "default": ["resnet18", "resnet50"],
    "full": ["resnet18", "resnet50"],
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model_name" in metafunc.fixturenames:
        metafunc.parametrize("model_name", MODELS_BY_SIZE[metafunc.config.getoption("--size")])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_model(model_name: str, mode: str, provider: Provider, size, device, measure) -> None:
    layout = dict(device=device, dtype=size.dtype, channels_last=size.channels_last)
    reference = torchvision.models.get_model(model_name, weights=None, num_classes=NUM_CLASSES)
    model = provider.prepare(to_benchmark_layout(reference, **layout))
    batch, resolution = size.model_batch, size.model_resolution
    x = random_activation((batch, 3, resolution, resolution), **layout)
    if mode == "train":
        labels = torch.randint(NUM_CLASSES, (batch,), device=device)
        step = train_step(model, x, lambda logits: F.cross_entropy(logits, labels).backward(), provider, device)
    else:
        step = eval_step(model, x, provider, device)
    measure(step, suite="models", case=f"{model_name} @{resolution}", mode=mode, provider=provider.name,
            is_reference=provider.is_reference, images=batch, memory_format=memory_format_name(size.channels_last),
            dtype=size.dtype)
