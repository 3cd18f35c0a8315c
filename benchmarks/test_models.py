"""Whole models: torchvision's resnet18 and resnet50 vs fused_resnet.convert of the same model (same weights),
a training step (forward, cross-entropy, backward, SGD step) and an inference forward, in each model layout of
the size (dtype and memory format)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

import fused_resnet
from benchmarks.harness import REFERENCE, Layout, Provider, session_of
from benchmarks.measure import mode_step, random_activation, to_benchmark_layout

NUM_CLASSES = 1000


def build_model(model_name: str, device, layout: Layout) -> torch.nn.Module:
    """A torchvision model with random weights, in the benchmark layout."""
    return to_benchmark_layout(torchvision.models.get_model(model_name, weights=None, num_classes=NUM_CLASSES),
                               device, layout)


def model_inputs(batch: int, resolution: int, device, layout: Layout):
    """(a batch of images, its labels)."""
    return (random_activation((batch, 3, resolution, resolution), device, layout),
            torch.randint(NUM_CLASSES, (batch,), device=device))


def cross_entropy_backward(labels: torch.Tensor):
    """The backward of a classification step, for `mode_step`: the loss in fp32, as under autocast."""
    return lambda logits: F.cross_entropy(logits.float(), labels).backward()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model_name" in metafunc.fixturenames:
        metafunc.parametrize("model_name", session_of(metafunc.config).size.models)  # the size's, or --models


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_model(model_name: str, mode: str, model_layout: Layout, provider: Provider, size, device, measure,
               bench_session) -> None:
    model = provider.prepare(build_model(model_name, device, model_layout))
    batch, resolution = size.model_batch, size.model_resolution
    x, labels = model_inputs(batch, resolution, device, model_layout)
    details = {"model": model_name, "resolution": resolution}
    if provider.is_fused and not provider.compiled:
        # The first step's JIT compiles (the triton backend's kernels) are paid here, outside the timed rounds, and
        # reported: on a GPU, the first-step cost a user meets (README, "The first step").
        with provider.context():
            warm = fused_resnet.warmup(model, x, steps=(mode,))
        details.update(warmup_s=warm.seconds, kernels_compiled=warm.kernels_compiled)
    backward = cross_entropy_backward(labels)
    step = mode_step(mode, model, x, backward, provider, device)
    reference_step = None
    if bench_session.paired and not provider.is_reference:
        torch.manual_seed(0)  # the provider's weights (the _seeded fixture)
        reference = build_model(model_name, device, model_layout)
        reference_step = mode_step(mode, reference, x, backward, REFERENCE, device)
    measure(step, suite="models", case=f"{model_name} @{resolution}", mode=mode, provider=provider.name,
            is_reference=provider.is_reference, images=batch, layout=model_layout,
            details=details, reference_step=reference_step)
