"""Inference of a block with every BatchNorm folded into its convolution, eager and under torch.compile.

Each conv-BN unit runs as one convolution with the folded weight and bias, its epilogue adding the residual and
applying the ReLU (one oneDNN or cuDNN primitive where the backend has one). The folded weights come from the
module's :class:`FoldedWeights` cache, which watches the source tensors' version counters.

torch.compile cannot trace that cache (a version counter is not a value a graph can guard on), and folding inside
the graph on every call costs a pass over every weight and loses oneDNN's packed weights (a compiled resnet50 ran
0.90x torchvision eager this way, against 1.10x for the eager fused model). So under torch.compile each unit is one
opaque op, ``torch.ops.fused_resnet.folded_conv_act``, which receives the unit's tensors and a handle to the
module's cache, and runs the eager path at run time. torch.export keeps the traceable form (folding in the graph):
an exported program must not depend on a live module's cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..kernels import kernels_for
from ..params import BatchNormParams, ConvBN, ConvParams, ZeroPadIdentity
from ..tensors import dense_strides, memory_format_of
from .folding import FoldedWeights, fold_batch_norm


def inference_block(
    backend: str, x: Tensor, units: Sequence[ConvBN], shortcut: ConvBN | ZeroPadIdentity | str | None,
    shortcut_input: Tensor, folded: FoldedWeights | None,
) -> Tensor:
    """The block with its BatchNorms folded (cached in `folded`, indexed by unit, the projection last; folded on
    every call without one) and bias, residual and ReLU in each convolution's epilogue."""
    n = len(units)
    residual, zero_pad = None, None
    if shortcut == "identity":
        residual = x
    elif isinstance(shortcut, ZeroPadIdentity):
        residual, zero_pad = x, shortcut
    elif isinstance(shortcut, ConvBN):
        residual = _folded_conv_act(backend, shortcut_input, shortcut, n, folded, None, relu=False)
    a = x
    for i, unit in enumerate(units):
        last = i == n - 1
        a = _folded_conv_act(backend, a, unit, i, folded, residual if last else None, relu=True,
                             zero_pad=zero_pad if last else None)
    return a


def _folded_conv_act(
    backend: str, x: Tensor, unit: ConvBN, index: int, folded: FoldedWeights | None, residual: Tensor | None,
    relu: bool, zero_pad: ZeroPadIdentity | None = None,
) -> Tensor:
    """[relu](conv(x) with unit's BatchNorm folded in [+ residual]): the folded weights from `folded` at `index`."""
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        conv, bn = unit.conv, unit.bn
        stride, channels_before = zero_pad if zero_pad is not None else (0, 0)
        return torch.ops.fused_resnet.folded_conv_act(
            x, residual, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps,
            conv.stride, conv.padding, conv.dilation, conv.groups, relu, stride, channels_before, backend,
            folded.handle if folded is not None else FoldedWeights.NO_HANDLE, index)
    if folded is None or torch.compiler.is_exporting():
        weight, bias = fold_batch_norm(unit)
    else:
        weight, bias = folded.get(index, unit)
    return kernels_for(backend).conv_bias_act(x, unit.conv, weight, bias, residual, relu, zero_pad)


def _folded_conv_act_op(
    x: Tensor, residual: Tensor | None, conv_weight: Tensor, conv_bias: Tensor | None, bn_weight: Tensor | None,
    bn_bias: Tensor | None, running_mean: Tensor, running_var: Tensor, eps: float, stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], groups: int, relu: bool, zero_pad_stride: int,
    zero_pad_channels_before: int, backend: str, cache: int, index: int,
) -> Tensor:
    """One folded conv-BN unit of a compiled graph, run eagerly with the cache whose handle is `cache`
    (zero_pad_stride 0: no option-A shortcut). Its output is laid out as the fake implementation says."""
    conv = ConvParams(conv_weight, conv_bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    unit = ConvBN(conv, BatchNormParams(bn_weight, bn_bias, running_mean, running_var, eps=eps, training=False))
    zero_pad = ZeroPadIdentity(zero_pad_stride, zero_pad_channels_before) if zero_pad_stride else None
    out = _folded_conv_act(backend, x, unit, index, FoldedWeights.with_handle(cache), residual, relu, zero_pad)
    if out.stride() == dense_strides(out.shape, memory_format_of(x)):  # what the fake implementation promises
        return out
    return _output_like(x, out.shape).copy_(out)


# Registered through torch.library.Library rather than the torch.library.custom_op decorator, whose Python wrappers
# (its autograd kernel, a dynamo-disabled call) cost ~15-30 us a call, at 53 calls per resnet50: a compiled fused
# resnet50 ran 0.92x (1x3x64x64) and 0.97x (1x3x224x224) as fast as the eager one with them, 1.06x and 1.03x
# without. CompositeExplicitAutograd, with no autograd kernel: the op only runs where no gradient is needed.
_LIBRARY = torch.library.Library("fused_resnet", "FRAGMENT")
_LIBRARY.define(
    "folded_conv_act(Tensor x, Tensor? residual, Tensor conv_weight, Tensor? conv_bias, Tensor? bn_weight, "
    "Tensor? bn_bias, Tensor running_mean, Tensor running_var, float eps, int[] stride, int[] padding, "
    "int[] dilation, int groups, bool relu, int zero_pad_stride, int zero_pad_channels_before, str backend, "
    "int cache, int index) -> Tensor")
_LIBRARY.impl("folded_conv_act", _folded_conv_act_op, "CompositeExplicitAutograd")


@torch.library.register_fake("fused_resnet::folded_conv_act")
def _(x, residual, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding,
      dilation, groups, relu, zero_pad_stride, zero_pad_channels_before, backend, cache, index):
    conv = ConvParams(conv_weight, None, tuple(stride), tuple(padding), tuple(dilation), groups)
    return _output_like(x, (x.shape[0], conv_weight.shape[0], *conv.output_size(*x.shape[2:])))


def _output_like(x: Tensor, shape: Sequence[int]) -> Tensor:
    """An empty output of `shape` for input x, in x's memory format (as every backend's convolutions lay it out)."""
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))

