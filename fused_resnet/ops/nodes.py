"""The autograd nodes a block runs as in training (and whenever a gradient is needed):

    conv -> [BN-ReLU -> conv] -> ... -> [BN (+ residual, itself possibly BN'd) -> ReLU]

with one node per bracket, so that each releases its saved tensors as soon as its backward is done (one node
for the whole block kept every saved activation to the end of its backward: on the CPU that higher peak cost
page faults, and 10-30% of a Bottleneck's step). A node that makes a convolution output also returns its batch
statistics when the BatchNorm after it needs them (a kernel set may compute them in the convolution's epilogue);
the node consuming it takes them as non-differentiable inputs (BN's backward accounts for them itself).

A node runs as ``Function.apply(config, *inputs)``: `config`, a NamedTuple of everything that is not a tensor (the
kernel set, BatchNormSpecs, a convolution's geometry, flags), is its one static argument, and `inputs` the
node's NamedTuple of tensors, which describes them once: forward reads them by name, backward reads
``ctx.needs_input_grad[1:]`` (``[0]`` is the config's) into the same NamedTuple and returns ``None`` for the config
and then its gradients as that NamedTuple, built by field name. A BatchNorm's (mean, var) inputs are what it
normalizes with: its batch statistics when it has some (the non-differentiable outputs of the node before), else
its running ones (in training, those are updated after the block, from the batch statistics). The run_* functions
build a node's config and inputs from the op layer's BatchNormParams and ConvParams.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..kernels import KernelSet
from ..params import BatchNormParams, ConvParams, MaxPoolParams, ZeroPadIdentity
from ..tensors import as_dtype, dense_like
from .batch_norm import BatchNormSpec


def _with_stats(ctx, out: Tensor, stats: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """(out, *stats), the statistics non-differentiable. Their gradients reach backward as None rather than
    materialized zeros (two allocations a node: 40 of a resnet18 step's 800 ATen calls); `out` always has one, as
    the next node consumes it."""
    ctx.mark_non_differentiable(*stats)
    if stats:
        ctx.set_materialize_grads(False)
    return (out, *stats)


def _param_grad(grad: Tensor | None, param: Tensor | None, needed: bool) -> Tensor | None:
    """`grad` in the dtype of `param` when autograd needs it (BN vectors accumulate in fp32 for low precision)."""
    if not needed or grad is None or param is None:
        return None
    return as_dtype(grad, param.dtype)


def _bn_relu_backward(
    kernels: KernelSet, bn: BatchNormSpec, grad_a: Tensor, y: Tensor, mean: Tensor, invstd: Tensor, scale: Tensor,
    shift: Tensor, weight: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad y, grad weight, grad bias) of a = relu((y - mean) * scale + shift) from grad_a: BN's backward of the
    gradient masked where a is 0. The mask is recomputed from y with bn_act's arithmetic (a's bit for bit) rather
    than read from a: two fewer passes over an activation (docs/design.md §5)."""
    grad_a = dense_like(grad_a, y)
    sum_dy, sum_dy_xmu, _ = kernels.backward_reduce(grad_a, None, y, mean, mask_scale=scale, mask_shift=shift)
    coefs, grad_weight, grad_bias = bn.gradients(kernels, sum_dy, sum_dy_xmu, invstd, weight,
                                                 y.numel() // y.shape[1])
    grad_y, _ = kernels.backward_elemt(grad_a, None, y, mean, coefs, mask_scale=scale, mask_shift=shift)
    return grad_y, grad_weight, grad_bias


# ---------------------------------------------------------------------------------------------------------------
# conv


class ConvConfig(NamedTuple):
    kernels: KernelSet
    geometry: tuple  # ConvParams' fields after weight and bias (conv[2:]): ConvParams(weight, bias, *geometry)
    stats: bool  # whether the output's batch statistics are returned too


class ConvInputs(NamedTuple):
    x: Tensor
    weight: Tensor
    bias: Tensor | None = None


def run_conv(kernels: KernelSet, x: Tensor, conv: ConvParams, stats: bool) -> tuple[Tensor, ...]:
    """(conv(x),), or (conv(x), mean, biased variance) when `stats`."""
    return _ConvFunction.apply(ConvConfig(kernels, conv[2:], stats), *ConvInputs(x, conv.weight, conv.bias))


class _ConvFunction(torch.autograd.Function):
    """conv(x). Saves x as the convolution consumed it (under autocast, the low-precision copy, as ATen's
    convolution saves it)."""

    @staticmethod
    def forward(ctx, config: ConvConfig, *tensors: Tensor | None) -> tuple[Tensor, ...]:
        inputs = ConvInputs._make(tensors)
        x, weight, bias = inputs.x, inputs.weight, inputs.bias
        y, *batch_stats = config.kernels.conv_stats(x, ConvParams(weight, bias, *config.geometry), config.stats)
        ctx.config, ctx.x_dtype = config, x.dtype
        ctx.save_for_backward(as_dtype(x, y.dtype), weight, bias)
        return _with_stats(ctx, y, batch_stats)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor, *_) -> tuple[Tensor | None, ...]:
        x, weight, bias = ctx.saved_tensors
        config, need = ctx.config, ConvInputs._make(ctx.needs_input_grad[1:])
        grad_x, grad_weight, grad_bias = config.kernels.conv_backward(
            grad_y, x, ConvParams(weight, bias, *config.geometry), need_input=need.x, need_weight=need.weight,
            need_bias=need.bias)
        grad_x = None if grad_x is None else as_dtype(grad_x, ctx.x_dtype)
        return None, *ConvInputs(x=grad_x, weight=grad_weight, bias=grad_bias)


# ---------------------------------------------------------------------------------------------------------------
# BN-ReLU -> conv


class BatchNormReluConvConfig(NamedTuple):
    kernels: KernelSet
    bn: BatchNormSpec
    geometry: tuple  # the convolution's, as in ConvConfig
    stats: bool  # whether the output's batch statistics are returned too


class BatchNormReluConvInputs(NamedTuple):
    y: Tensor
    weight: Tensor | None = None  # the BatchNorm's
    bias: Tensor | None = None
    conv_weight: Tensor | None = None
    conv_bias: Tensor | None = None
    mean: Tensor | None = None  # non-differentiable: the statistics the BatchNorm normalizes with
    var: Tensor | None = None


def run_bn_relu_conv(
    kernels: KernelSet, bn: BatchNormParams, y: Tensor, stats: Sequence[Tensor], conv: ConvParams,
    conv_stats: bool,
) -> tuple[Tensor, ...]:
    """conv(relu(bn(y))) as :func:`run_conv` returns it; `stats` are y's batch statistics (none when `bn` uses
    its running ones)."""
    mean, var = stats or (bn.running_mean, bn.running_var)
    config = BatchNormReluConvConfig(kernels, BatchNormSpec.of(bn), conv[2:], conv_stats)
    return _BatchNormReluConvFunction.apply(
        config, *BatchNormReluConvInputs(y, bn.weight, bn.bias, conv.weight, conv.bias, mean, var))


class _BatchNormReluConvFunction(torch.autograd.Function):
    """conv(relu(BN(y))): the conv's input is normalized as it is consumed and never saved; backward recomputes
    it. Saves y and per-channel vectors (docs/design.md §4: the prologue fusion)."""

    @staticmethod
    def forward(ctx, config: BatchNormReluConvConfig, *tensors: Tensor | None) -> tuple[Tensor, ...]:
        inputs = BatchNormReluConvInputs._make(tensors)
        y, weight, bias = inputs.y, inputs.weight, inputs.bias
        conv_weight, conv_bias = inputs.conv_weight, inputs.conv_bias
        affine = config.bn.affine(config.kernels, y, inputs.mean, inputs.var, weight, bias)
        out, *out_stats = config.kernels.bn_relu_conv(
            y, affine.mean, affine.scale, affine.shift, ConvParams(conv_weight, conv_bias, *config.geometry),
            config.stats)
        ctx.config = config
        ctx.save_for_backward(y, *affine, weight, bias, conv_weight, conv_bias)
        return _with_stats(ctx, out, out_stats)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, *_) -> tuple[Tensor | None, ...]:
        y, mean, invstd, scale, shift, weight, bias, conv_weight, conv_bias = ctx.saved_tensors
        config, need = ctx.config, BatchNormReluConvInputs._make(ctx.needs_input_grad[1:])
        kernels = config.kernels
        a = kernels.bn_act(y, mean, scale, shift, relu=True)
        grad_a, grad_conv_weight, grad_conv_bias = kernels.conv_backward(
            grad_out, a, ConvParams(conv_weight, conv_bias, *config.geometry),
            need_input=need.y or need.weight or need.bias, need_weight=need.conv_weight, need_bias=need.conv_bias)
        grad_y = grad_weight = grad_bias = None
        if grad_a is not None:
            grad_y, grad_weight, grad_bias = _bn_relu_backward(kernels, config.bn, grad_a, y, mean, invstd, scale,
                                                               shift, weight)
        return None, *BatchNormReluConvInputs(
            y=grad_y if need.y else None, weight=_param_grad(grad_weight, weight, need.weight),
            bias=_param_grad(grad_bias, bias, need.bias), conv_weight=grad_conv_weight, conv_bias=grad_conv_bias)


