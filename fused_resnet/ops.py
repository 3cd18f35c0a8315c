"""The fused ops: argument checks, backend dispatch, and autograd over the backend kernels.

Three ops serve every module of the library:

* :func:`batch_norm_act` — ``[relu](batch_norm(input) + residual)``, the F.batch_norm of a fused world;
* :func:`conv_bn_relu` — ``relu(batch_norm(conv(x)))``;
* :func:`residual_block` — ``relu(F(x) + shortcut(x))`` for a chain of conv-BN units (BasicBlock: two,
  Bottleneck: three) and an identity, projection or absent shortcut.

On the ``torch`` backend they run the reference composite (:mod:`fused_resnet.reference`). On the others, in
training (and whenever a gradient is needed) a block runs as a chain of autograd nodes (see the section below)
that keep only the raw convolution outputs, the block output and per-channel statistics for backward: the
normalized activations between convolutions are recomputed there, never saved. In inference (no gradient,
running statistics) BatchNorm is folded into each convolution's weights, cached per module, and bias, residual
and ReLU run in the convolution's epilogue.

Every check happens before anything is computed or updated, so a call that raises changes no running statistic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import reference
from .backends import select_backend
from .kernels import BackwardCoefs, NativeKernels, kernels_for
from .params import BatchNormParams, ConvBN, ConvParams, ZeroPadIdentity, update_running_stats
from .tensors import accumulation_dtype, as_dtype

# A projection, "identity", option A's zero-padded identity, or None (a plain block).
Shortcut = ConvBN | ZeroPadIdentity | str | None

# ---------------------------------------------------------------------------------------------------------------
# Argument checks


def _describe(t: Tensor) -> str:
    return f"{t.dtype} tensor of shape {list(t.shape)} on {t.device}"


def _check_activation(op: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: expected {name} to be a Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{op}: expected {name} to be 4-D (N, C, H, W), got a {_describe(t)}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: expected {name} to be floating-point, got a {_describe(t)}")
    if t.numel() == 0:
        raise ValueError(f"{op}: expected a non-empty {name}, got a {_describe(t)}")
    return t


def _check_like(op: str, name: str, t: Tensor, ref: Tensor, ref_name: str, *, dtype: bool = True) -> None:
    if t.device != ref.device:
        raise RuntimeError(f"{op}: expected {name} on {ref.device} like {ref_name}, got a {_describe(t)}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{op}: expected {name} of dtype {ref.dtype} like {ref_name}, got a {_describe(t)}")


def _check_channel_vector(op: str, name: str, t: Tensor | None, channels: int, ref: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor) or t.shape != (channels,):
        got = f"a {_describe(t)}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{op}: expected {name} to hold {channels} per-channel values, got {got}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: expected {name} to be floating-point, got a {_describe(t)}")
    _check_like(op, name, t, ref, "the input", dtype=False)


def _check_batch_norm(op: str, label: str, bn: BatchNormParams, y_shape: Sequence[int], ref: Tensor) -> None:
    """Checks a BatchNorm on a conv output of `y_shape`; `label` prefixes its field names ("" for none)."""
    name = (lambda field: f"{label}.{field}") if label else (lambda field: field)
    channels = y_shape[1]
    for field in ("weight", "bias", "running_mean", "running_var"):
        vector = getattr(bn, field)
        _check_channel_vector(op, name(field), vector, channels, ref)
        if vector is not None:
            _check_batch_norm_dtype(op, name(field), vector, ref)
    if (bn.running_mean is None) != (bn.running_var is None):
        raise ValueError(f"{op}: expected both {name('running_mean')} and {name('running_var')}, or neither")
    for field in ("running_mean", "running_var"):
        if getattr(bn, field) is not None and getattr(bn, field).requires_grad:
            # F.batch_norm refuses them too; caught here, before an earlier unit's statistics have moved.
            raise ValueError(f"{op}: expected {name(field)} not to require grad (running statistics are updated "
                             f"in place, outside autograd), got one that does")
    if not _is_number(bn.eps) or not bn.eps > 0:  # `not >` also rejects NaN
        raise ValueError(f"{op}: expected {name('eps')} > 0, got {bn.eps!r}")
    if not isinstance(bn.training, bool):
        raise TypeError(f"{op}: expected {name('training')} to be a bool, got {type(bn.training).__name__}")
    if bn.momentum is not None and not _is_number(bn.momentum):
        raise TypeError(f"{op}: expected {name('momentum')} to be a number or None, got {type(bn.momentum).__name__}")
    if bn.momentum is None and bn.updates_running_stats and bn.num_batches_tracked is None:
        raise ValueError(
            f"{op}: expected a number for {name('momentum')}: momentum=None (a cumulative average) needs "
            f"{name('num_batches_tracked')} to count the batches, and there is none"
        )
    if bn.use_batch_stats:
        count = y_shape[0] * y_shape[2] * y_shape[3]
        if count <= 1:
            # The message of torch.nn.functional.batch_norm, which users know.
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {torch.Size(y_shape)}")


def _is_number(value: object) -> bool:
    """A real Python or NumPy scalar (F.batch_norm takes either for eps and momentum), not a tensor or a string."""
    return not isinstance(value, Tensor) and hasattr(type(value), "__float__")


def _check_batch_norm_dtype(op: str, name: str, t: Tensor, ref: Tensor) -> None:
    """A BatchNorm vector has the dtype of the activations it normalizes, or float32 for float16/bfloat16 ones (the
    mixed precision F.batch_norm accepts); under autocast the convolution before it decides that dtype."""
    if t.dtype == ref.dtype or _autocast(ref):
        return
    if t.dtype == torch.float32 and ref.dtype in (torch.float16, torch.bfloat16):
        return
    raise TypeError(f"{op}: expected {name} of dtype {ref.dtype} like the input (or torch.float32 for a float16 or "
                    f"bfloat16 input), got a {_describe(t)}")


def _check_unit(op: str, where: str, unit: object) -> ConvBN:
    if not isinstance(unit, ConvBN):
        raise TypeError(f"{op}: expected {where} to be a ConvBN(conv, bn, name), got {type(unit).__name__}")
    if not isinstance(unit.conv, ConvParams) or not isinstance(unit.bn, BatchNormParams):
        raise TypeError(
            f"{op}: expected {unit.name} to hold a ConvParams and a BatchNormParams, got "
            f"{type(unit.conv).__name__} and {type(unit.bn).__name__}"
        )
    return unit


def _is_int_pair(value: object, minimum: int) -> bool:
    return (isinstance(value, tuple | list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value))


def _check_geometry(op: str, label: str, conv: ConvParams) -> None:
    """stride, padding and dilation as nn.Conv2d holds them: pairs of ints (a stride or dilation of 0 or a
    negative padding would otherwise surface as a division by zero or a wrong shape deep in a kernel)."""
    for field, minimum in (("stride", 1), ("padding", 0), ("dilation", 1)):
        value = getattr(conv, field)
        if not _is_int_pair(value, minimum):
            raise ValueError(f"{op}: expected {label}.{field} to be a pair of integers >= {minimum}, got {value!r}")
    if not isinstance(conv.groups, int) or isinstance(conv.groups, bool):
        raise TypeError(f"{op}: expected {label}.groups to be an int, got {type(conv.groups).__name__}")


def _autocast(t: Tensor) -> bool:
    """Whether autocast is on for `t`'s device (meta and other devices have none)."""
    return torch.amp.is_autocast_available(t.device.type) and torch.is_autocast_enabled(t.device.type)


