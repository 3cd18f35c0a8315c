"""The paper's CIFAR networks (fused_resnet.cifar_resnet) and the `shortcut` option of the fused blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_resnet
from conftest import ALL_BACKENDS, assert_rel, randomize_batchnorms, to_layout
from fused_resnet import BasicBlock, use_backend

# He et al. 2015, Table 6: parameters of the CIFAR-10 ResNets (option A); the exact counts they round.
PAPER_PARAMETERS = {20: (0.27e6, 269_722), 32: (0.46e6, 464_154), 44: (0.66e6, 658_586), 56: (0.85e6, 853_018),
                    110: (1.7e6, 1_727_962), 1202: (19.4e6, 19_421_274)}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth", list(PAPER_PARAMETERS))
def test_parameter_counts_match_the_paper(depth):
    paper, exact = PAPER_PARAMETERS[depth]
    count = parameter_count(fused_resnet.cifar_resnet(depth))
    assert count == exact
    digits = 2 if paper < 1e6 else 1  # the table gives 0.27M but 1.7M and 19.4M
    assert round(count / 1e6, digits) == round(paper / 1e6, digits)


def test_option_a_is_parameter_free_and_option_b_projects_only_where_the_shape_changes():
    a, b, plain = fused_resnet.cifar_resnet(20, "A"), fused_resnet.cifar_resnet(20, "B"), fused_resnet.cifar_resnet(20, plain=True)
    assert parameter_count(a) == parameter_count(plain)
    assert not any("downsample" in key for key in a.state_dict())
    projections = sorted({key.split(".downsample")[0] for key in b.state_dict() if "downsample" in key})
    assert projections == ["layer2.0", "layer3.0"]
    assert parameter_count(b) - parameter_count(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_depth_and_shortcut_are_checked():
    with pytest.raises(ValueError, match="depth must be 6n\\+2"):
        fused_resnet.cifar_resnet(21)
    with pytest.raises(ValueError, match="shortcut must be 'A' or 'B'"):
        fused_resnet.cifar_resnet(20, "C")
    with pytest.raises(ValueError, match="expected shortcut to be one of"):
        BasicBlock(16, 32, 2, shortcut="C")
    with pytest.raises(ValueError, match="shortcut='A' takes no downsample module"):
        BasicBlock(16, 32, 2, downsample=nn.Sequential(), shortcut="A")
    with pytest.raises(ValueError, match="option A pads channels; it cannot go from 32 to 16"):
        BasicBlock(32, 16, shortcut="A")


# ---------------------------------------------------------------------------------------------------------------
# An unfused reference of the same networks, written plainly (as the CIFAR reproductions of the paper write it),
# with the same module names, so that state_dicts move between the two.


class ReferenceBlock(nn.Module):
    def __init__(self, inplanes, planes, stride, shortcut):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut, self.stride, self.pad = shortcut, stride, (planes - inplanes) // 2
        self.downsample = None
        if shortcut == "B" and (stride != 1 or inplanes != planes):
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.shortcut == "none":
            return F.relu(out)
        if self.downsample is not None:
            return F.relu(out + self.downsample(x))
        if out.shape != x.shape:
            x = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad, out.shape[1] - x.shape[1] - self.pad))
        return F.relu(out + x)


class ReferenceCifarResNet(nn.Module):
    def __init__(self, depth, shortcut, plain):
        super().__init__()
        n = (depth - 2) // 6
        kind = "none" if plain else shortcut
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(*[ReferenceBlock(16, 16, 1, kind) for _ in range(n)])
        self.layer2 = nn.Sequential(ReferenceBlock(16, 32, 2, kind), *[ReferenceBlock(32, 32, 1, kind) for _ in range(n - 1)])
        self.layer3 = nn.Sequential(ReferenceBlock(32, 64, 2, kind), *[ReferenceBlock(64, 64, 1, kind) for _ in range(n - 1)])
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("variant", [("A", False), ("B", False), ("A", True)], ids=["option-A", "option-B", "plain"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_network_matches_an_unfused_reference(backend, variant, train, channels_last):
    shortcut, plain = variant
    fused = randomize_batchnorms(fused_resnet.cifar_resnet(20, shortcut, plain=plain)).double()
    reference = ReferenceCifarResNet(20, shortcut, plain).double()
    reference.load_state_dict(fused.state_dict(), strict=True)
    assert fused_resnet.unfused_modules(fused) == {}
    x = to_layout(torch.randn(3, 3, 14, 12, dtype=torch.float64), channels_last)
    grad = torch.randn(3, 10, dtype=torch.float64)
    results = []
    for model, name in ((fused, backend), (reference, "torch")):
        model.train(train)
        xi = x.clone().requires_grad_()
        with use_backend(name):
            out = model(xi)
        out.backward(grad)
        results.append((out, xi.grad))
    (out, gx), (ref, rgx) = results
    assert_rel(out, ref, 1e-10, "output")
    assert_rel(gx, rgx, 1e-9, "grad x")
    reference_params = dict(reference.named_parameters())
    for name, p in fused.named_parameters():
        assert_rel(p.grad, reference_params[name].grad, 1e-9, f"grad {name}", floor=1.0)
    reference_buffers = dict(reference.named_buffers())
    for name, b in fused.named_buffers():
        assert_rel(b, reference_buffers[name], 1e-10, name)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_option_a_inference_matches_the_reference(backend):
    fused = randomize_batchnorms(fused_resnet.cifar_resnet(20)).eval()
    reference = ReferenceCifarResNet(20, "A", False).eval()
    reference.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad(), use_backend(backend):
        out = fused(x)
    with torch.no_grad():
        assert_rel(out, reference(x), 1e-5, "inference output")