# ---------------------------------------------------------------------------------------------------------------
# BN (+ residual) -> ReLU


class Recompute(NamedTuple):
    """The minimum-memory policy's recipe for the convolution outputs a BN-act node normalizes, which it then does
    not keep: y = conv(relu(bn_source(source))) (a block's last unit, from the unit before it, whose node keeps
    `source` anyway) and, for a projection shortcut, y2 = conv2(source2) (from the block input)."""

    source_bn: BatchNormSpec | None  # None: y is kept, not recomputed
    geometry: tuple | None  # the last convolution's, as in ConvConfig
    geometry2: tuple | None  # the projection's; None: y2 (if any) is kept


class BatchNormActConfig(NamedTuple):
    kernels: KernelSet
    bn: BatchNormSpec
    relu: bool
    zero_pad: ZeroPadIdentity | None  # option A: the residual is x, subsampled and zero-padded
    bn2: BatchNormSpec | None  # a projection shortcut's BatchNorm
    recompute: Recompute | None = None


class BatchNormActInputs(NamedTuple):
    y: Tensor
    weight: Tensor | None = None  # the BatchNorm's
    bias: Tensor | None = None
    residual: Tensor | None = None  # an identity shortcut's (option A's: before subsampling and padding)
    y2: Tensor | None = None  # a projection shortcut's convolution output, and its BatchNorm's weight and bias
    weight2: Tensor | None = None
    bias2: Tensor | None = None
    mean: Tensor | None = None  # non-differentiable: the statistics the BatchNorms normalize with
    var: Tensor | None = None
    mean2: Tensor | None = None
    var2: Tensor | None = None
    # The Recompute recipe's tensors (this node passes no gradient to them: the nodes that made y and y2 do):
    source: Tensor | None = None
    source_weight: Tensor | None = None
    source_bias: Tensor | None = None
    source_mean: Tensor | None = None
    source_var: Tensor | None = None
    conv_weight: Tensor | None = None
    conv_bias: Tensor | None = None
    source2: Tensor | None = None
    conv2_weight: Tensor | None = None
    conv2_bias: Tensor | None = None


