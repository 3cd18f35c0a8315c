"""Activation memory of training: the bytes autograd keeps for backward per image, fused vs torchvision, for the
blocks of the size and whole models (resnet50, which the target is set on, always), measured the same way on every
device: saved-tensor hooks on one training forward, each storage counted once (see
``measure.saved_for_backward_bytes``). On a GPU each row also records the peak allocated memory of a training
step. torch.compile is left out: its saved tensors would be measured on another compiled graph than the timed one,
and its peak memory is in the timed rows."""

from __future__ import annotations

import pytest

from benchmarks.harness import Layout, Provider, session_of
from benchmarks.measure import to_benchmark_layout
from benchmarks.report_targets import TARGET_MODEL
from benchmarks.test_blocks import BlockCase, block_inputs, cases_of_size
from benchmarks.test_models import build_model, cross_entropy_backward, model_inputs


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "block_case" in metafunc.fixturenames:
        cases = cases_of_size(metafunc.config.getoption("--size"))
        metafunc.parametrize("block_case", cases, ids=[case.test_id for case in cases])
    if "model_name" in metafunc.fixturenames:
        models = list(dict.fromkeys([*session_of(metafunc.config).size.models, TARGET_MODEL]))
        metafunc.parametrize("model_name", models)


def test_block_memory(block_case: BlockCase, layout: Layout, eager_provider: Provider, size, device,
                      measure_memory) -> None:
    block = eager_provider.prepare(to_benchmark_layout(block_case.build(), device, layout))
    x, grad_out = block_inputs(block_case, size.block_batch, device, layout)
    measure_memory(block, x, lambda out: out.backward(grad_out), eager_provider, case=block_case.label, layout=layout)


def test_model_memory(model_name: str, model_layout: Layout, eager_provider: Provider, size, device,
                      measure_memory) -> None:
    model = eager_provider.prepare(build_model(model_name, device, model_layout))
    x, labels = model_inputs(size.model_batch, size.model_resolution, device, model_layout)
    measure_memory(model, x, cross_entropy_backward(labels), eager_provider,
                   case=f"{model_name} @{size.model_resolution}", layout=model_layout,
                   details={"model": model_name, "resolution": size.model_resolution})
