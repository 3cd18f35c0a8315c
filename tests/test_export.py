"""torch.export of eval-mode fused models: the exported program keeps the fused ops, takes other batch sizes
when exported with a dynamic one, survives torch.export.save/load, and computes what the eager model does."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torchvision

import fused_resnet
from conftest import CPU_BACKENDS, assert_rel, fused_copy, randomize_batchnorms
from fused_resnet import _native

pytestmark = pytest.mark.skipif(not (CPU_BACKENDS and _native.has_extension()),
                                reason="no fused backend with compiled ops runs on the CPU here")


def fused_ops_in(program: torch.export.ExportedProgram) -> set[str]:
    return {str(node.target) for node in program.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("fused_resnet.")}


def test_exported_eval_model_with_a_dynamic_batch_matches_eager():
    reference = randomize_batchnorms(torchvision.models.resnet18(num_classes=5)).eval()
    model = fused_copy(reference).eval()
    x = torch.randn(2, 3, 24, 20)
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    assert "fused_resnet.bn_act.default" in fused_ops_in(program)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    for n in (2, 5):
        xn = torch.randn(n, 3, 24, 20)
        with torch.no_grad():
            expected, truth = model(xn), reference(xn)
        for exported in (program.module(), loaded.module()):
            out = exported(xn)
            # Traced with gradients enabled, the program runs the unfolded eval chain; eager under no_grad folds
            # BN into the weights: the same math in fp32 with different rounding (1.06e-6 seen).
            assert_rel(out, expected, 1e-5, f"batch {n}")
            assert_rel(out, truth, 1e-5, f"batch {n} against torchvision")


def test_exported_timm_deep_stem_model_under_no_grad_matches_timm():
    """The inference path (BatchNorm folded into the convolutions, in the graph) of a converted timm ResNet with
    resnet50d's deep stem and avg-pool downsamples (one block a stage), exported under torch.no_grad(), in
    float64."""
    timm = pytest.importorskip("timm")
    timm_resnet = timm.models.resnet
    reference = timm_resnet.ResNet(timm_resnet.Bottleneck, (1, 1, 1, 1), num_classes=5, stem_type="deep",
                                   stem_width=8, avg_down=True, channels=(8, 16, 24, 32))
    reference = randomize_batchnorms(reference).double().eval()
    model = fused_resnet.convert(copy.deepcopy(reference))
    assert fused_resnet.unfused_modules(model) == {}
    x = torch.randn(2, 3, 33, 29, dtype=torch.float64)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        assert fused_ops_in(program)
        out = program.module()(x)
        assert_rel(out, reference(x), 1e-10)