def _check_conv(op: str, label: str, conv: ConvParams, x_shape: Sequence[int], ref: Tensor) -> list[int]:
    """Checks `conv` on an input of `x_shape` and returns its output shape."""
    w = conv.weight
    if not isinstance(w, Tensor) or w.dim() != 4:
        got = f"a {_describe(w)}" if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"{op}: expected {label}.weight to be 4-D (out, in/groups, kh, kw), got {got}")
    # Under autocast a convolution takes any floating dtypes and runs in the autocast one, as F.conv2d does.
    _check_like(op, f"{label}.weight", w, ref, "the input", dtype=not _autocast(ref))
    if not w.is_floating_point():
        raise TypeError(f"{op}: expected {label}.weight to be floating-point, got a {_describe(w)}")
    _check_geometry(op, label, conv)
    if conv.groups < 1 or x_shape[1] % conv.groups or w.shape[0] % conv.groups:
        raise ValueError(
            f"{op}: {label} has groups={conv.groups}, which must divide its input channels ({x_shape[1]}) "
            f"and output channels ({w.shape[0]})"
        )
    if w.shape[1] * conv.groups != x_shape[1]:
        raise ValueError(
            f"{op}: {label}.weight of shape {list(w.shape)} with groups={conv.groups} expects an input with "
            f"{w.shape[1] * conv.groups} channels, got one of shape {list(x_shape)}"
        )
    if conv.bias is not None:
        _check_channel_vector(op, f"{label}.bias", conv.bias, w.shape[0], ref)
        _check_like(op, f"{label}.bias", conv.bias, ref, "the input", dtype=not _autocast(ref))
    out_h, out_w = conv.output_size(x_shape[2], x_shape[3])
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"{op}: {label} (kernel {list(w.shape[-2:])}, stride {list(conv.stride)}, padding "
            f"{list(conv.padding)}, dilation {list(conv.dilation)}) on an input of shape {list(x_shape)} "
            f"gives an empty output ({out_h}x{out_w})"
        )
    return [x_shape[0], w.shape[0], out_h, out_w]


