"""Compulsory memory traffic of a training and an inference step: the bytes every op of the step must read and
write, counted at the dispatcher, split into convolutions and everything else.

A ResNet's convolutions are compute-bound; the rest (BatchNorm, ReLU, the residual add, pooling, their backwards)
is memory-bound, and fusing is about removing its passes. Counting the bytes each provider's ops must move says how
many passes fusing removed, independently of any timing, and at the device's copy bandwidth how long those bytes
take at the least (benchmarks/report.py sets that beside the measured step time).

The accounting (:class:`TrafficCounter`, a TorchDispatchMode: it sees the aten ops under autograd and the project's
custom ops, torch.ops.fused_resnet::* and fused_resnet_triton::*, not what runs inside them):

* an op reads each distinct tensor argument once and writes each distinct result once; an argument it mutates
  (``relu_``'s self, BatchNorm's running statistics) is written too, and one it only overwrites (an ``out=``
  argument, ``copy_``'s, ``fill_``'s and ``zero_``'s self) is not read;
* a tensor counts the bytes of the elements it addresses: a view its own elements, an expanded tensor (stride 0)
  each element once, an opaque one (oneDNN's packed weights) all of them;
* views, allocations (``empty``...) and ops that return no tensor and write none (``prim::device``) move nothing;
* convolutions are every op named ``*convolution*`` (aten's forward and backward, oneDNN's and cuDNN's fused
  ones) and the Triton convolution (``fused_resnet_triton::conv2d``, whose prologue applies the BatchNorm and ReLU
  before it and whose epilogue computes the statistics after it: those passes are its own bytes).

So an op counts as one pass over each tensor it touches, however many its kernel makes: ATen's training BatchNorm
is one op (its kernel reads the input twice, statistics then normalization, and its backward reads the gradient
and input twice), where the fused backends make the statistics and the apply (the backward's reduction and
elementwise passes) separate ops. The count is the least each op's interface lets it move.

The steps run on fake tensors (torch's FakeTensorMode): every op computes its output's shape, dtype and strides and
nothing else, so a count costs the Python of one step whatever the shape (about a second), is the same on every
run, and runs the Triton backend's path on a CPU as fast as any other (its custom ops' fake implementations stand
in for the interpreter). The steps are counted at the benchmark's own batch and resolution, and per image is the
count over the batch: what does not grow with the batch (weights, their gradients) is spread over that batch. A
train step is the forward (phase "forward"), then the cross-entropy loss and the backward (phase "backward"), not
the optimizer's update (three passes over the parameters, the same for every provider). CUDA paths are counted
only where a GPU is: autograd on fake CUDA tensors initializes CUDA.
"""

from __future__ import annotations

import collections
import dataclasses

import torch
import torchvision
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks.harness import Layout, Provider, known_providers
from benchmarks.test_models import NUM_CLASSES, cross_entropy_backward, model_inputs
from fused_resnet.kernels import REGISTRY

# Allocations: their result is not written (what fills it is an op of its own).
ALLOCATIONS = frozenset({"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
                         "aten::new_empty_strided"})
# In-place ops that overwrite their self without reading it.
OVERWRITES = frozenset({"aten::copy_", "aten::fill_", "aten::zero_"})
TRITON_CONVOLUTION = "fused_resnet_triton::conv2d"
# The extension's own convolutions on the CPU (their names do not say "convolution").
EXTENSION_CONVOLUTIONS = frozenset({TRITON_CONVOLUTION, "fused_resnet::winograd_conv3x3",
                                    "fused_resnet::winograd_conv3x3_weight_grad",
                                    "fused_resnet::conv_weight_grad_gemm"})
MODES = ("train", "eval")


def is_convolution(op: str) -> bool:
    """Whether the op named `op` (e.g. ``aten::convolution_backward``) is a convolution."""
    return "convolution" in op or op in EXTENSION_CONVOLUTIONS


def tensor_bytes(t: torch.Tensor) -> int:
    """The bytes of the elements `t` addresses: its own for a view, each element once along an expanded (stride 0)
    dimension; all of an opaque tensor's (oneDNN's packed weights, whose strides mean nothing)."""
    if t.layout != torch.strided:
        return t.numel() * t.element_size()
    elements = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            elements *= size
    return elements * t.element_size()