class RecomputeSource(NamedTuple):
    """What run_bn_act needs to recompute y instead of keeping it: y = conv(relu(bn(source))), bn with `stats`
    (the source's batch statistics, none when bn uses its running ones)."""

    source: Tensor
    bn: BatchNormParams
    stats: Sequence[Tensor]
    conv: ConvParams


def run_bn_act(
    kernels: KernelSet, bn: BatchNormParams, y: Tensor, stats: Sequence[Tensor], relu: bool,
    residual: Tensor | None = None, zero_pad: ZeroPadIdentity | None = None,
    projection: tuple[BatchNormParams, Tensor, Sequence[Tensor]] | None = None,
    recompute: RecomputeSource | None = None, recompute_projection: tuple[Tensor, ConvParams] | None = None,
) -> Tensor:
    """[relu](bn(y) + R): R is `residual` itself (option A's subsampled, zero-padded `residual` when `zero_pad`
    is given), or bn2(y2) for a `projection` (bn2, y2, y2's batch statistics), or absent. `stats` are y's batch
    statistics (none when `bn` uses its running ones). With `recompute` (and `recompute_projection`: the
    projection's input and convolution), backward recomputes y (y2) from them rather than keeping it."""
    mean, var = stats or (bn.running_mean, bn.running_var)
    inputs = BatchNormActInputs(y, bn.weight, bn.bias, residual, mean=mean, var=var)
    bn2_spec = None
    if projection is not None:
        bn2, y2, stats2 = projection
        mean2, var2 = stats2 or (bn2.running_mean, bn2.running_var)
        bn2_spec = BatchNormSpec.of(bn2)
        inputs = inputs._replace(residual=None, y2=y2, weight2=bn2.weight, bias2=bn2.bias, mean2=mean2, var2=var2)
    plan = None
    if recompute is not None or recompute_projection is not None:
        plan = Recompute(None, None, None)
        if recompute is not None:
            source_mean, source_var = recompute.stats or (recompute.bn.running_mean, recompute.bn.running_var)
            plan = plan._replace(source_bn=BatchNormSpec.of(recompute.bn), geometry=recompute.conv[2:])
            inputs = inputs._replace(
                source=recompute.source, source_weight=recompute.bn.weight, source_bias=recompute.bn.bias,
                source_mean=source_mean, source_var=source_var, conv_weight=recompute.conv.weight,
                conv_bias=recompute.conv.bias)
        if recompute_projection is not None:
            source2, conv2 = recompute_projection
            plan = plan._replace(geometry2=conv2[2:])
            inputs = inputs._replace(source2=source2, conv2_weight=conv2.weight, conv2_bias=conv2.bias)
    config = BatchNormActConfig(kernels, BatchNormSpec.of(bn), relu, None if projection else zero_pad, bn2_spec,
                                plan)
    return _BatchNormActFunction.apply(config, *inputs)


