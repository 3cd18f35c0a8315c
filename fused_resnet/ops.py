"""The fused ops: argument checks, backend dispatch, and autograd over the backend kernels.

Three ops serve every module of the library:

* :func:`batch_norm_act` — ``[relu](batch_norm(input) + residual)``, the F.batch_norm of a fused world;
* :func:`conv_bn_relu` — ``relu(batch_norm(conv(x)))``;
* :func:`residual_block` — ``relu(F(x) + shortcut(x))`` for a chain of conv-BN units (BasicBlock: two,
  Bottleneck: three) and an identity, projection or absent shortcut.

On the ``torch`` backend they run the reference composite (:mod:`fused_resnet.reference`). On the others, in
training (and whenever a gradient is needed) they run one autograd function per op that keeps only the raw
convolution outputs and per-channel statistics for backward: the normalized activations between convolutions are
recomputed there, never saved. In inference (no gradient, running statistics) BatchNorm is folded into each
convolution's weights, cached per module, and bias, residual and ReLU run in the convolution's epilogue.

Every check happens before anything is computed or updated, so a call that raises changes no running statistic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import reference
from .backends import select_backend
from .kernels import BackwardCoefs, NativeKernels, accumulation_dtype, kernels_for
from .params import BatchNormParams, ConvBN, ConvParams, update_running_stats

Shortcut = ConvBN | str | None  # a projection, "identity", or None (a plain block)

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
        _check_channel_vector(op, name(field), getattr(bn, field), channels, ref)
    if (bn.running_mean is None) != (bn.running_var is None):
        raise ValueError(f"{op}: expected both {name('running_mean')} and {name('running_var')}, or neither")
    if bn.eps <= 0:
        raise ValueError(f"{op}: expected {name('eps')} > 0, got {bn.eps}")
    if bn.use_batch_stats:
        count = y_shape[0] * y_shape[2] * y_shape[3]
        if count <= 1:
            # The message of torch.nn.functional.batch_norm, which users know.
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {torch.Size(y_shape)}")


def _check_conv(op: str, label: str, conv: ConvParams, x_shape: Sequence[int], ref: Tensor) -> list[int]:
    """Checks `conv` on an input of `x_shape` and returns its output shape."""
    w = conv.weight
    if not isinstance(w, Tensor) or w.dim() != 4:
        got = f"a {_describe(w)}" if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"{op}: expected {label}.weight to be 4-D (out, in/groups, kh, kw), got {got}")
    _check_like(op, f"{label}.weight", w, ref, "the input")
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
        _check_like(op, f"{label}.bias", conv.bias, ref, "the input")
    out_h, out_w = conv.output_size(x_shape[2], x_shape[3])
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"{op}: {label} (kernel {list(w.shape[-2:])}, stride {list(conv.stride)}, padding "
            f"{list(conv.padding)}, dilation {list(conv.dilation)}) on an input of shape {list(x_shape)} "
            f"gives an empty output ({out_h}x{out_w})"
        )
    return [x_shape[0], w.shape[0], out_h, out_w]


def _check_block(op: str, x: Tensor, units: Sequence[ConvBN], shortcut: Shortcut) -> list[list[int]]:
    """Checks a block's arguments; returns the output shape of every unit (the projection's last)."""
    _check_activation(op, "x", x)
    if len(units) == 0:
        raise ValueError(f"{op}: expected at least one conv/bn unit")
    shape = list(x.shape)
    shapes = []
    for unit in units:
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
        shortcut_shape = _check_conv(op, shortcut.name, shortcut.conv, list(x.shape), x)
        _check_batch_norm(op, shortcut.name, shortcut.bn, shortcut_shape, x)
        if shortcut_shape != shape:
            raise ValueError(
                f"{op}: the projection shortcut's output shape {shortcut_shape} differs from the block's {shape}"
            )
        shapes.append(shortcut_shape)
    elif shortcut is not None:
        raise ValueError(f"{op}: expected shortcut to be 'identity', a ConvBN projection or None, got {shortcut!r}")
    return shapes


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm arithmetic shared by the autograd functions (per-channel vectors in the accumulation dtype)


def _affine(
    kernels: NativeKernels, y: Tensor, bn: BatchNormParams
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """(mean, invstd, scale, shift, biased batch variance or None) so that BN(y) = y * scale + shift."""
    acc = accumulation_dtype(y.dtype)
    if bn.use_batch_stats:
        mean, var = kernels.batch_stats(y)
        batch_var = var
    else:
        mean, var = bn.running_mean.to(acc), bn.running_var.to(acc)
        batch_var = None
    invstd = torch.rsqrt(var + bn.eps)
    scale = invstd * bn.weight.to(acc) if bn.weight is not None else invstd
    shift = bn.bias.to(acc) - mean * scale if bn.bias is not None else -mean * scale
    return mean, invstd, scale, shift, batch_var


def _backward_coefs(
    sum_dy: Tensor, sum_dy_xmu: Tensor, invstd: Tensor, weight: Tensor | None, use_batch_stats: bool, count: int
) -> tuple[BackwardCoefs, Tensor, Tensor]:
    """The coefficients of BN's input gradient, grad_y = k_dy*g + k_xmu*(y - mean) + k_0 (g masked by the ReLU),
    and the gradients of the BN weight and bias. With batch statistics the mean and variance depend on y:
        grad_y = w*invstd * (g - mean(g) - (y - mean) * invstd^2 * mean(g * (y - mean)))."""
    w_invstd = invstd * weight.to(invstd.dtype) if weight is not None else invstd
    if use_batch_stats:
        coefs = (w_invstd, -w_invstd * invstd * invstd * (sum_dy_xmu / count), -w_invstd * (sum_dy / count))
    else:
        zeros = torch.zeros_like(invstd)
        coefs = (w_invstd, zeros, zeros)
    return coefs, sum_dy_xmu * invstd, sum_dy


def _dense_like(t: Tensor, ref: Tensor) -> Tensor:
    """`t` dense in the layout of `ref` (NCHW or channels_last). Autograd may hand backward an expanded or
    differently laid out gradient; converting it once here spares each kernel its own copy."""
    channels_last = ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous()
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _param_grad(grad: Tensor | None, param: Tensor | None, needed: bool) -> Tensor | None:
    """`grad` in the dtype of `param` when autograd needs it (BN vectors accumulate in fp32 for low precision)."""
    if not needed or grad is None or param is None:
        return None
    return grad.to(param.dtype)


# ---------------------------------------------------------------------------------------------------------------
# batch_norm_act


class _BatchNormActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels, bn_static, relu, input, weight, bias, running_mean, running_var, residual):
        bn = dataclasses.replace(bn_static, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
        mean, invstd, scale, shift, batch_var = _affine(kernels, input, bn)
        out = kernels.bn_act(input, scale, shift, residual, relu=relu)
        ctx.kernels, ctx.use_batch_stats, ctx.has_residual = kernels, bn.use_batch_stats, residual is not None
        ctx.save_for_backward(input, out if relu else None, mean, invstd, weight, bias)
        stats = (mean, batch_var) if batch_var is not None else ()
        ctx.mark_non_differentiable(*stats)
        return (out, *stats)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *_):
        input, out, mean, invstd, weight, bias = ctx.saved_tensors
        kernels = ctx.kernels
        grad_out = _dense_like(grad_out, input)
        count = input.numel() // input.shape[1]
        sum_dy, sum_dy_xmu, _ = kernels.backward_reduce(grad_out, out, input, mean)
        coefs, grad_weight, grad_bias = _backward_coefs(sum_dy, sum_dy_xmu, invstd, weight, ctx.use_batch_stats, count)
        need = ctx.needs_input_grad
        grad_input, grad_residual = kernels.backward_elemt(
            grad_out, out, input, mean, coefs, residual_grad=ctx.has_residual and need[8]
        )
        return (
            None, None, None,
            grad_input if need[3] else None,
            _param_grad(grad_weight, weight, need[4]),
            _param_grad(grad_bias, bias, need[5]),
            None, None,
            grad_residual,
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
    out, *stats = _BatchNormActFunction.apply(
        kernels, dataclasses.replace(bn, weight=None, bias=None, running_mean=None, running_var=None), relu,
        input, weight, bias, running_mean if not bn.use_batch_stats else None,
        running_var if not bn.use_batch_stats else None, residual,
    )
    if stats:
        update_running_stats(bn, stats[0], stats[1], input.numel() // input.shape[1])
    return out


# ---------------------------------------------------------------------------------------------------------------
# residual_block and conv_bn_relu

_TENSORS_PER_UNIT = 6  # conv weight, conv bias, bn weight, bn bias, running mean, running var


def _unit_tensors(unit: ConvBN) -> list[Tensor | None]:
    bn = unit.bn
    running = (None, None) if bn.use_batch_stats else (bn.running_mean, bn.running_var)
    return [unit.conv.weight, unit.conv.bias, bn.weight, bn.bias, *running]


def _rebuild_unit(unit: ConvBN, tensors: Sequence[Tensor | None]) -> ConvBN:
    """`unit` with the tensors the autograd function received (the same tensors, seen through autograd)."""
    w, b, gamma, beta, running_mean, running_var = tensors
    conv, bn = unit.conv, unit.bn
    # Direct construction: dataclasses.replace costs 5x more, and this runs for every unit in forward and backward.
    return ConvBN(
        ConvParams(w, b, conv.stride, conv.padding, conv.dilation, conv.groups),
        BatchNormParams(gamma, beta, running_mean, running_var, bn.num_batches_tracked, bn.momentum, bn.eps,
                        bn.training),
        unit.name,
    )


class _ResidualBlockFunction(torch.autograd.Function):
    """relu(F(x) + shortcut(x)) over the kernels of one backend. Saves x, each raw convolution output, the block
    output (its ReLU mask) and per-channel vectors; the activations between convolutions are recomputed."""

    @staticmethod
    def forward(ctx, kernels, units, shortcut_kind, x, *flat):
        all_units = [_rebuild_unit(u, flat[i * _TENSORS_PER_UNIT:(i + 1) * _TENSORS_PER_UNIT]) for i, u in enumerate(units)]
        main = all_units[:-1] if shortcut_kind == "projection" else all_units
        ys, affines, stats = [], [], []
        a = x
        for i, unit in enumerate(main):
            y = kernels.conv(a, unit.conv)
            affine = _affine(kernels, y, unit.bn)
            ys.append(y)
            affines.append(affine)
            if i < len(main) - 1:
                a = kernels.bn_act(y, affine[2], affine[3], relu=True)
        residual = residual_scale = residual_shift = None
        if shortcut_kind == "identity":
            residual = x
        elif shortcut_kind == "projection":
            y_s = kernels.conv(x, all_units[-1].conv)
            affine = _affine(kernels, y_s, all_units[-1].bn)
            ys.append(y_s)
            affines.append(affine)
            residual, residual_scale, residual_shift = y_s, affine[2], affine[3]
        last = len(main) - 1
        out = kernels.bn_act(ys[last], affines[last][2], affines[last][3], residual, residual_scale, residual_shift)

        ctx.kernels, ctx.units, ctx.shortcut_kind = kernels, units, shortcut_kind
        ctx.save_for_backward(
            x, out, *flat, *ys, *(t for affine in affines for t in affine[:4])
        )
        for mean, _, _, _, batch_var in affines:
            if batch_var is not None:
                stats += [mean, batch_var]
        ctx.mark_non_differentiable(*stats)
        return (out, *stats)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *_):
        kernels, units, shortcut_kind = ctx.kernels, ctx.units, ctx.shortcut_kind
        saved = ctx.saved_tensors
        n = len(units)
        x, out = saved[0], saved[1]
        grad_out = _dense_like(grad_out, out)
        flat = saved[2:2 + n * _TENSORS_PER_UNIT]
        ys = saved[2 + n * _TENSORS_PER_UNIT:2 + n * _TENSORS_PER_UNIT + n]
        vectors = saved[2 + n * _TENSORS_PER_UNIT + n:]
        means, invstds, scales, shifts = (vectors[k::4] for k in range(4))
        all_units = [_rebuild_unit(u, flat[i * _TENSORS_PER_UNIT:(i + 1) * _TENSORS_PER_UNIT]) for i, u in enumerate(units)]
        projection = shortcut_kind == "projection"
        main = all_units[:-1] if projection else all_units
        need = ctx.needs_input_grad[4:]  # per flat tensor
        need_x = ctx.needs_input_grad[3]
        grads: list[Tensor | None] = [None] * len(flat)

        def needs(i: int, k: int) -> bool:
            return need[i * _TENSORS_PER_UNIT + k]

        def store_bn_grads(i: int, grad_weight: Tensor, grad_bias: Tensor) -> None:
            bn = all_units[i].bn
            grads[i * _TENSORS_PER_UNIT + 2] = _param_grad(grad_weight, bn.weight, needs(i, 2))
            grads[i * _TENSORS_PER_UNIT + 3] = _param_grad(grad_bias, bn.bias, needs(i, 3))

        def bn_coefs(i: int, sum_dy: Tensor, sum_dy_xmu: Tensor) -> BackwardCoefs:
            bn = all_units[i].bn
            count = ys[i].numel() // ys[i].shape[1]
            coefs, grad_weight, grad_bias = _backward_coefs(sum_dy, sum_dy_xmu, invstds[i], bn.weight, bn.use_batch_stats, count)
            store_bn_grads(i, grad_weight, grad_bias)
            return coefs

        # The block's last BN, the residual add and the ReLU: one reduction and one elementwise pass (covering
        # the projection's BN too, which shares the masked gradient).
        last = len(main) - 1
        s = n - 1  # the projection's index when there is one
        y_s, mean_s = (ys[s], means[s]) if projection else (None, None)
        sum_dy, sum_dy_xmu, sum_dy_xmu_s = kernels.backward_reduce(grad_out, out, ys[last], means[last], y_s, mean_s)
        coefs = bn_coefs(last, sum_dy, sum_dy_xmu)
        coefs_s = bn_coefs(s, sum_dy, sum_dy_xmu_s) if projection else None
        grad_y, grad_residual = kernels.backward_elemt(
            grad_out, out, ys[last], means[last], coefs, y_s, mean_s, coefs_s,
            residual_grad=shortcut_kind == "identity" and need_x,
        )

        grad_x = None
        for i in range(last, -1, -1):
            conv = main[i].conv
            a = x if i == 0 else kernels.bn_act(ys[i - 1], scales[i - 1], shifts[i - 1], relu=True)
            grad_a, grad_w, grad_b = kernels.conv_backward(
                grad_y, a, conv, need_input=i > 0 or need_x, need_weight=needs(i, 0), need_bias=needs(i, 1)
            )
            grads[i * _TENSORS_PER_UNIT] = grad_w
            grads[i * _TENSORS_PER_UNIT + 1] = grad_b
            if i > 0:
                grad_a = _dense_like(grad_a, a)
                sum_dy, sum_dy_xmu, _ = kernels.backward_reduce(grad_a, a, ys[i - 1], means[i - 1])
                grad_y, _ = kernels.backward_elemt(grad_a, a, ys[i - 1], means[i - 1], bn_coefs(i - 1, sum_dy, sum_dy_xmu))
            else:
                grad_x = grad_a

        if projection:
            grad_xs, grad_w, grad_b = kernels.conv_backward(
                grad_residual, x, all_units[s].conv, need_input=need_x, need_weight=needs(s, 0), need_bias=needs(s, 1)
            )
            grads[s * _TENSORS_PER_UNIT] = grad_w
            grads[s * _TENSORS_PER_UNIT + 1] = grad_b
            grad_residual = grad_xs
        if need_x and grad_residual is not None:
            grad_x = grad_x + grad_residual
        return (None, None, None, grad_x if need_x else None, *grads)


class FoldedWeights:
    """A module's cache of BN-folded convolution weights for inference, one entry per conv-BN unit.

    An entry is reused while every source tensor is the same object at the same version (any in-place change,
    an optimizer step or load_state_dict, bumps the version; `.to()` makes new tensors), so it is never stale.
    It holds references to its sources, so a freed tensor's address cannot alias a live key. Not pickled."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[tuple, tuple, tuple[Tensor, Tensor]]] = {}  # (sources, versions, folded)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._entries = {}

    def get(self, index: int, unit: ConvBN) -> tuple[Tensor, Tensor]:
        sources = (unit.conv.weight, unit.conv.bias, unit.bn.weight, unit.bn.bias, unit.bn.running_mean, unit.bn.running_var)
        try:
            versions = tuple(t._version if t is not None else None for t in sources) + (unit.bn.eps,)
        except RuntimeError:  # inference tensors have no version counter: fold every time
            return fold_batch_norm(unit)
        entry = self._entries.get(index)
        if entry is not None and entry[1] == versions and all(a is b for a, b in zip(entry[0], sources)):
            return entry[2]
        folded = fold_batch_norm(unit)
        self._entries[index] = (sources, versions, folded)
        return folded


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
    kernels: NativeKernels, x: Tensor, units: Sequence[ConvBN], shortcut: Shortcut, folded: FoldedWeights
) -> Tensor:
    n = len(units)
    residual = None
    if shortcut == "identity":
        residual = x
    elif isinstance(shortcut, ConvBN):
        weight, bias = folded.get(n, shortcut)
        residual = kernels.conv_bias_act(x, shortcut.conv, weight, bias, None, relu=False)
    a = x
    for i, unit in enumerate(units):
        weight, bias = folded.get(i, unit)
        a = kernels.conv_bias_act(a, unit.conv, weight, bias, residual if i == n - 1 else None, relu=True)
    return a


