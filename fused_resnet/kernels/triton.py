"""The kernel set of the `triton` backend, on the Triton kernels of fused_resnet.triton."""

from __future__ import annotations

import torch
from torch import Tensor

from ..params import ConvParams, ZeroPadIdentity
from ..tensors import as_dtype
from .base import KernelSet


class TritonKernels(KernelSet):
    """The Triton kernels (fused_resnet.triton): the four memory-bound ops, and an implicit-GEMM convolution that
    applies the previous BatchNorm and ReLU to its input as it loads it (prologue), computes the batch statistics
    of its output as it stores it, and in inference adds the folded BN's bias, the residual and the ReLU
    (epilogue). Convolution backward (dgrad, wgrad) stays on ATen: cuDNN's are tuned per architecture, and the
    forward fusions are where Triton removes memory passes (docs/design.md §4).

    Triton has no autocast: under torch.autocast the convolution's input and weight are cast to the autocast dtype
    first, as F.conv2d's autocast wrapper does."""

    def __init__(self) -> None:
        # Registers torch.ops.fused_resnet_triton, defining the kernels: compiled ones, or interpreted ones when
        # TRITON_INTERPRET=1 was set before fused_resnet was imported (see fused_resnet.triton.interpreted).
        from ..triton import library  # noqa: F401

        super().__init__(torch.ops.fused_resnet_triton)

    def _low_precision(self, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        device = x.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            return as_dtype(x, dtype), as_dtype(weight, dtype)
        return x, weight

    def _conv2d(self, x: Tensor, conv: ConvParams, weight: Tensor | None = None, bias: Tensor | None = None,
                mean: Tensor | None = None, scale: Tensor | None = None, shift: Tensor | None = None,
                residual: Tensor | None = None, zero_pad: ZeroPadIdentity | None = None, relu: bool = False,
                stats: bool = False) -> tuple[Tensor, ...]:
        """(y, mean, var) of the Triton convolution with its fusions; mean and var are empty unless `stats`."""
        x, weight = self._low_precision(x, conv.weight if weight is None else weight)
        if residual is not None:
            residual = as_dtype(residual, x.dtype)
        to_fp32 = (lambda t: None if t is None else as_dtype(t, torch.float32))
        return torch.ops.fused_resnet_triton.conv2d(
            x, weight, conv.bias if bias is None else to_fp32(bias), list(conv.stride), list(conv.padding),
            list(conv.dilation), conv.groups, to_fp32(mean), to_fp32(scale), to_fp32(shift), residual,
            zero_pad.stride if zero_pad else 1, zero_pad.channels_before if zero_pad else 0, relu, stats)

    def conv(self, x: Tensor, conv: ConvParams) -> Tensor:
        return self._conv2d(x, conv)[0]

    def conv_stats(self, x: Tensor, conv: ConvParams, stats: bool) -> tuple[Tensor, ...]:
        out = self._conv2d(x, conv, stats=stats)
        return out if stats else out[:1]

    def bn_relu_conv(
        self, y: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, conv: ConvParams, stats: bool
    ) -> tuple[Tensor, ...]:
        out = self._conv2d(y, conv, mean=mean, scale=scale, shift=shift, stats=stats)
        return out if stats else out[:1]

    def conv_bias_act(
        self, x: Tensor, conv: ConvParams, weight: Tensor, bias: Tensor, residual: Tensor | None, relu: bool,
        zero_pad: ZeroPadIdentity | None = None,
    ) -> Tensor:
        return self._conv2d(x, conv, weight, bias, residual=residual, zero_pad=zero_pad, relu=relu)[0]