def _tensors(value: object) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def op_bytes(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: object) -> int:
    """The bytes one call of `func` must read and write (the rules of this module's docstring)."""
    schema = func._schema
    if schema.name in ALLOCATIONS or any(r.alias_info is not None and not r.alias_info.is_write
                                         for r in schema.returns):
        return 0  # an allocation, or a view
    read: dict[int, torch.Tensor] = {}
    written = {id(t): t for t in _tensors(out)}
    for i, argument in enumerate(schema.arguments):
        if i < len(args):
            value = args[i]
        elif argument.name in kwargs:
            value = kwargs[argument.name]
        else:
            continue
        tensors = _tensors(value)
        mutated = argument.alias_info is not None and argument.alias_info.is_write
        if mutated:
            written.update((id(t), t) for t in tensors)
        if not (argument.is_out or (mutated and i == 0 and schema.name in OVERWRITES)):
            read.update((id(t), t) for t in tensors)
    if not written:
        return 0  # returns no tensor and writes none: metadata (prim::device, sizes)
    return sum(map(tensor_bytes, read.values())) + sum(map(tensor_bytes, written.values()))


PHASES = ("forward", "backward")


@dataclasses.dataclass
class Traffic:
    """The bytes and calls of every op of a counted step, by phase ("forward"; "backward": the loss and the
    backward) and op name (``aten::add``: overloads together)."""

    bytes_by_op: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (phase, op) -> bytes
    calls_by_op: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def total(self, *, conv: bool, phase: str | None = None) -> int:
        """The bytes of the convolutions (`conv`) or of every other op, in `phase` (None: the whole step)."""
        return sum(n for (p, op), n in self.bytes_by_op.items()
                   if is_convolution(op) == conv and phase in (None, p))

    def by_op(self, *, conv: bool) -> dict[str, int]:
        """{op: bytes} of the convolutions or of the other ops, over the whole step, the largest first."""
        merged: collections.Counter = collections.Counter()
        for (_, op), n in self.bytes_by_op.items():
            if is_convolution(op) == conv:
                merged[op] += n
        return dict(merged.most_common())