def _needs_autograd(x: Tensor, units: Sequence[ConvBN]) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(t is not None and t.requires_grad for u in units for t in _unit_tensors(u))


def residual_block(
    x: Tensor,
    units: Sequence[ConvBN],
    shortcut: Shortcut = "identity",
    *,
    folded: FoldedWeights | None = None,
    backend: str | None = None,
) -> Tensor:
    """``relu(F(x) + shortcut(x))``: `units` are the block's convolutions with their BatchNorms (ReLU between
    them), `shortcut` is "identity", a projection ConvBN applied to x, or None. BatchNorm running statistics are
    updated as nn.BatchNorm2d updates them. `folded` caches BN-folded weights for inference between calls."""
    return _block("residual_block", x, units, shortcut, folded, backend)


def _block(
    op: str, x: Tensor, units: Sequence[ConvBN], shortcut: Shortcut, folded: FoldedWeights | None, backend: str | None
) -> Tensor:
    shapes = _check_block(op, x, units, shortcut)
    name = select_backend(x.device, backend)
    if name == "torch":
        return reference.residual_block(x, units, shortcut)
    kernels = kernels_for(name)
    every_unit = [*units, shortcut] if isinstance(shortcut, ConvBN) else list(units)
    if not _needs_autograd(x, every_unit) and not any(u.bn.use_batch_stats for u in every_unit):
        return _inference_block(kernels, x, units, shortcut, folded if folded is not None else FoldedWeights())
    kind = "projection" if isinstance(shortcut, ConvBN) else ("identity" if shortcut == "identity" else "none")
    out, *stats = _ResidualBlockFunction.apply(
        kernels, tuple(every_unit), kind, x, *(t for u in every_unit for t in _unit_tensors(u))
    )
    batch_stats = iter(stats)
    for unit, (n, _, h, w) in zip(every_unit, shapes):
        if unit.bn.use_batch_stats:
            update_running_stats(unit.bn, next(batch_stats), next(batch_stats), n * h * w)
    return out


def conv_bn_relu(
    x: Tensor, unit: ConvBN, *, folded: FoldedWeights | None = None, backend: str | None = None
) -> Tensor:
    """``relu(batch_norm(conv(x)))`` with nn.BatchNorm2d's semantics (see :func:`residual_block`)."""
    return _block("conv_bn_relu", x, [unit], None, folded, backend)
