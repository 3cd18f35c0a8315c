"""torch.fx support: symbolic tracing (torch.fx.symbolic_trace, torchvision's create_feature_extractor and
get_graph_node_names) of models with fused modules, whose traced GraphModule still runs the fused ops.

A fused op cannot be traced through: it checks and dispatches its arguments as tensors. And torch.fx's Tracer
takes only torch.nn's own modules for leaves (Tracer.is_leaf_module reads the class's module name; torchvision's
NodePathTracer defers to it), so it would trace into a fused module's forward with Proxies. Each fused unit
therefore records itself as one call when its forward is given a Proxy, as the tracer records a leaf module:
  * a residual block or ConvBNReLU (fused_resnet.modules): a call_module node named by its path ("layer1.0"),
    which runs the module's forward, fused or not as its fusion_blocker() decides then (mode, hooks);
  * a ResNet's stem (fused_resnet.models.FusedStem), which is no module of its own: a call_function node of
    :func:`run_stem` on the model's conv1, bn1 and activation modules, named after the activation ("relu", timm's
    "act1"), the name torchvision gives the stem's output in the unfused model's graph;
  * the memory-format change around the blocks (FusedStem.enter_blocks and leave_blocks): call_function nodes.
Feature names ("layer2", "layer4.2", "relu") are therefore the unfused model's; what a fused unit computes inside
("layer1.0.conv1", "bn1") has no node, since it is never computed apart. Unlike a leaf module's, a fused
block's own forward hooks run while it is traced (on Proxies), as those of every module traced through do, and
again when the GraphModule calls it: a hook that replaces the output is then in the graph twice.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.fx import Proxy

from .models import FusedStem
from .ops import FoldedWeights

__all__ = ["enter_blocks", "leave_blocks", "module_call", "run_stem", "stem_call", "traced_enter_blocks",
           "traced_leave_blocks"]


def module_call(module: nn.Module, x: Proxy) -> Proxy:
    """The node of one call of `module` on `x` in the graph being traced, a call_module node as a leaf module gets:
    the traced GraphModule calls the module itself."""
    tracer = x.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), (x,), {})


class _StemLayers(FusedStem):
    """The stem of a FusedStem model apart from the model, as a traced graph runs it: the model's layers, stem
    settings and folded-weight cache (by handle, as compiled graphs name it)."""

    def __init__(self, conv1: nn.Module, bn1: nn.Module, activation_name: str, activation: nn.Module,
                 deep_stem: bool, folded_handle: int) -> None:
        self.conv1, self.bn1 = conv1, bn1
        setattr(self, activation_name, activation)
        self._stem_activation, self._deep_stem = activation_name, deep_stem
        self._folded = FoldedWeights.with_handle(folded_handle)


def run_stem(x: Tensor, conv1: nn.Module, bn1: nn.Module, activation: nn.Module, activation_name: str,
             deep_stem: bool, folded_handle: int) -> Tensor:
    """What the stem node of a traced FusedStem model computes: the model's forward_stem(x) on its layers."""
    return _StemLayers(conv1, bn1, activation_name, activation, deep_stem, folded_handle).forward_stem(x)


def stem_call(model: FusedStem, x: Proxy) -> Proxy:
    """The stem's node in the graph of `model` being traced (see the module docstring)."""
    name = model._stem_activation
    args = (x, model.conv1, model.bn1, getattr(model, name), name, model._deep_stem, model._folded.handle)
    return x.tracer.create_proxy("call_function", run_stem, args, {}, name=name)


def enter_blocks(x: Tensor) -> tuple[Tensor, torch.memory_format]:
    """FusedStem.enter_blocks, as a traced graph calls it."""
    return FusedStem.enter_blocks(x)


def leave_blocks(x: Tensor, entry_format: torch.memory_format) -> Tensor:
    """FusedStem.leave_blocks, as a traced graph calls it."""
    return FusedStem.leave_blocks(x, entry_format)


def traced_enter_blocks(x: Proxy) -> tuple[Proxy, Proxy]:
    """The nodes of FusedStem.enter_blocks(x) in the graph being traced: x in the blocks' layout, x's format."""
    entered = x.tracer.create_proxy("call_function", enter_blocks, (x,), {})
    return entered[0], entered[1]


def traced_leave_blocks(x: Proxy, entry_format: Proxy) -> Proxy:
    """The node of FusedStem.leave_blocks(x, entry_format) in the graph being traced."""
    return x.tracer.create_proxy("call_function", leave_blocks, (x, entry_format), {})