class _BatchNormActFunction(torch.autograd.Function):
    """Saves y, the output (its ReLU mask) and, for a projection, y2; under a Recompute plan, instead of y (y2)
    what recomputes it: the source, its BatchNorm's affine vectors and the convolution's weight (the projection's
    input and weight), all of which other nodes keep anyway."""

    @staticmethod
    def forward(ctx, config: BatchNormActConfig, *tensors: Tensor | None) -> Tensor:
        inputs = BatchNormActInputs._make(tensors)
        y, weight, bias, residual, y2 = inputs.y, inputs.weight, inputs.bias, inputs.residual, inputs.y2
        kernels, plan = config.kernels, config.recompute
        affine = config.bn.affine(config.kernels, y, inputs.mean, inputs.var, weight, bias)
        if y2 is not None:
            affine2 = config.bn2.affine(config.kernels, y2, inputs.mean2, inputs.var2, inputs.weight2, inputs.bias2)
            out = kernels.bn_act(y, affine.mean, affine.scale, affine.shift, y2, affine2.mean, affine2.scale,
                                 affine2.shift, config.relu)
            second = (affine2.mean, affine2.invstd, inputs.weight2, inputs.bias2)
        else:
            out = kernels.bn_act(y, affine.mean, affine.scale, affine.shift, residual, relu=config.relu,
                                 zero_pad=config.zero_pad)
            second = (None,) * 4
        source = (None,) * 6
        if plan is not None and plan.source_bn is not None:
            source_affine = plan.source_bn.affine(config.kernels, inputs.source, inputs.source_mean,
                                                  inputs.source_var, inputs.source_weight, inputs.source_bias)
            source = (inputs.source, source_affine.mean, source_affine.scale, source_affine.shift,
                      inputs.conv_weight, inputs.conv_bias)
            y = None
        source2 = (None,) * 3
        if plan is not None and plan.geometry2 is not None:
            source2 = (inputs.source2, inputs.conv2_weight, inputs.conv2_bias)
            y2 = None
        ctx.config = config
        ctx.residual_shape = residual.shape if residual is not None else None
        ctx.save_for_backward(y, out if config.relu else None, affine.mean, affine.invstd, weight, bias, y2,
                              *second, *source, *source2)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (y, out, mean, invstd, weight, bias, y2, mean2, invstd2, weight2, bias2,
         source, source_mean, source_scale, source_shift, conv_weight, conv_bias,
         source2, conv2_weight, conv2_bias) = ctx.saved_tensors
        config, need = ctx.config, BatchNormActInputs._make(ctx.needs_input_grad[1:])
        kernels, plan = config.kernels, config.recompute
        if source is not None:
            y = kernels.bn_relu_conv(source, source_mean, source_scale, source_shift,
                                     ConvParams(conv_weight, conv_bias, *plan.geometry), False)[0]
        if source2 is not None:
            y2 = kernels.conv_stats(source2, ConvParams(conv2_weight, conv2_bias, *plan.geometry2), False)[0]
        grad_out = dense_like(grad_out, y)
        count = y.numel() // y.shape[1]
        sum_dy, sum_dy_xmu, sum_dy_xmu2 = kernels.backward_reduce(grad_out, out, y, mean, y2, mean2)
        coefs, grad_weight, grad_bias = config.bn.gradients(config.kernels, sum_dy, sum_dy_xmu, invstd, weight, count)
        coefs2 = grad_weight2 = grad_bias2 = None
        if y2 is not None:  # the projection's BN shares the masked gradient, so one pass serves both
            coefs2, grad_weight2, grad_bias2 = config.bn2.gradients(config.kernels, sum_dy, sum_dy_xmu2, invstd2,
                                                                    weight2, count)
        grad_y, grad_other = kernels.backward_elemt(
            grad_out, out, y, mean, coefs, y2, mean2, coefs2, residual_grad=need.residual)
        grad_residual = None
        if need.residual:
            zero_pad = config.zero_pad
            grad_residual = grad_other if zero_pad is None else zero_pad.input_gradient(grad_other, ctx.residual_shape)
        return None, *BatchNormActInputs(
            y=grad_y if need.y else None,
            weight=_param_grad(grad_weight, weight, need.weight), bias=_param_grad(grad_bias, bias, need.bias),
            residual=grad_residual,
            y2=grad_other if y2 is not None and need.y2 else None,
            weight2=_param_grad(grad_weight2, weight2, need.weight2), bias2=_param_grad(grad_bias2, bias2, need.bias2))


