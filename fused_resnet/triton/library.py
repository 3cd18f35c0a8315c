"""The Triton launchers as torch.library custom ops, torch.ops.fused_resnet_triton.*, with fake implementations.

torch.compile and torch.export then see each launch as one opaque op of known output shapes, instead of tracing
the launchers' Python (the launch configuration chosen from the shape, grids, the statistics' merge launch), which
dynamo cannot follow. Opaque rather than torch.library.triton_op: triton_op would let Inductor see the kernels
inside, but there is nothing for it to fuse into them (each already is the fusion of docs/design.md §4), and it needs
launchers made only of traceable calls, which a shape-dependent configuration choice and a two-kernel statistics
reduction are not. This choice is by design, not yet by GPU measurement.

The four BatchNorm ops have the schemas of the compiled ones (csrc/ops.cpp), so one kernel-set class drives both.
Unlike the compiled ops, these do not check their arguments: their one caller, the Triton kernel set, passes what
fused_resnet.ops has checked, and the launchers refuse only a device or dtype they have no kernel for.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..tensors import accumulation_dtype, conv_output_size, empty_dense_like
from . import bn, conv

NAMESPACE = "fused_resnet_triton"


def _channels(t: Tensor) -> Tensor:
    return t.new_empty((t.shape[1],), dtype=accumulation_dtype(t.dtype))


@torch.library.custom_op(f"{NAMESPACE}::batch_stats", mutates_args=())
def batch_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    return bn.batch_stats(input)


@batch_stats.register_fake
def _(input):
    return _channels(input), _channels(input)


@torch.library.custom_op(f"{NAMESPACE}::bn_act", mutates_args=())
def bn_act(input: Tensor, mean: Tensor | None, scale: Tensor, shift: Tensor, residual: Tensor | None,
           residual_mean: Tensor | None, residual_scale: Tensor | None, residual_shift: Tensor | None, relu: bool,
           residual_stride: int = 1, residual_channel_offset: int = 0) -> Tensor:
    return bn.bn_act(input, mean, scale, shift, residual, residual_mean, residual_scale, residual_shift, relu,
                     residual_stride, residual_channel_offset)


@bn_act.register_fake
def _(input, mean, scale, shift, residual, residual_mean, residual_scale, residual_shift, relu, residual_stride=1,
      residual_channel_offset=0):
    return empty_dense_like(input)


@torch.library.custom_op(f"{NAMESPACE}::bn_act_backward_reduce", mutates_args=())
def bn_act_backward_reduce(grad_output: Tensor, output: Tensor | None, input: Tensor, mean: Tensor,
                           input2: Tensor | None, mean2: Tensor | None, mask_scale: Tensor | None = None,
                           mask_shift: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    # The launcher returns views of one buffer; a custom op's outputs may not alias one another.
    sums = bn.bn_act_backward_reduce(grad_output, output, input, mean, input2, mean2, mask_scale, mask_shift)
    return tuple(s.clone() for s in sums)


@bn_act_backward_reduce.register_fake
def _(grad_output, output, input, mean, input2, mean2, mask_scale=None, mask_shift=None):
    third = _channels(input) if input2 is not None else input.new_empty((0,), dtype=accumulation_dtype(input.dtype))
    return _channels(input), _channels(input), third


@torch.library.custom_op(f"{NAMESPACE}::bn_act_backward_elemt", mutates_args=())
def bn_act_backward_elemt(grad_output: Tensor, output: Tensor | None, input: Tensor, mean: Tensor, coef_dy: Tensor,
                          coef_xmu: Tensor, coef_const: Tensor, input2: Tensor | None, mean2: Tensor | None,
                          coef2_dy: Tensor | None, coef2_xmu: Tensor | None, coef2_const: Tensor | None,
                          residual_grad: bool, mask_scale: Tensor | None = None,
                          mask_shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return bn.bn_act_backward_elemt(grad_output, output, input, mean, coef_dy, coef_xmu, coef_const, input2, mean2,
                                    coef2_dy, coef2_xmu, coef2_const, residual_grad, mask_scale, mask_shift)


@bn_act_backward_elemt.register_fake
def _(grad_output, output, input, mean, coef_dy, coef_xmu, coef_const, input2, mean2, coef2_dy, coef2_xmu,
      coef2_const, residual_grad, mask_scale=None, mask_shift=None):
    other = empty_dense_like(input) if (input2 is not None or residual_grad) else input.new_empty((0,))
    return empty_dense_like(input), other


@torch.library.custom_op(f"{NAMESPACE}::conv2d", mutates_args=())
def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
           dilation: list[int], groups: int, input_mean: Tensor | None, input_scale: Tensor | None,
           input_shift: Tensor | None, residual: Tensor | None, residual_stride: int, residual_channel_offset: int,
           relu: bool, stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """conv.conv2d; returns (y, mean, var), the statistics empty unless `stats` (an op's outputs are fixed)."""
    out = conv.conv2d(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups,
                      input_mean=input_mean, input_scale=input_scale, input_shift=input_shift, residual=residual,
                      residual_stride=residual_stride, residual_channel_offset=residual_channel_offset, relu=relu,
                      stats=stats)
    if stats:
        return out
    empty = x.new_empty((0,), dtype=torch.float32)
    return out, empty, empty.clone()


@conv2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, input_mean, input_scale, input_shift, residual,
      residual_stride, residual_channel_offset, relu, stats):
    size = conv_output_size(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    y = empty_dense_like(x, (x.shape[0], weight.shape[0], *size))
    vector = (weight.shape[0],) if stats else (0,)
    return y, x.new_empty(vector, dtype=torch.float32), x.new_empty(vector, dtype=torch.float32)
