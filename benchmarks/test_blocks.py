"""One residual block at a time, at the stage shapes of ResNet-18/34 (BasicBlock) and ResNet-50 (Bottleneck):
a training step (forward, backward, SGD step) and an inference forward, torchvision vs fused (same weights)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from benchmarks.harness import REFERENCE, Layout, Provider
from benchmarks.measure import mode_step, random_activation, to_benchmark_layout


@dataclasses.dataclass(frozen=True)
class BlockCase:
    """A torchvision block as a ResNet stage builds it; `resolution` is the input's height and width."""

    kind: str  # "BasicBlock" or "Bottleneck"
    inplanes: int
    planes: int
    resolution: int
    stride: int = 1

    @property
    def out_channels(self) -> int:
        return self.planes * (4 if self.kind == "Bottleneck" else 1)

    @property
    def has_projection(self) -> bool:
        """torchvision's `downsample` (1x1 conv + BN) whenever the shape changes: a stage's first block."""
        return self.stride != 1 or self.inplanes != self.out_channels

    @property
    def _shape(self) -> str:
        """The stage shape: output channels (Bottleneck: inplanes/planes) @ output resolution."""
        out_resolution = self.resolution // self.stride
        if self.kind == "BasicBlock":
            return f"{self.out_channels}@{out_resolution}"
        return f"{self.inplanes}/{self.planes}@{out_resolution}"

    @property
    def label(self) -> str:
        """What the summary table shows."""
        first = f" first (proj, stride {self.stride})" if self.has_projection else ""
        return f"{self.kind} {self._shape}{first}"

    @property
    def test_id(self) -> str:
        """The pytest id: no spaces, so that node ids can be pasted on a command line."""
        return f"{self.kind}-{self._shape}" + (f"-first-s{self.stride}" if self.has_projection else "")

    def build(self) -> nn.Module:
        downsample = None
        if self.has_projection:
            downsample = nn.Sequential(
                tv_resnet.conv1x1(self.inplanes, self.out_channels, self.stride), nn.BatchNorm2d(self.out_channels)
            )
        block_class = tv_resnet.BasicBlock if self.kind == "BasicBlock" else tv_resnet.Bottleneck
        return block_class(self.inplanes, self.planes, self.stride, downsample)


BASIC = "BasicBlock"
BOTTLENECK = "Bottleneck"

# Every block shape of the four stages: the repeated (identity-shortcut) block, and the stage's first block with
# its projection shortcut (ResNet-18/34 have none in stage 1; ResNet-50's stage-1 first block widens 64 -> 256).
ALL_CASES = {
    case.label: case
    for case in [
        BlockCase(BASIC, 64, 64, 56),
        BlockCase(BASIC, 128, 128, 28),
        BlockCase(BASIC, 256, 256, 14),
        BlockCase(BASIC, 512, 512, 7),
        BlockCase(BASIC, 64, 128, 56, stride=2),
        BlockCase(BASIC, 128, 256, 28, stride=2),
        BlockCase(BASIC, 256, 512, 14, stride=2),
        BlockCase(BOTTLENECK, 256, 64, 56),
        BlockCase(BOTTLENECK, 512, 128, 28),
        BlockCase(BOTTLENECK, 1024, 256, 14),
        BlockCase(BOTTLENECK, 2048, 512, 7),
        BlockCase(BOTTLENECK, 64, 64, 56),
        BlockCase(BOTTLENECK, 256, 128, 56, stride=2),
        BlockCase(BOTTLENECK, 512, 256, 28, stride=2),
        BlockCase(BOTTLENECK, 1024, 512, 14, stride=2),
    ]
}

# On a CPU, an early and a late stage of each kind, one of them through a projection shortcut (smoke: one of each
# kind, as it runs every layout). The GPU size runs every shape.
CASES_BY_SIZE = {
    "smoke": [
        "BasicBlock 512@7 first (proj, stride 2)",
        "Bottleneck 256/64@56",
    ],
    "default": [
        "BasicBlock 64@56",
        "BasicBlock 512@7",
        "BasicBlock 128@28 first (proj, stride 2)",
        "Bottleneck 256/64@56",
        "Bottleneck 2048/512@7",
        "Bottleneck 256/128@28 first (proj, stride 2)",
    ],
    "full": list(ALL_CASES),
}


def cases_of_size(size_name: str) -> list[BlockCase]:
    return [ALL_CASES[label] for label in CASES_BY_SIZE[size_name]]


def block_inputs(block_case: BlockCase, batch: int, device, layout: Layout):
    """(an input of the block, a gradient of its output)."""
    x = random_activation((batch, block_case.inplanes, block_case.resolution, block_case.resolution), device, layout)
    out_resolution = block_case.resolution // block_case.stride
    grad_out = random_activation((batch, block_case.out_channels, out_resolution, out_resolution), device, layout)
    return x, grad_out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "block_case" in metafunc.fixturenames:
        cases = cases_of_size(metafunc.config.getoption("--size"))
        metafunc.parametrize("block_case", cases, ids=[case.test_id for case in cases])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_block(block_case: BlockCase, mode: str, layout: Layout, provider: Provider, size, device, measure,
               bench_session) -> None:
    block = provider.prepare(to_benchmark_layout(block_case.build(), device, layout))
    x, grad_out = block_inputs(block_case, size.block_batch, device, layout)

    def backward(out: torch.Tensor) -> None:
        out.backward(grad_out)

    step = mode_step(mode, block, x, backward, provider, device)
    reference_step = None
    if bench_session.paired and not provider.is_reference:
        torch.manual_seed(0)  # the provider's weights (the _seeded fixture)
        reference = to_benchmark_layout(block_case.build(), device, layout)
        reference_step = mode_step(mode, reference, x, backward, REFERENCE, device)
    measure(step, suite="blocks", case=block_case.label, mode=mode, provider=provider.name,
            is_reference=provider.is_reference, images=size.block_batch, layout=layout,
            reference_step=reference_step)
