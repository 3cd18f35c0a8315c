"""The CIFAR-10 networks of He et al. 2015, §4.2, on fused blocks: ResNet-20/32/44/56/110/1202 and their plain
counterparts.

The network is a 3x3 convolution with 16 filters, then three stages of n BasicBlocks (2n 3x3 convolutions) on
feature maps of 16, 32 and 64 channels, the 2nd and 3rd starting with stride 2, then global average pooling and a
linear classifier: 6n + 2 weighted layers. Shortcuts are option A by default (identity, subsampled and
zero-padded when the shape changes: parameter-free), as in the paper's CIFAR experiments; option B projects
(1x1 conv + BN) where the shape changes only; `plain=True` drops the shortcuts.
"""

from __future__ import annotations

from torch import Tensor, nn

from .memory import check_memory_policy, set_memory_policy
from .models import FusedStem
from .modules import BasicBlock, conv3x3
from .ops import FoldedWeights

__all__ = ["CifarResNet", "cifar_resnet"]


class CifarResNet(nn.Module, FusedStem):
    """A 6n+2-layer CIFAR network (see the module docstring). Its stem conv1-bn1-relu runs fused, like the
    ImageNet ResNets'."""

    def __init__(self, depth: int, shortcut: str = "A", num_classes: int = 10, plain: bool = False, *,
                 memory: str | None = None) -> None:
        super().__init__()
        check_memory_policy(memory, "cifar_resnet: memory")
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"cifar_resnet: depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, 1202), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"cifar_resnet: shortcut must be 'A' or 'B', got {shortcut!r}")
        blocks = (depth - 2) // 6
        block_shortcut = "none" if plain else shortcut
        self.depth, self.plain = depth, plain
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        inplanes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            layers = [BasicBlock(inplanes, planes, stride, shortcut=block_shortcut)]
            layers += [BasicBlock(planes, planes, shortcut=block_shortcut) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            inplanes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        self._folded = FoldedWeights()
        # The paper initializes as in its [13] (He et al., "Delving Deep into Rectifiers"): normal with fan-out
        # variance for the convolutions; BatchNorm starts as the identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        set_memory_policy(self, memory)

    def forward(self, x: Tensor) -> Tensor:
        x, entry_format = self.enter_blocks(x)
        x = self.forward_stem(x)
        x = self.leave_blocks(self.layer3(self.layer2(self.layer1(x))), entry_format)
        return self.fc(self.avgpool(x).flatten(1))


def cifar_resnet(depth: int, shortcut: str = "A", num_classes: int = 10, plain: bool = False, *,
                 memory: str | None = None) -> CifarResNet:
    """The paper's CIFAR ResNet of `depth` = 6n+2 layers (20, 32, 44, 56, 110, 1202); `shortcut` "A" or "B";
    `plain=True` for the plain network of the same depth; `memory` its memory policy (fused_resnet.memory). See
    :class:`CifarResNet`."""
    return CifarResNet(depth, shortcut, num_classes, plain, memory=memory)
