"""Compulsory memory traffic (benchmarks/traffic.py): the bytes every op of a model's train and eval step must read
and write, the convolutions apart, per provider, counted on fake tensors at the model benchmarks' batch and
resolution in each model layout; and the device's copy bandwidth, at which the report times the non-convolution
bytes beside the measured step. Every fused backend that can run here is counted, interpreted or not (the count
runs no kernel); the providers' list and what is left out are in the run's header."""

from __future__ import annotations

import pytest
import torch

from benchmarks import traffic
from benchmarks.harness import FP32_NCHW, Layout, Provider, session_of
from benchmarks.measure import synchronize

# The copy the bandwidth is measured on: far beyond the last-level cache (an H100's L2 is 50 MB, a server CPU's L3
# tens of MB), and affordable in memory and time on a CPU.
COPY_BYTES = {"cuda": 2**30, "cpu": 2**28}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    session = session_of(metafunc.config)
    if "counted_provider" in metafunc.fixturenames:
        counted, _ = traffic.counted_providers(session.device)
        metafunc.parametrize("counted_provider", counted, ids=[p.name for p in counted])
    if "model_name" in metafunc.fixturenames:
        metafunc.parametrize("model_name", session.size.models)  # the size's, or --models


@pytest.mark.parametrize("mode", traffic.MODES)
def test_traffic(model_name: str, mode: str, model_layout: Layout, counted_provider: Provider, size, device,
                 bench_session) -> None:
    batch, resolution = size.model_batch, size.model_resolution
    counted = traffic.count_model_step(model_name, counted_provider, mode, model_layout, batch, resolution, device)
    bench_session.rows.append(traffic.traffic_row(
        counted, model_name=model_name, resolution=resolution, batch=batch, mode=mode, provider=counted_provider,
        layout=model_layout, device=device, row_info=bench_session.row_info))


def test_copy_bandwidth(size, device, measure) -> None:
    """Bytes read and written per second by a copy of a large tensor: the speed of the memory-bound passes."""
    source = torch.randn(COPY_BYTES[device.type] // 4, device=device)
    target = torch.empty_like(source)

    def step() -> None:
        target.copy_(source)
        synchronize(device)

    measure(step, suite="bandwidth", case=f"copy {source.nbytes // 2**20} MiB", mode="copy", provider="torch copy_",
            is_reference=True, images=1, layout=FP32_NCHW, bytes_moved=2 * source.nbytes, rounds=size.op_rounds)