# ---------------------------------------------------------------------------------------------------------------
# BN -> ReLU -> max pool (a ResNet stem under the minimum-memory policy)


class BatchNormReluMaxPoolConfig(NamedTuple):
    kernels: KernelSet
    bn: BatchNormSpec
    pool: MaxPoolParams


class BatchNormReluMaxPoolInputs(NamedTuple):
    y: Tensor
    weight: Tensor | None = None
    bias: Tensor | None = None
    mean: Tensor | None = None  # non-differentiable, as in BatchNormReluConvInputs
    var: Tensor | None = None


def run_bn_relu_max_pool(
    kernels: KernelSet, bn: BatchNormParams, y: Tensor, stats: Sequence[Tensor], pool: MaxPoolParams
) -> Tensor:
    """max_pool(relu(bn(y))), keeping only y for backward; `stats` as in run_bn_act."""
    mean, var = stats or (bn.running_mean, bn.running_var)
    config = BatchNormReluMaxPoolConfig(kernels, BatchNormSpec.of(bn), pool)
    return _BatchNormReluMaxPoolFunction.apply(config, *BatchNormReluMaxPoolInputs(y, bn.weight, bn.bias, mean, var))


class _BatchNormReluMaxPoolFunction(torch.autograd.Function):
    """max_pool(relu(BN(y))): keeps y and per-channel vectors, where the separate ops keep y, the activation
    (the ReLU's mask and the pool's input) and the pool's int64 indices; backward recomputes the activation and
    the indices (the same kernels, so the same values) and runs the pool's and BN's backward as they would."""

    @staticmethod
    def forward(ctx, config: BatchNormReluMaxPoolConfig, *tensors: Tensor | None) -> Tensor:
        inputs = BatchNormReluMaxPoolInputs._make(tensors)
        affine = config.bn.affine(config.kernels, inputs.y, inputs.mean, inputs.var, inputs.weight, inputs.bias)
        a = config.kernels.bn_act(inputs.y, affine.mean, affine.scale, affine.shift, relu=True)
        ctx.config = config
        ctx.save_for_backward(inputs.y, *affine, inputs.weight, inputs.bias)
        return config.pool.apply(a)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        y, mean, invstd, scale, shift, weight, bias = ctx.saved_tensors
        config, need = ctx.config, BatchNormReluMaxPoolInputs._make(ctx.needs_input_grad[1:])
        a = config.kernels.bn_act(y, mean, scale, shift, relu=True)
        pool = config.pool
        _, indices = torch.ops.aten.max_pool2d_with_indices(a, *pool)
        grad_a = torch.ops.aten.max_pool2d_with_indices_backward(grad_out, a, *pool, indices)
        grad_y, grad_weight, grad_bias = _bn_relu_backward(config.kernels, config.bn, grad_a, y, mean, invstd, scale,
                                                           shift, weight)
        return None, *BatchNormReluMaxPoolInputs(
            y=grad_y if need.y else None, weight=_param_grad(grad_weight, weight, need.weight),
            bias=_param_grad(grad_bias, bias, need.bias))
