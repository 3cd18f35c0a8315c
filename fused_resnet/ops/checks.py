"""The argument checks of the public ops: each names the argument and what was expected, and all run before
anything is computed or updated, so a call that raises changes no running statistic."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..params import BatchNormParams, ConvBN, ConvParams, ZeroPadIdentity
from ..tensors import describe

if TYPE_CHECKING:
    from .block import Shortcut


def check_activation(op: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: expected {name} to be a Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{op}: expected {name} to be 4-D (N, C, H, W), got a {describe(t)}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: expected {name} to be floating-point, got a {describe(t)}")
    if t.numel() == 0:
        raise ValueError(f"{op}: expected a non-empty {name}, got a {describe(t)}")
    return t


def check_like(op: str, name: str, t: Tensor, ref: Tensor, ref_name: str, *, dtype: bool = True) -> None:
    if t.device != ref.device:
        raise RuntimeError(f"{op}: expected {name} on {ref.device} like {ref_name}, got a {describe(t)}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{op}: expected {name} of dtype {ref.dtype} like {ref_name}, got a {describe(t)}")


def _check_channel_vector(op: str, name: str, t: object, channels: int, ref: Tensor) -> None:
    if not isinstance(t, Tensor) or t.shape != (channels,):
        got = f"a {describe(t)}" if isinstance(t, Tensor) else describe(t)
        raise ValueError(f"{op}: expected {name} to hold {channels} per-channel values, got {got}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: expected {name} to be floating-point, got a {describe(t)}")
    check_like(op, name, t, ref, "the input", dtype=False)


def check_batch_norm(op: str, label: str, bn: BatchNormParams, y_shape: Sequence[int], ref: Tensor) -> None:
    """Checks a BatchNorm on a conv output of `y_shape`; `label` prefixes its field names ("" for none)."""
    prefix = f"{label}." if label else ""
    channels = y_shape[1]
    for field in ("weight", "bias", "running_mean", "running_var"):
        vector = getattr(bn, field)
        if vector is not None:
            field_name = prefix + field
            _check_channel_vector(op, field_name, vector, channels, ref)
            _check_batch_norm_dtype(op, field_name, vector, ref)
    if (bn.running_mean is None) != (bn.running_var is None):
        raise ValueError(f"{op}: expected both {prefix}running_mean and {prefix}running_var, or neither")
    for field in ("running_mean", "running_var"):
        if getattr(bn, field) is not None and getattr(bn, field).requires_grad:
            # F.batch_norm refuses them too; caught here, before an earlier unit's statistics have moved.
            raise ValueError(f"{op}: expected {prefix}{field} not to require grad (running statistics are updated "
                             f"in place, outside autograd), got one that does")
    if not _is_number(bn.eps) or not bn.eps > 0:  # `not >` also rejects NaN
        raise ValueError(f"{op}: expected {prefix}eps > 0, got {bn.eps!r}")
    if not isinstance(bn.training, bool):
        raise TypeError(f"{op}: expected {prefix}training to be a bool, got {type(bn.training).__name__}")
    if bn.momentum is not None and not _is_number(bn.momentum):
        raise TypeError(f"{op}: expected {prefix}momentum to be a number or None, got {type(bn.momentum).__name__}")
    if bn.momentum is None and bn.updates_running_stats and bn.num_batches_tracked is None:
        raise ValueError(
            f"{op}: expected a number for {prefix}momentum: momentum=None (a cumulative average) needs "
            f"{prefix}num_batches_tracked to count the batches, and there is none"
        )
    if bn.use_batch_stats:
        count = y_shape[0] * y_shape[2] * y_shape[3]
        if count <= 1:
            # The message of torch.nn.functional.batch_norm, which users know.
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {torch.Size(y_shape)}")


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
                    f"bfloat16 input), got a {describe(t)}")


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
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        return False
    first, second = value  # unrolled: cheaper than a generator, and this runs on every call
    return (isinstance(first, int) and not isinstance(first, bool) and first >= minimum
            and isinstance(second, int) and not isinstance(second, bool) and second >= minimum)


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
        got = f"a {describe(w)}" if isinstance(w, Tensor) else describe(w)
        raise ValueError(f"{op}: expected {label}.weight to be 4-D (out, in/groups, kh, kw), got {got}")
    # Under autocast a convolution takes any floating dtypes and runs in the autocast one, as F.conv2d does. Autocast
    # is asked only about a dtype that differs: the question took 1.6 us, seven times a whole check_like.
    check_like(op, f"{label}.weight", w, ref, "the input", dtype=w.dtype != ref.dtype and not _autocast(ref))
    if not w.is_floating_point():
        raise TypeError(f"{op}: expected {label}.weight to be floating-point, got a {describe(w)}")
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
        bias = conv.bias
        check_like(op, f"{label}.bias", bias, ref, "the input", dtype=bias.dtype != ref.dtype and not _autocast(ref))
    out_h, out_w = conv.output_size(x_shape[2], x_shape[3])
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"{op}: {label} (kernel {list(w.shape[-2:])}, stride {list(conv.stride)}, padding "
            f"{list(conv.padding)}, dilation {list(conv.dilation)}) on an input of shape {list(x_shape)} "
            f"gives an empty output ({out_h}x{out_w})"
        )
    return [x_shape[0], w.shape[0], out_h, out_w]


def check_block(
    op: str, x: Tensor, units: Sequence[ConvBN], shortcut: Shortcut, shortcut_input: Tensor | None = None
) -> list[list[int]]:
    """Checks a block's arguments; returns the output shape of every unit (the projection's last)."""
    check_activation(op, "x", x)
    if shortcut_input is not None:
        if not isinstance(shortcut, ConvBN):
            raise ValueError(f"{op}: shortcut_input is the input of a projection shortcut, but the shortcut is "
                             f"{shortcut!r}")
        check_activation(op, "shortcut_input", shortcut_input)
        check_like(op, "shortcut_input", shortcut_input, x, "x")
    if isinstance(units, ConvBN) or not isinstance(units, Sequence):
        raise TypeError(f"{op}: expected units to be a sequence of ConvBN, got a {type(units).__name__}")
    if len(units) == 0:
        raise ValueError(f"{op}: expected at least one conv/bn unit")
    shape = list(x.shape)
    shapes = []
    for index, unit in enumerate(units):
        _check_unit(op, f"units[{index}]", unit)
        shape = _check_conv(op, unit.name, unit.conv, shape, x)
        check_batch_norm(op, unit.name, unit.bn, shape, x)
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
        check_batch_norm(op, shortcut.name, shortcut.bn, shortcut_shape, x)
        if shortcut_shape != shape:
            raise ValueError(
                f"{op}: the projection shortcut's output shape {shortcut_shape} differs from the block's {shape}"
            )
        shapes.append(shortcut_shape)
    elif isinstance(shortcut, ZeroPadIdentity):
        stride, before = shortcut
        if (stride < 1 or shortcut.output_shape(x.shape)[2:] != shape[2:] or before < 0
                or before + x.shape[1] > shape[1]):
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
