"""torch.fx on fused models (fused_resnet/fx.py): torch.fx.symbolic_trace and torchvision's
create_feature_extractor and get_graph_node_names trace converted torchvision and timm ResNets and the library's
own models; every fused unit is one call in the graph (a block's path, the stem named after its activation), the
traced module still runs the fused ops, and it computes what the unfused model does: features, and in training
the same outputs, gradients and running statistics as the fused model untraced."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import fused_resnet
from conftest import CPU_BACKENDS, assert_rel, fused_copy, randomize_batchnorms
from fused_resnet import use_backend
from fused_resnet.modules import ConvBNReLU, _ResidualBlock
from test_host_sync import HostReadRecorder

pytestmark = pytest.mark.skipif(not CPU_BACKENDS, reason="no fused backend runs on the CPU here")
BACKEND = CPU_BACKENDS[0]

FEATURES = {"layer2": "c3", "layer4": "c5"}
# The nodes of the layout change around the blocks (FusedStem.enter_blocks returns a pair, hence the getitems).
LAYOUT_NODES = ["enter_blocks", "getitem", "getitem_1", "leave_blocks"]


def fused_unit_paths(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (_ResidualBlock, ConvBNReLU))]


def called_modules(graph_module: torch.fx.GraphModule) -> list[str]:
    return [node.target for node in graph_module.graph.nodes if node.op == "call_module"]


def assert_same_features(actual: dict, expected: dict, tol: float) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert_rel(actual[name], expected[name], tol, name)


@pytest.fixture(scope="module")
def resnet50_pair() -> tuple[nn.Module, nn.Module]:
    """(torchvision's resnet50 with random BatchNorms, a converted copy), both in eval; read, never changed."""
    reference = randomize_batchnorms(torchvision.models.resnet50(num_classes=10)).eval()
    return reference, fused_copy(reference).eval()


def test_symbolic_trace_of_a_converted_resnet50_calls_each_fused_unit_once_and_matches_torchvision(resnet50_pair):
    """Guards symbolic_trace of a converted model (a Proxy reached the fused ops): each block is one call_module
    node, nothing inside a block is traced, the stem is one run_stem call, and the traced module computes
    torchvision's output."""
    reference, model = resnet50_pair
    traced = torch.fx.symbolic_trace(model)
    blocks = fused_unit_paths(model)
    assert len(blocks) == 16
    assert [target for target in called_modules(traced) if target.startswith("layer")] == blocks
    assert [node.name for node in traced.graph.nodes if node.target is fused_resnet.fx.run_stem] == ["relu_1"]
    x = torch.randn(1, 3, 64, 64)
    with use_backend(BACKEND), torch.no_grad():
        assert_rel(traced(x), reference(x), 1e-5, "traced output")


def test_feature_extractor_of_a_converted_resnet50_matches_torchvision_features(resnet50_pair):
    """torchvision's create_feature_extractor on a converted resnet50 in eval: layer2 and layer4 (and the stem's
    output, named 'relu' as in torchvision's graph) equal the torchvision model's, in float32."""
    reference, model = resnet50_pair
    nodes = {**FEATURES, "relu": "stem"}
    extractor = create_feature_extractor(model, nodes)
    x = torch.randn(1, 3, 64, 64)
    with use_backend(BACKEND), torch.no_grad():
        assert_same_features(extractor(x), create_feature_extractor(reference, nodes)(x), 1e-5)


def test_graph_node_names_are_torchvisions_with_each_fused_unit_one_node(resnet50_pair):
    """get_graph_node_names of a converted resnet50, in train and eval: torchvision's names with the nodes inside
    each block collapsed to the block's path and the stem's conv1 and bn1 into its 'relu', plus the nodes of the
    layout change around the blocks."""
    reference, model = resnet50_pair
    blocks = fused_unit_paths(model)
    for fused_names, names in zip(get_graph_node_names(model), get_graph_node_names(reference)):
        expected = []
        for name in names:
            name = next((block for block in blocks if name.startswith(block + ".")), name)
            if name not in ("conv1", "bn1") and name not in expected:
                expected.append(name)
        assert [name for name in fused_names if name not in LAYOUT_NODES] == expected
        assert [name for name in fused_names if name in LAYOUT_NODES] == LAYOUT_NODES
    assert not model.training and not reference.training


def test_feature_extraction_in_training_updates_running_stats_and_gradients_as_the_untraced_model():
    """In train mode the extracted features, the gradients they send back and the running statistics the step
    leaves are the fused model's own, untraced (its layer outputs read by forward hooks on the stages, which do
    not unfuse the blocks)."""
    model = randomize_batchnorms(fused_resnet.ResNet(fused_resnet.BasicBlock, [1, 1, 1, 1], num_classes=10))
    untraced = copy.deepcopy(model)
    extractor = create_feature_extractor(model, FEATURES).train()
    untraced.train()
    captured = {}
    for stage, key in FEATURES.items():
        getattr(untraced, stage).register_forward_hook(lambda m, args, out, key=key: captured.__setitem__(key, out))
    assert fused_resnet.unfused_modules(untraced) == {}
    x = torch.randn(2, 3, 32, 32)
    with use_backend(BACKEND):
        features = extractor(x)
        untraced(x)
        weights = {key: torch.randn(out.shape) for key, out in captured.items()}
        sum((features[key] * w).sum() for key, w in weights.items()).backward()
        sum((captured[key] * w).sum() for key, w in weights.items()).backward()
    assert_same_features(features, captured, 1e-6)
    buffers, expected_buffers = dict(model.named_buffers()), dict(untraced.named_buffers())
    assert int(buffers["layer1.0.bn1.num_batches_tracked"]) == 1
    for name, expected in expected_buffers.items():
        assert_rel(buffers[name].double(), expected.double(), 1e-6, name)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    expected_grads = {name: p.grad for name, p in untraced.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(expected_grads) and "layer4.0.bn2.weight" in grads
    for name, expected in expected_grads.items():
        assert_rel(grads[name], expected, 1e-5, name)


def test_traced_model_runs_the_fused_ops():
    """The traced GraphModule runs the fused blocks and stem, not their PyTorch sequence: no ATen batch_norm op is
    dispatched, in inference or in training (the same trace of the torchvision model dispatches one)."""
    reference = torchvision.models.resnet18()
    for model, fused in ((fused_copy(reference), True), (reference, False)):
        traced = torch.fx.symbolic_trace(model)
        for train in (False, True):
            recorder = HostReadRecorder()
            with use_backend(BACKEND), torch.set_grad_enabled(train), recorder:
                traced.train(train)(torch.randn(2, 3, 32, 32))
            batch_norms = {op for op in recorder.ops if op.startswith("aten.") and "batch_norm" in op}
            assert (batch_norms == set()) if fused else batch_norms, (train, sorted(recorder.ops))


def test_timm_resnet50d_traces_and_its_features_match_timm():
    """A converted timm resnet50d (deep stem, avg-pool downsamples; narrow stages): symbolic_trace matches timm's
    output, and create_feature_extractor's layer2, layer4 and stem output ('act1', as in timm's graph) timm's."""
    timm = pytest.importorskip("timm")
    reference = randomize_batchnorms(
        timm.create_model("resnet50d", num_classes=5, channels=(8, 16, 24, 32), stem_width=8)).eval()
    model = fused_resnet.convert(copy.deepcopy(reference)).eval()
    assert fused_resnet.unfused_modules(model) == {}
    traced = torch.fx.symbolic_trace(model)
    assert [t for t in called_modules(traced) if t.startswith("layer")] == fused_unit_paths(model)
    nodes = {**FEATURES, "act1": "stem"}
    x = torch.randn(2, 3, 64, 64)
    with use_backend(BACKEND), torch.no_grad():
        assert_rel(traced(x), reference(x), 1e-5, "traced output")
        assert_same_features(create_feature_extractor(model, nodes)(x),
                             create_feature_extractor(reference, nodes)(x), 1e-5)


@pytest.mark.parametrize("build", [lambda: fused_resnet.resnet18(num_classes=5),
                                   lambda: fused_resnet.cifar_resnet(20, "A"),
                                   lambda: nn.Sequential(fused_resnet.ConvBNReLU(3, 8, stride=2),
                                                         fused_resnet.Bottleneck(8, 2))],
                         ids=["resnet18", "cifar_resnet20", "ConvBNReLU"])
def test_library_models_trace_and_match_eager(build):
    """The library's own models (and a ConvBNReLU) trace, one node per fused unit, and their traced modules
    compute the eager output in eval and in training."""
    model = randomize_batchnorms(build())
    traced = torch.fx.symbolic_trace(model)
    assert [t for t in called_modules(traced) if t in fused_unit_paths(model)] == fused_unit_paths(model)
    x = torch.randn(2, 3, 32, 32)
    for train in (False, True):
        model.train(train)
        traced.train(train)
        expected_model = copy.deepcopy(model)
        with use_backend(BACKEND):
            assert_rel(traced(x), expected_model(x), 1e-6, f"train={train}")