class TrafficCounter(TorchDispatchMode):
    """Counts the bytes every op dispatched inside it must read and write, into `traffic`, under `phase`."""

    def __init__(self) -> None:
        super().__init__()
        self.traffic = Traffic()
        self.phase = PHASES[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        moved = op_bytes(func, args, kwargs, out)
        if moved:
            key = (self.phase, func._schema.name)
            self.traffic.bytes_by_op[key] += moved
            self.traffic.calls_by_op[key] += 1
        return out


# ---------------------------------------------------------------------------------------------------------------
# Fake tensors


class _ShapesFakeTensorsLack(TorchDispatchMode):
    """Output metadata for the ops the fused backends call that have no fake implementation in PyTorch: oneDNN's
    weight reorder (the same bytes in oneDNN's blocked order) and fused convolution with a residual, and cuDNN's
    fused convolutions (shaped like a plain convolution). Sits between the counter and FakeTensorMode; the counter
    above it sees the ops themselves, with their real arguments."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name == "mkldnn._reorder_convolution_weight.default":
            return torch.empty_like(args[0])
        if name == "mkldnn._convolution_pointwise.binary":  # (x, residual, weight, bias, padding, ..., groups, ...)
            x, _, weight, bias, padding, stride, dilation, groups = args[:8]
            return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], groups)
        if name in ("aten.cudnn_convolution_relu.default", "aten.cudnn_convolution_add_relu.default"):
            x, weight = args[:2]
            bias, stride, padding, dilation, groups = args[-5:]
            return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], groups)
        return func(*args, **kwargs)


def fake_module(module: nn.Module, mode: FakeTensorMode, device: torch.device) -> nn.Module:
    """`module` with every parameter and buffer replaced by a fake tensor like it on `device` (a tensor held twice
    becomes one fake tensor)."""
    fakes: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in fakes:
            like = mode.from_tensor(t.detach())
            with mode:
                fakes[id(t)] = like.to(device)
        return fakes[id(t)]

    for submodule in module.modules():
        for name, parameter in submodule._parameters.items():
            if parameter is not None:
                submodule._parameters[name] = nn.Parameter(fake(parameter), requires_grad=parameter.requires_grad)
        for name, buffer in submodule._buffers.items():
            if buffer is not None:
                submodule._buffers[name] = fake(buffer)
    return module


# ---------------------------------------------------------------------------------------------------------------
# Counting a model's steps


def counted_providers(device: torch.device) -> tuple[list[Provider], dict[str, str]]:
    """(the providers counted on `device`, {fused provider left out: why}): torchvision and every fused backend
    that can run on `device`, interpreted or not (fused-triton on a CPU with TRITON_INTERPRET=1: nothing runs)."""
    known = known_providers()
    counted, left_out = [known["torchvision"]], {}
    for name, backend in REGISTRY.items():
        reason = backend.why_not(device.type)
        if reason is None:
            counted.append(known[f"fused-{name}"])
        else:
            left_out[f"fused-{name}"] = reason
    return counted, left_out


def meta_model(model_name: str, layout: Layout) -> nn.Module:
    """A torchvision model on the meta device (no memory, no initialization to pay for) in the layout."""
    with torch.device("meta"):
        model = torchvision.models.get_model(model_name, weights=None, num_classes=NUM_CLASSES)
    return model.to(dtype=layout.dtype, memory_format=layout.memory_format)


def count_step(module: nn.Module, x: torch.Tensor, labels: torch.Tensor, provider: Provider, mode: str) -> Traffic:
    """The traffic of one `mode` step of `provider`'s `module` on images `x`, as the benchmarks run it
    (benchmarks/test_models.py): "train", the forward in training mode, then the cross-entropy loss against `labels`
    and the backward (no parameter update); "eval", an inference forward. Each is counted on its second call: the
    first fills the folded-weight cache, and on real tensors makes the cpu backend's measured choices, whose
    candidates it runs. On fake tensors nothing is measured: a configuration this process has not measured on real
    ones runs oneDNN's convolutions and weight gradients."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    counter = TrafficCounter()
    if mode == "train":
        module.train()
        with provider.context():
            logits = module(x)
        cross_entropy_backward(labels)(logits)
        module.zero_grad(set_to_none=True)
        with counter:
            with provider.context():
                logits = module(x)
            counter.phase = "backward"
            cross_entropy_backward(labels)(logits)
    else:
        module.eval()
        with torch.no_grad(), provider.context():
            module(x)
            with counter:
                module(x)
    return counter.traffic


def count_model_step(model_name: str, provider: Provider, mode: str, layout: Layout, batch: int, resolution: int,
                     device: torch.device) -> Traffic:
    """:func:`count_step` of `provider`'s `model_name` in `layout` on `batch` images of `resolution`, on fake
    tensors of `device`."""
    fake_mode = FakeTensorMode()
    module = fake_module(provider.prepare(meta_model(model_name, layout)), fake_mode, device)
    with fake_mode, _ShapesFakeTensorsLack():
        x, labels = model_inputs(batch, resolution, device, layout)
        return count_step(module, x, labels, provider, mode)


def traffic_row(traffic: Traffic, *, model_name: str, resolution: int, batch: int, mode: str, provider: Provider,
                layout: Layout, device: torch.device, row_info: dict) -> dict:
    """The report's row of one counted step (benchmarks/report.py reads it), in bytes per image."""
    return {
        "suite": "traffic", "case": f"{model_name} @{resolution}", "mode": mode, "provider": provider.name,
        "is_reference": provider.is_reference, "model": model_name, "resolution": resolution,
        "images_per_call": batch, "dtype": layout.dtype_name, "memory_format": layout.memory_format_name,
        "counted_on": device.type, **row_info,
        "conv_bytes_per_image": traffic.total(conv=True) / batch,
        "other_bytes_per_image": traffic.total(conv=False) / batch,
        "other_forward_bytes_per_image": traffic.total(conv=False, phase="forward") / batch,
        "other_bytes_by_op": traffic.by_op(conv=False),
    }