def _check_block(
    op: str, x: Tensor, units: Sequence[ConvBN], shortcut: Shortcut, shortcut_input: Tensor | None = None
) -> list[list[int]]:
    """Checks a block's arguments; returns the output shape of every unit (the projection's last)."""
    _check_activation(op, "x", x)
    if shortcut_input is not None:
        if not isinstance(shortcut, ConvBN):
            raise ValueError(f"{op}: shortcut_input is the input of a projection shortcut, but the shortcut is "
                             f"{shortcut!r}")
        _check_activation(op, "shortcut_input", shortcut_input)
        _check_like(op, "shortcut_input", shortcut_input, x, "x")
    if isinstance(units, ConvBN) or not isinstance(units, Sequence):
        raise TypeError(f"{op}: expected units to be a sequence of ConvBN, got a {type(units).__name__}")
    if len(units) == 0:
        raise ValueError(f"{op}: expected at least one conv/bn unit")
    shape = list(x.shape)
    shapes = []
    for index, unit in enumerate(units):
        _check_unit(op, f"units[{index}]", unit)
        shape = _check_conv(op, unit.name, unit.conv, shape, x)
        _check_batch_norm(op, unit.name, unit.bn, shape, x)
        shapes.append(shape)
    if shortcut == "identity":
        if list(x.shape) != shape:
            raise ValueError(
                f"{op}: an identity shortcut needs the block's output shape {shape} to equal its input's "
                f"{list(x.shape)}; use a projection shortcut when the shape changes"
            )
    elif isinstance(shortcut, ConvBN):
        _check_unit(op, "shortcut", shortcut)
        projected = x if shortcut_input is None else shortcut_input
        shortcut_shape = _check_conv(op, shortcut.name, shortcut.conv, list(projected.shape), x)
        _check_batch_norm(op, shortcut.name, shortcut.bn, shortcut_shape, x)
        if shortcut_shape != shape:
            raise ValueError(
                f"{op}: the projection shortcut's output shape {shortcut_shape} differs from the block's {shape}"
            )
        shapes.append(shortcut_shape)
    elif isinstance(shortcut, ZeroPadIdentity):
        stride, before = shortcut
        subsampled = [x.shape[0], x.shape[1], *((size - 1) // stride + 1 for size in x.shape[2:])] if stride >= 1 else []
        if stride < 1 or subsampled[2:] != shape[2:] or before < 0 or before + x.shape[1] > shape[1]:
            raise ValueError(
                f"{op}: a zero-padded identity shortcut (stride {stride}, {before} zero channels before) cannot take "
                f"the input of shape {list(x.shape)} to the block's output shape {shape}"
            )
    elif shortcut is not None:
        raise ValueError(
            f"{op}: expected shortcut to be 'identity', a ConvBN projection, a ZeroPadIdentity or None, "
            f"got {shortcut!r}"
        )
    return shapes


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm arithmetic shared by the autograd functions (per-channel vectors in the accumulation dtype)


class _BNSpec(NamedTuple):
    """What an autograd node needs to know of a BatchNorm besides its tensors."""

    eps: float
    use_batch_stats: bool
    process_group: object | None = None  # a synchronized BatchNorm's (its backward sums over the group)


def _spec(bn: BatchNormParams) -> _BNSpec:
    return _BNSpec(bn.eps, bn.use_batch_stats, bn.process_group)


def _affine(
    y: Tensor, spec: _BNSpec, batch_stats: tuple[Tensor, Tensor] | None, weight: Tensor | None,
    bias: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, invstd, scale, shift) so that BN(y) = y * scale + shift, from `batch_stats` (mean, biased variance,
    computed where y was made) when the BN uses batch statistics, else from the running ones."""
    acc = accumulation_dtype(y.dtype)
    if spec.use_batch_stats:
        mean, var = batch_stats
    else:
        mean, var = as_dtype(running_mean, acc), as_dtype(running_var, acc)
    invstd = torch.rsqrt(var + spec.eps)
    scale = invstd * as_dtype(weight, acc) if weight is not None else invstd
    shift = torch.addcmul(as_dtype(bias, acc), mean, scale, value=-1) if bias is not None else -mean * scale
    return mean, invstd, scale, shift


def _backward_coefs(
    sum_dy: Tensor, sum_dy_xmu: Tensor, invstd: Tensor, weight: Tensor | None, use_batch_stats: bool, count: int
) -> tuple[BackwardCoefs, Tensor, Tensor]:
    """The coefficients of BN's input gradient, grad_y = k_dy*g + k_xmu*(y - mean) + k_0 (g masked by the ReLU),
    and the gradients of the BN weight and bias. With batch statistics the mean and variance depend on y:
        grad_y = w*invstd * (g - mean(g) - (y - mean) * invstd^2 * mean(g * (y - mean)))."""
    w_invstd = invstd * as_dtype(weight, invstd.dtype) if weight is not None else invstd
    sum_dy_xhat = sum_dy_xmu * invstd  # also the weight's gradient
    if use_batch_stats:
        # invstd^3 on its own underflows fp32 for a spread above ~4e12 (bf16 activations reach 1e38): multiplying
        # sum(g * x_hat) by invstd and then w*invstd keeps every intermediate in range.
        coefs = (w_invstd, (sum_dy_xhat * invstd).mul_(w_invstd).mul_(-1.0 / count),
                 (w_invstd * sum_dy).mul_(-1.0 / count))
    else:
        zeros = torch.zeros_like(invstd)
        coefs = (w_invstd, zeros, zeros)
    return coefs, sum_dy_xhat, sum_dy


# Synchronized BatchNorm (nn.SyncBatchNorm): the batch statistics of every rank of a process group together.


def _gather_over(group: object, vector: Tensor) -> Tensor:
    """Every rank's `vector` in `group`, stacked in rank order, in float64: counts stay exact, and sums over the
    ranks are taken in the same order on every rank."""
    vector = vector.to(torch.float64)
    gathered = [torch.empty_like(vector) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, vector, group=group)
    return torch.stack(gathered)


def _synchronized(bn: BatchNormParams, stats: Sequence[Tensor], shape: Sequence[int]) -> tuple[Sequence[Tensor], int]:
    """A BatchNorm's batch statistics (mean, biased variance; none when it uses running ones) of a conv output of
    `shape`, and their count per channel: over every rank of its process group when it has one, each rank's
    (count, mean, variance) merged as Chan et al. merge partial moments (no cancellation)."""
    count = shape[0] * shape[2] * shape[3]
    if not stats or bn.process_group is None:
        return stats, count
    mean, var = stats
    channels = mean.numel()
    rows = _gather_over(bn.process_group, torch.cat([mean.new_full((1,), count), mean, var]))
    counts, means, variances = rows[:, :1], rows[:, 1:1 + channels], rows[:, 1 + channels:]
    total = counts.sum()
    group_mean = (counts * means).sum(0) / total
    group_var = (counts * (variances + (means - group_mean).square())).sum(0) / total
    return (group_mean.to(mean.dtype), group_var.to(var.dtype)), int(total.item())


def _node_backward_coefs(
    spec: _BNSpec, sum_dy: Tensor, sum_dy_xmu: Tensor, invstd: Tensor, weight: Tensor | None, count: int
) -> tuple[BackwardCoefs, Tensor, Tensor]:
    """_backward_coefs of a node's BatchNorm. A synchronized one normalized with the group's mean and variance,
    so its input gradient takes sum_dy and sum_dy_xmu summed over the group; its weight and bias gradients stay
    this rank's, for DistributedDataParallel to average, as in nn.SyncBatchNorm's backward."""
    coefs, grad_weight, grad_bias = _backward_coefs(sum_dy, sum_dy_xmu, invstd, weight, spec.use_batch_stats, count)
    if spec.process_group is not None:
        channels = sum_dy.numel()
        sums = _gather_over(spec.process_group, torch.cat([sum_dy.new_full((1,), count), sum_dy, sum_dy_xmu])).sum(0)
        coefs = _backward_coefs(sums[1:1 + channels].to(sum_dy.dtype), sums[1 + channels:].to(sum_dy.dtype), invstd,
                                weight, True, int(sums[0].item()))[0]
    return coefs, grad_weight, grad_bias


def _memory_format_of(t: Tensor) -> torch.memory_format:
    channels_last = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _dense_like(t: Tensor, ref: Tensor) -> Tensor:
    """`t` dense in the layout of `ref` (NCHW or channels_last). Autograd may hand backward an expanded or
    differently laid out gradient; converting it once here spares each kernel its own copy."""
    return t.contiguous(memory_format=_memory_format_of(ref))


def _param_grad(grad: Tensor | None, param: Tensor | None, needed: bool) -> Tensor | None:
    """`grad` in the dtype of `param` when autograd needs it (BN vectors accumulate in fp32 for low precision)."""
    if not needed or grad is None or param is None:
        return None
    return as_dtype(grad, param.dtype)


# ---------------------------------------------------------------------------------------------------------------
# The autograd functions. A block runs as
#     conv -> [BN-ReLU -> conv] -> ... -> [BN (+ residual, itself possibly BN'd) -> ReLU]
# with one node per bracket, so that each releases its saved tensors as soon as its backward is done (one node
# for the whole block kept every saved activation to the end of its backward: on the CPU that higher peak cost
# page faults, and 10-30% of a Bottleneck's step). A node that makes a convolution output also returns its batch
# statistics when the BatchNorm after it needs them (a kernel set may compute them in the convolution's epilogue);
# the node consuming it takes them as non-differentiable inputs (BN's backward accounts for them itself). A node's
# BatchNorm arrives as its tensors and a _BNSpec.


def _bn_tensors(bn: BatchNormParams) -> tuple[Tensor | None, ...]:
    """What a node takes of a BatchNorm: weight, bias, and the running statistics only when it normalizes with
    them (in training they are updated after the node, from the batch statistics)."""
    running = (None, None) if bn.use_batch_stats else (bn.running_mean, bn.running_var)
    return bn.weight, bn.bias, *running


def _stats_inputs(stats: Sequence[Tensor]) -> tuple[Tensor | None, Tensor | None]:
    """A node's (mean, var) inputs from the statistics outputs of the node that made its input: two or none."""
    return (stats[0], stats[1]) if stats else (None, None)


def _conv_static(conv: ConvParams) -> tuple:
    return conv.stride, conv.padding, conv.dilation, conv.groups


def _stats_outputs(ctx, out: Tensor, stats: Sequence[Tensor]) -> tuple[Tensor, ...]:
    ctx.mark_non_differentiable(*stats)
    return (out, *stats)


class _ConvFunction(torch.autograd.Function):
    """conv(x), with the batch statistics of the output when `stats`. Saves x as the convolution consumed it
    (under autocast, the low-precision copy, as ATen's convolution saves it)."""

    @staticmethod
    def forward(ctx, kernels, conv_static, stats, x, weight, bias):
        y, *batch_stats = kernels.conv_stats(x, ConvParams(weight, bias, *conv_static), stats)
        ctx.kernels, ctx.conv_static, ctx.x_dtype = kernels, conv_static, x.dtype
        ctx.save_for_backward(as_dtype(x, y.dtype), weight, bias)
        return _stats_outputs(ctx, y, batch_stats)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, *_):
        x, weight, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x, grad_weight, grad_bias = ctx.kernels.conv_backward(
            grad_y, x, ConvParams(weight, bias, *ctx.conv_static), need_input=need[3], need_weight=need[4],
            need_bias=need[5])
        return None, None, None, None if grad_x is None else as_dtype(grad_x, ctx.x_dtype), grad_weight, grad_bias


class _BatchNormActFunction(torch.autograd.Function):
    """[relu](BN(y) + residual): the residual is `residual` itself (option A's subsampled, zero-padded `residual`
    when `padding` is given), or BN2(y2) (a projection shortcut), or absent. Saves y, the output (its ReLU mask)
    and, for a projection, y2."""

    @staticmethod
    def forward(ctx, kernels, spec, relu, y, mean, var, weight, bias, running_mean, running_var, residual, padding,
                spec2, y2, mean2, var2, weight2, bias2, running_mean2, running_var2):
        affine = _affine(y, spec, (mean, var), weight, bias, running_mean, running_var)
        affine2 = None
        if y2 is not None:
            affine2 = _affine(y2, spec2, (mean2, var2), weight2, bias2, running_mean2, running_var2)
            out = kernels.bn_act(y, affine[2], affine[3], y2, affine2[2], affine2[3], relu)
        else:
            out = kernels.bn_act(y, affine[2], affine[3], residual, relu=relu, padding=padding)
        ctx.kernels, ctx.specs, ctx.padding = kernels, (spec, spec2), padding
        ctx.residual_shape = residual.shape if residual is not None else None
        second = (y2, affine2[0], affine2[1], weight2, bias2) if y2 is not None else (None,) * 5
        ctx.save_for_backward(y, out if relu else None, affine[0], affine[1], weight, bias, *second)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        y, out, mean, invstd, weight, bias, y2, mean2, invstd2, weight2, bias2 = ctx.saved_tensors
        kernels, need = ctx.kernels, ctx.needs_input_grad
        grad_out = _dense_like(grad_out, y)
        count = y.numel() // y.shape[1]
        sum_dy, sum_dy_xmu, sum_dy_xmu2 = kernels.backward_reduce(grad_out, out, y, mean, y2, mean2)
        spec, spec2 = ctx.specs
        coefs, grad_weight, grad_bias = _node_backward_coefs(spec, sum_dy, sum_dy_xmu, invstd, weight, count)
        coefs2 = grad_weight2 = grad_bias2 = None
        if y2 is not None:  # the projection's BN shares the masked gradient, so one pass serves both
            coefs2, grad_weight2, grad_bias2 = _node_backward_coefs(spec2, sum_dy, sum_dy_xmu2, invstd2, weight2, count)
        residual_grad = ctx.residual_shape is not None and need[10]
        grad_y, grad_other = kernels.backward_elemt(
            grad_out, out, y, mean, coefs, y2, mean2, coefs2, residual_grad=residual_grad)
        grad_residual = grad_other if residual_grad else None
        if residual_grad and ctx.padding is not None:
            grad_residual = _unpad_gradient(grad_other, ctx.residual_shape, ctx.padding)
        return (
            None, None, None,
            grad_y if need[3] else None, None, None,
            _param_grad(grad_weight, weight, need[6]), _param_grad(grad_bias, bias, need[7]),
            None, None,
            grad_residual, None,
            None,
            grad_other if y2 is not None and need[13] else None, None, None,
            _param_grad(grad_weight2, weight2, need[16]), _param_grad(grad_bias2, bias2, need[17]),
            None, None,
        )


def _unpad_gradient(grad: Tensor, shape: torch.Size, padding: ZeroPadIdentity) -> Tensor:
    """The gradient of option A's shortcut with respect to x: the output gradient of x's channels, at the
    positions the subsampling kept; zero where x was skipped."""
    grad_x = grad.new_zeros(shape).contiguous(memory_format=_memory_format_of(grad))
    stride, begin = padding.stride, padding.channels_before
    grad_x[:, :, ::stride, ::stride] = grad[:, begin:begin + shape[1]]
    return grad_x


class _BatchNormReluConvFunction(torch.autograd.Function):
    """conv(relu(BN(y))), with the batch statistics of the output when `stats`: the conv's input is normalized as
    it is consumed and never saved; backward recomputes it. Saves y and per-channel vectors (DESIGN.md §4's
    prologue fusion)."""

    @staticmethod
    def forward(ctx, kernels, spec, conv_static, stats, y, mean, var, weight, bias, running_mean, running_var,
                conv_weight, conv_bias):
        affine = _affine(y, spec, (mean, var), weight, bias, running_mean, running_var)
        out, *out_stats = kernels.bn_relu_conv(
            y, affine[2], affine[3], ConvParams(conv_weight, conv_bias, *conv_static), stats)
        ctx.kernels, ctx.spec, ctx.conv_static = kernels, spec, conv_static
        ctx.save_for_backward(y, *affine, weight, bias, conv_weight, conv_bias)
        return _stats_outputs(ctx, out, out_stats)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *_):
        y, mean, invstd, scale, shift, weight, bias, conv_weight, conv_bias = ctx.saved_tensors
        kernels, need = ctx.kernels, ctx.needs_input_grad
        a = kernels.bn_act(y, scale, shift, relu=True)
        grad_a, grad_conv_weight, grad_conv_bias = kernels.conv_backward(
            grad_out, a, ConvParams(conv_weight, conv_bias, *ctx.conv_static),
            need_input=need[4] or need[7] or need[8], need_weight=need[11], need_bias=need[12])
        grad_y = grad_weight = grad_bias = None
        if grad_a is not None:
            grad_a = _dense_like(grad_a, a)
            sum_dy, sum_dy_xmu, _ = kernels.backward_reduce(grad_a, a, y, mean)
            coefs, grad_weight, grad_bias = _node_backward_coefs(
                ctx.spec, sum_dy, sum_dy_xmu, invstd, weight, y.numel() // y.shape[1])
            grad_y, _ = kernels.backward_elemt(grad_a, a, y, mean, coefs)
        return (
            None, None, None, None,
            grad_y if need[4] else None, None, None,
            _param_grad(grad_weight, weight, need[7]), _param_grad(grad_bias, bias, need[8]),
            None, None,
            grad_conv_weight, grad_conv_bias,
        )


def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Tensor | None = None,
    relu: bool = True,
    *,
    backend: str | None = None,
) -> Tensor:
    """``[relu](F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) + residual)``
    in one pass over the data (two in training: statistics, then the fused apply), with F.batch_norm's semantics:
    in training the running statistics, when given, take the batch mean and unbiased variance with `momentum`."""
    op = "batch_norm_act"
    _check_activation(op, "input", input)
    if not training and running_mean is None:
        raise ValueError(f"{op}: running_mean and running_var are required when training=False")
    bn = BatchNormParams(weight, bias, running_mean, running_var, None, momentum, eps, training)
    _check_batch_norm(op, "", bn, list(input.shape), input)
    if residual is not None:
        _check_activation(op, "residual", residual)
        _check_like(op, "residual", residual, input, "input")
        if residual.shape != input.shape:
            raise ValueError(f"{op}: expected residual of shape {list(input.shape)} like input, got {list(residual.shape)}")
    name = select_backend(input.device, backend)
    if name == "torch":
        return reference.batch_norm_act(input, bn, residual, relu)
    kernels = kernels_for(name)
    stats = kernels.batch_stats(input.detach()) if bn.use_batch_stats else (None, None)
    out = _BatchNormActFunction.apply(
        kernels, _spec(bn), relu, input, *stats, *_bn_tensors(bn), residual, None, *(None,) * 8)
    if bn.use_batch_stats:
        update_running_stats(bn, *stats, input.numel() // input.shape[1])
    return out


# ---------------------------------------------------------------------------------------------------------------
# residual_block and conv_bn_relu


_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# Fused optimizers (torch.optim.Adam(fused=True), and others written the same way) change parameters in place
# without bumping their version counters, so FoldedWeights also refolds after any torch.optim step: a Python call per
# step, once per process.
register_optimizer_step_post_hook(_count_optimizer_step)


class FoldedWeights:
    """A module's cache of BN-folded convolution weights for inference, one entry per conv-BN unit.

    An entry is reused while every source tensor is the same object at the same version (any in-place change
    through autograd-visible ops, load_state_dict, bumps the version; `.to()` makes new tensors) and no torch.optim
    optimizer has stepped since it was folded. Edits through `.data` bypass the version counter, as they bypass
    autograd's checks: after one, :meth:`clear` (or `fused_resnet.clear_folded_weights(model)`). An entry holds
    references to its sources, so a freed tensor's address cannot alias a live key. Not pickled."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[tuple, tuple, tuple[Tensor, Tensor]]] = {}  # (sources, versions, folded)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._entries = {}

    def clear(self) -> None:
        """Forgets every folded weight: the next inference call folds again."""
        self._entries.clear()

    def get(self, index: int, unit: ConvBN) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling():
            # A compiled graph folds on every call (a few per-channel ops the compiler fuses); version counters are
            # not values it can guard on.
            return fold_batch_norm(unit)
        sources = (unit.conv.weight, unit.conv.bias, unit.bn.weight, unit.bn.bias, unit.bn.running_mean, unit.bn.running_var)
        try:
            versions = tuple(t._version if t is not None else None for t in sources) + (unit.bn.eps, _optimizer_steps)
        except RuntimeError:  # inference tensors have no version counter: fold every time
            return fold_batch_norm(unit)
        entry = self._entries.get(index)
        if entry is not None and entry[1] == versions and all(a is b for a, b in zip(entry[0], sources)):
            return entry[2]
        folded = fold_batch_norm(unit)
        self._entries[index] = (sources, versions, folded)
        return folded


def clear_folded_weights(model: torch.nn.Module) -> None:
    """Makes every fused module of `model` fold its BatchNorms again at its next inference call: needed only after
    editing parameters or buffers through `.data` (which autograd's version counters, and so the cache, cannot
    see)."""
    for module in model.modules():
        folded = module.__dict__.get("_folded")
        if isinstance(folded, FoldedWeights):
            folded.clear()


@torch.no_grad()
def fold_batch_norm(unit: ConvBN) -> tuple[Tensor, Tensor]:
    """(weight, bias) of one convolution computing conv(x) followed by BN with running statistics."""
    conv, bn = unit.conv, unit.bn
    acc = accumulation_dtype(conv.weight.dtype)
    scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(acc)
    bias = -bn.running_mean.to(acc) * scale
    if bn.bias is not None:
        bias = bias + bn.bias.to(acc)
    if conv.bias is not None:
        bias = bias + conv.bias.to(acc) * scale
    weight = (conv.weight.to(acc) * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype)
    return weight, bias


def _inference_block(
    kernels: NativeKernels, x: Tensor, units: Sequence[ConvBN], shortcut: Shortcut, shortcut_input: Tensor,
    folded: FoldedWeights,
) -> Tensor:
    n = len(units)
    residual, padding = None, None
    if shortcut == "identity":
        residual = x
    elif isinstance(shortcut, ZeroPadIdentity):
        residual, padding = x, shortcut
    elif isinstance(shortcut, ConvBN):
        weight, bias = folded.get(n, shortcut)
        residual = kernels.conv_bias_act(shortcut_input, shortcut.conv, weight, bias, None, relu=False)
    a = x
    for i, unit in enumerate(units):
        weight, bias = folded.get(i, unit)
        last = i == n - 1
        a = kernels.conv_bias_act(a, unit.conv, weight, bias, residual if last else None, relu=True,
                                  padding=padding if last else None)
    return a


def _needs_autograd(inputs: Sequence[Tensor], units: Sequence[ConvBN]) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = (t for u in units for t in (u.conv.weight, u.conv.bias, u.bn.weight, u.bn.bias))
    return any(t.requires_grad for t in inputs) or any(t is not None and t.requires_grad for t in tensors)


def residual_block(
    x: Tensor,
    units: Sequence[ConvBN],
    shortcut: Shortcut = "identity",
    *,
    shortcut_input: Tensor | None = None,
    folded: FoldedWeights | None = None,
    backend: str | None = None,
) -> Tensor:
    """``relu(F(x) + shortcut(x))``: `units` are the block's convolutions with their BatchNorms (ReLU between
    them), `shortcut` is "identity", a projection ConvBN, option A's ZeroPadIdentity, or None. The projection
    convolves `shortcut_input` when given (timm's avg_down: the average-pooled x), else x. BatchNorm running
    statistics are updated as nn.BatchNorm2d updates them. `folded` caches BN-folded weights for inference between
    calls."""
    return _block("residual_block", x, units, shortcut, folded, backend, shortcut_input)


def _block(
    op: str, x: Tensor, units: Sequence[ConvBN], shortcut: Shortcut, folded: FoldedWeights | None, backend: str | None,
    shortcut_input: Tensor | None = None,
) -> Tensor:
    shapes = _check_block(op, x, units, shortcut, shortcut_input)
    name = select_backend(x.device, backend)
    every_unit = [*units, shortcut] if isinstance(shortcut, ConvBN) else list(units)
    if name == "torch":
        if any(u.bn.process_group is not None for u in every_unit):
            raise ValueError(f"{op}: the torch backend (the reference composite) does not synchronize BatchNorm "
                             "statistics over a process group; use the cpu or cuda backend")
        return reference.residual_block(x, units, shortcut, shortcut_input)
    kernels = kernels_for(name)
    projected = x if shortcut_input is None else shortcut_input
    if not _needs_autograd([x, projected], every_unit) and not any(u.bn.use_batch_stats for u in every_unit):
        return _inference_block(kernels, x, units, shortcut, projected,
                                folded if folded is not None else FoldedWeights())
    first = units[0]
    y, *y_stats = _ConvFunction.apply(
        kernels, _conv_static(first.conv), first.bn.use_batch_stats, x, first.conv.weight, first.conv.bias)
    batch_stats = [(first.bn, *_synchronized(first.bn, y_stats, shapes[0]))]
    for previous, unit, shape in zip(units[:-1], units[1:], shapes[1:]):
        y, *y_stats = _BatchNormReluConvFunction.apply(
            kernels, _spec(previous.bn), _conv_static(unit.conv), unit.bn.use_batch_stats, y,
            *_stats_inputs(batch_stats[-1][1]), *_bn_tensors(previous.bn), unit.conv.weight, unit.conv.bias)
        batch_stats.append((unit.bn, *_synchronized(unit.bn, y_stats, shape)))
    projection = (None,) * 8
    if isinstance(shortcut, ConvBN):
        y2, *y2_stats = _ConvFunction.apply(
            kernels, _conv_static(shortcut.conv), shortcut.bn.use_batch_stats, projected, shortcut.conv.weight,
            shortcut.conv.bias)
        batch_stats.append((shortcut.bn, *_synchronized(shortcut.bn, y2_stats, shapes[-1])))
        projection = (_spec(shortcut.bn), y2, *_stats_inputs(batch_stats[-1][1]), *_bn_tensors(shortcut.bn))
    identity = shortcut == "identity" or isinstance(shortcut, ZeroPadIdentity)
    padding = shortcut if isinstance(shortcut, ZeroPadIdentity) else None
    last = units[-1].bn
    out = _BatchNormActFunction.apply(
        kernels, _spec(last), True, y, *_stats_inputs(batch_stats[len(units) - 1][1]), *_bn_tensors(last),
        x if identity else None, padding, *projection)
    # The running statistics move only once every node has run.
    for bn, stats, count in batch_stats:
        if stats:
            update_running_stats(bn, *stats, count)
    return out


def conv_bn_relu(
    x: Tensor, unit: ConvBN, *, folded: FoldedWeights | None = None, backend: str | None = None
) -> Tensor:
    """``relu(batch_norm(conv(x)))`` with nn.BatchNorm2d's semantics (see :func:`residual_block`)."""
    return _block("conv_bn_relu", x, [unit], None, folded, backend)
