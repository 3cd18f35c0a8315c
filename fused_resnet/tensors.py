"""Facts about tensors that every layer asks: which dense layout a tensor has, how an error message describes it,
the dtype its per-channel statistics accumulate in, and the output size of a convolution.

One home for each, imported by the ops, the kernel sets, the Triton launchers, the benchmarks and the tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def is_channels_last(t: Tensor) -> bool:
    """Whether `t` is dense channels_last and not also dense NCHW. A tensor that is both (one channel, or 1x1
    pixels) counts as NCHW: every kernel set writes such a tensor's outputs NCHW, as empty_like does."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def memory_format_of(t: Tensor) -> torch.memory_format:
    """The memory format the kernels lay outputs out in for an input like `t` (see :func:`is_channels_last`)."""
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def dense_strides(shape: Sequence[int], memory_format: torch.memory_format) -> tuple[int, ...]:
    """The strides of torch.empty(shape, memory_format=memory_format) for a 4-D shape, without making one."""
    _, channels, height, width = shape
    if memory_format == torch.channels_last:
        return (height * width * channels, 1, width * channels, channels)
    return (channels * height * width, height * width, width, 1)


def strides_format(t: Tensor) -> torch.memory_format:
    """The memory format whose dense strides a 4-D `t` has exactly: channels_last or NCHW. Unlike memory_format_of it
    tells apart the two dense layouts of a tensor that is both (a 1x1 convolution's weight: the strides of its
    size-1 dimensions differ), which a gradient must copy to have exactly its parameter's strides."""
    return torch.channels_last if t.stride() == dense_strides(t.shape, torch.channels_last) else torch.contiguous_format


def dense_like(t: Tensor, ref: Tensor) -> Tensor:
    """`t` dense in the layout of `ref`; `t` itself when it already is."""
    return t.contiguous(memory_format=memory_format_of(ref))


def empty_dense_like(t: Tensor, shape: list[int] | torch.Size | None = None) -> Tensor:
    """An uninitialized tensor of `t`'s dtype and device (and `shape`, by default t's), laid out as the kernels
    lay out their outputs for an input like `t`."""
    return torch.empty(t.shape if shape is None else shape, dtype=t.dtype, device=t.device,
                       memory_format=memory_format_of(t))


def describe(t: object) -> str:
    """How an error message names what it got: a tensor's dtype, shape and device, else the value's type."""
    if isinstance(t, Tensor):
        return f"{t.dtype} tensor of shape {list(t.shape)} on {t.device}"
    return type(t).__name__


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-channel statistics and coefficients for activations of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`t` in `dtype`, skipping the call when it already is (.to() costs a Python-to-C++ call even then)."""
    return t if t.dtype == dtype else t.to(dtype)


def scalar_operand(value: float | Tensor, t: Tensor) -> Tensor:
    """`value` as the other operand of an arithmetic op on `t`: a 0-d CPU tensor of t's dtype (which also serves a
    CUDA `t`, passed by value like a Python number), or `value` itself when it already is a tensor. A Python float
    becomes a float64 0-d tensor that the op then casts to t's dtype, one aten::_to_copy per call: 80 in a converted
    resnet18's train step, from the BatchNorms' per-channel arithmetic; this is no slower (2.3 us against 2.7 for
    a 64-channel multiply, this CPU)."""
    return value if isinstance(value, Tensor) else torch.scalar_tensor(value, dtype=t.dtype)


def conv_output_size(
    size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """(height, width) of a zero-padded 2-D convolution's output on an input of `size` (nn.Conv2d's formula)."""
    return tuple((s + 2 * p - d * (k - 1) - 1) // st + 1
                 for s, k, st, p, d in zip(size, kernel, stride, padding, dilation))  # type: ignore[return-value]
