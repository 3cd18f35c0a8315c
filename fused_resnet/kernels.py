"""The kernel sets the fused autograd functions run on, one per backend that has kernels of its own.

A kernel set supplies the memory-bound BatchNorm/residual/ReLU passes (batch statistics, the fused apply, and
the backward's reduction and elementwise passes) and the convolutions around them. The `cpu` and `cuda` backends
share the compiled ops in torch.ops.fused_resnet (the dispatcher picks the CPU or CUDA implementation by device)
and run convolutions through ATen (oneDNN on the CPU, cuDNN on the GPU).
"""

from __future__ import annotations

import importlib.util
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _native
from .params import ConvParams, ZeroPadIdentity
from .tensors import accumulation_dtype, as_dtype

BackwardCoefs = tuple[Tensor, Tensor, Tensor]  # (coef_dy, coef_xmu, coef_const) of bn_act_backward_elemt


class NativeKernels:
    """The compiled ops of fused_resnet._C (CPU or CUDA, by the tensors' device) and ATen convolutions.

    `ops` is where the four memory-bound ops live (batch_stats, bn_act, bn_act_backward_reduce,
    bn_act_backward_elemt, with the schemas of csrc/ops.cpp): torch.ops.fused_resnet here."""

    def __init__(self, name: str, ops=None):
        self.name = name
        self.ops = ops if ops is not None else torch.ops.fused_resnet

    def batch_stats(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.ops.batch_stats(y)

    def bn_act(
        self,
        y: Tensor,
        scale: Tensor,
        shift: Tensor,
        residual: Tensor | None = None,
        residual_scale: Tensor | None = None,
        residual_shift: Tensor | None = None,
        relu: bool = True,
        padding: ZeroPadIdentity | None = None,
    ) -> Tensor:
        """[relu](y * scale + shift + R); with `padding`, R is option A's subsampled, zero-padded `residual`.
        A residual in another dtype than y (the block input, under autocast) is added in y's, as torchvision's
        in-place `out += identity` does."""
        if residual is not None:
            residual = as_dtype(residual, y.dtype)
        if padding is not None:
            return self.ops.bn_act(y, scale, shift, residual, None, None, relu, padding.stride, padding.channels_before)
        return self.ops.bn_act(y, scale, shift, residual, residual_scale, residual_shift, relu)

    def backward_reduce(
        self, grad: Tensor, output: Tensor | None, y: Tensor, mean: Tensor, y2: Tensor | None = None,
        mean2: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return self.ops.bn_act_backward_reduce(grad, output, y, mean, y2, mean2)

    def backward_elemt(
        self, grad: Tensor, output: Tensor | None, y: Tensor, mean: Tensor, coefs: BackwardCoefs,
        y2: Tensor | None = None, mean2: Tensor | None = None, coefs2: BackwardCoefs | None = None,
        residual_grad: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        k2 = coefs2 if coefs2 is not None else (None, None, None)
        grad_y, grad_other = self.ops.bn_act_backward_elemt(
            grad, output, y, mean, *coefs, y2, mean2, *k2, residual_grad
        )
        return grad_y, (grad_other if (y2 is not None or residual_grad) else None)

    def conv(self, x: Tensor, conv: ConvParams) -> Tensor:
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def conv_stats(self, x: Tensor, conv: ConvParams, stats: bool) -> tuple[Tensor, ...]:
        """conv(x), followed by the per-channel (mean, biased variance) of the result when `stats` (for the
        BatchNorm after it, in training)."""
        y = self.conv(x, conv)
        return (y, *self.batch_stats(y)) if stats else (y,)

    def bn_relu_conv(self, y: Tensor, scale: Tensor, shift: Tensor, conv: ConvParams, stats: bool) -> tuple[Tensor, ...]:
        """conv(relu(y * scale + shift)) as :meth:`conv_stats` returns it. Here the activation is one pass and one
        tensor; kernel sets with a convolution of their own apply it while loading the convolution's input."""
        return self.conv_stats(self.bn_act(y, scale, shift, relu=True), conv, stats)

    def conv_backward(
        self, grad_y: Tensor, x: Tensor, conv: ConvParams, need_input: bool, need_weight: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if not (need_input or need_weight or need_bias):
            return None, None, None
        # Under autocast the forward convolved in x's lower precision with the weight cast to it; the backward
        # does the same, and hands the parameter gradients back in the parameters' dtype.
        weight = as_dtype(conv.weight, x.dtype)
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_y,
            x,
            weight,
            [conv.weight.shape[0]] if conv.bias is not None else None,
            list(conv.stride),
            list(conv.padding),
            list(conv.dilation),
            False,
            [0, 0],
            conv.groups,
            [need_input, need_weight, need_bias and conv.bias is not None],
        )
        return (grad_x, grad_w if grad_w is None else as_dtype(grad_w, conv.weight.dtype),
                grad_b if grad_b is None else as_dtype(grad_b, conv.bias.dtype))

    def conv_bias_act(
        self, x: Tensor, conv: ConvParams, weight: Tensor, bias: Tensor, residual: Tensor | None, relu: bool,
        padding: ZeroPadIdentity | None = None,
    ) -> Tensor:
        """Inference with BN folded into (weight, bias): [relu](conv(x, weight) + bias [+ residual]), the residual
        option A's when `padding` is given."""
        y = F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        ones = torch.ones(bias.shape, dtype=accumulation_dtype(y.dtype), device=y.device)
        return self.bn_act(y, ones, bias, residual, relu=relu, padding=padding)


class CpuKernels(NativeKernels):
    """On the CPU, channels_last inference runs conv+bias+ReLU (and conv+bias+add+ReLU) as single oneDNN
    primitives, the ones torch.compile's CPU backend uses, where oneDNN supports the dtype; else conv then one
    fused pass."""

    def conv_bias_act(
        self, x: Tensor, conv: ConvParams, weight: Tensor, bias: Tensor, residual: Tensor | None, relu: bool,
        padding: ZeroPadIdentity | None = None,
    ) -> Tensor:
        # Under torch.compile the tracer needs fake implementations, which oneDNN's fused ops lack; the compiler
        # makes its own fusions from conv + one pass. Under autocast the convolution must run in the autocast dtype,
        # as torchvision's does, which only F.conv2d knows to do.
        if (padding is not None or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")
                or not self._onednn_supports(x, residual)):
            return super().conv_bias_act(x, conv, weight, bias, residual, relu, padding)
        geometry = (conv.padding, conv.stride, conv.dilation, conv.groups)
        bias = as_dtype(bias, weight.dtype)
        unary = "relu" if relu else "none"
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise.default(x, weight, bias, *geometry, unary, [None], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, weight, bias, *geometry, "add", None, unary, [None], "")

    def __init__(self, name: str):
        super().__init__(name)
        # The dtypes oneDNN's fused convolutions take on this CPU, asked once (each query costs a call): bf16 needs
        # AVX512-BF16 or AMX; fp16 would need AVX512-FP16 or AVX-NE-CONVERT and goes through conv + one pass.
        self._onednn_dtypes: frozenset[torch.dtype] = frozenset()
        if torch.backends.mkldnn.is_available():
            bf16 = [torch.bfloat16] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else []
            self._onednn_dtypes = frozenset([torch.float32, *bf16])

    def _onednn_supports(self, x: Tensor, residual: Tensor | None) -> bool:
        # Channels_last only: there the fused primitive beats conv + one pass (64@56, batch 8: 8.6 ms against
        # 11.1); on NCHW it was slower (14.8 ms against 13.9), its add falling back to a separate ATen add_relu.
        # Strictly channels_last: a tensor that is NCHW too (one channel, or 1x1 pixels) sends oneDNN down its NCHW
        # path, whose add has no bf16 kernel.
        return (x.dtype in self._onednn_dtypes and _memory_format_name(x) == "channels_last"
                and (residual is None or _memory_format_name(residual) == "channels_last"))


class CudaKernels(NativeKernels):
    """On CUDA, inference runs conv+bias+ReLU and conv+bias+add+ReLU as single cuDNN calls (cuDNN's fused
    convolution-bias-activation, what DESIGN.md §4 names the bar to beat), and a projection's conv+bias as one
    F.conv2d. Where cuDNN turns a configuration down (it supports fewer dtype/layout/algorithm combinations than
    plain convolution), that configuration goes through conv + one fused pass from then on, with a warning."""

    def __init__(self, name: str):
        super().__init__(name)
        self._cudnn_refused: set[tuple] = set()

    def conv_bias_act(
        self, x: Tensor, conv: ConvParams, weight: Tensor, bias: Tensor, residual: Tensor | None, relu: bool,
        padding: ZeroPadIdentity | None = None,
    ) -> Tensor:
        # Under torch.compile the compiler makes its own fusions; under autocast only F.conv2d knows to cast.
        if padding is not None or torch.compiler.is_compiling() or torch.is_autocast_enabled("cuda"):
            return super().conv_bias_act(x, conv, weight, bias, residual, relu, padding)
        geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        cudnn_bias = as_dtype(bias, weight.dtype)  # cuDNN adds a bias in the convolution's dtype
        if not relu and residual is None:
            return F.conv2d(x, weight, cudnn_bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        key = (x.dtype, _memory_format_name(x), residual is not None, relu)
        if not relu or key in self._cudnn_refused or not torch.backends.cudnn.is_available():
            return super().conv_bias_act(x, conv, weight, bias, residual, relu, padding)
        try:
            if residual is None:
                return torch.ops.aten.cudnn_convolution_relu(x, weight, cudnn_bias, *geometry)
            return torch.ops.aten.cudnn_convolution_add_relu(x, weight, as_dtype(residual, x.dtype), 1.0, cudnn_bias,
                                                             *geometry)
        except RuntimeError as error:
            self._cudnn_refused.add(key)
            warnings.warn(f"fused_resnet: cuDNN's fused convolution refused {key} ({error}); that configuration "
                          "runs as convolution + one fused pass from now on", RuntimeWarning, stacklevel=2)
            return super().conv_bias_act(x, conv, weight, bias, residual, relu, padding)


def _memory_format_name(t: Tensor) -> str:
    return "channels_last" if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() else "nchw"


class TritonKernels(NativeKernels):
    """The Triton kernels (fused_resnet.triton): the four memory-bound ops, and an implicit-GEMM convolution that
    applies the previous BatchNorm and ReLU to its input as it loads it (prologue), computes the batch statistics
    of its output as it stores it, and in inference adds the folded BN's bias, the residual and the ReLU
    (epilogue). Convolution backward (dgrad, wgrad) stays on ATen: cuDNN's are tuned per architecture, and the
    forward fusions are where Triton removes memory passes (DESIGN.md §4).

    Triton has no autocast: under torch.autocast the convolution's input and weight are cast to the autocast dtype
    first, as F.conv2d's autocast wrapper does."""

    def __init__(self) -> None:
        from .triton import library  # registers torch.ops.fused_resnet_triton

        super().__init__("triton", torch.ops.fused_resnet_triton)

    def _low_precision(self, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        device = x.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            return as_dtype(x, dtype), as_dtype(weight, dtype)
        return x, weight

    def _conv2d(self, x: Tensor, conv: ConvParams, weight: Tensor | None = None, bias: Tensor | None = None,
                scale: Tensor | None = None, shift: Tensor | None = None, residual: Tensor | None = None,
                padding: ZeroPadIdentity | None = None, relu: bool = False, stats: bool = False) -> tuple[Tensor, ...]:
        """(y, mean, var) of the Triton convolution with its fusions; mean and var are empty unless `stats`."""
        x, weight = self._low_precision(x, conv.weight if weight is None else weight)
        if residual is not None:
            residual = as_dtype(residual, x.dtype)
        to_fp32 = (lambda t: None if t is None else as_dtype(t, torch.float32))
        return torch.ops.fused_resnet_triton.conv2d(
            x, weight, conv.bias if bias is None else to_fp32(bias), list(conv.stride), list(conv.padding),
            list(conv.dilation), conv.groups, to_fp32(scale), to_fp32(shift), residual,
            padding.stride if padding else 1, padding.channels_before if padding else 0, relu, stats)

    def conv(self, x: Tensor, conv: ConvParams) -> Tensor:
        return self._conv2d(x, conv)[0]

    def conv_stats(self, x: Tensor, conv: ConvParams, stats: bool) -> tuple[Tensor, ...]:
        out = self._conv2d(x, conv, stats=stats)
        return out if stats else out[:1]

    def bn_relu_conv(self, y: Tensor, scale: Tensor, shift: Tensor, conv: ConvParams, stats: bool) -> tuple[Tensor, ...]:
        out = self._conv2d(y, conv, scale=scale, shift=shift, stats=stats)
        return out if stats else out[:1]

    def conv_bias_act(
        self, x: Tensor, conv: ConvParams, weight: Tensor, bias: Tensor, residual: Tensor | None, relu: bool,
        padding: ZeroPadIdentity | None = None,
    ) -> Tensor:
        return self._conv2d(x, conv, weight, bias, residual=residual, padding=padding, relu=relu)[0]


def _kernel_sets() -> dict[str, NativeKernels]:
    """Every kernel set, made once at import: under torch.compile a set made on first use would be traced (and
    break the graph). The Triton one imports its kernels, which defines them: compiled ones, or interpreted ones when
    TRITON_INTERPRET=1 is set by then (before fused_resnet is imported)."""
    sets: dict[str, NativeKernels] = {"cpu": CpuKernels("cpu"), "cuda": CudaKernels("cuda")}
    if importlib.util.find_spec("triton") is not None:
        sets["triton"] = TritonKernels()
    return sets


_KERNEL_SETS = _kernel_sets()


def kernels_for(backend: str) -> NativeKernels:
    """The kernel set of a concrete backend other than `torch` (which runs the reference composite)."""
    kernels = _KERNEL_SETS.get(backend)
    if kernels is None:
        raise RuntimeError(f"fused_resnet backend {backend!r} has no kernels here")
    return kernels


def _register_fake_implementations() -> None:
    """Shapes and dtypes of the compiled ops for meta/fake tensors (torch.compile, torch.export)."""

    def channels(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        return t.new_empty((t.shape[1],), dtype=dtype or accumulation_dtype(t.dtype))

    def like(t: Tensor) -> Tensor:
        # The kernels write dense outputs in the input's layout (NCHW or channels_last), as empty_like makes them.
        return torch.empty_like(t)

    @torch.library.register_fake("fused_resnet::batch_stats")
    def _(input):
        return channels(input), channels(input)

    @torch.library.register_fake("fused_resnet::bn_act")
    def _(input, scale, shift, residual, residual_scale, residual_shift, relu, residual_stride=1,
          residual_channel_offset=0):
        return like(input)

    @torch.library.register_fake("fused_resnet::bn_act_backward_reduce")
    def _(grad_output, output, input, mean, input2, mean2):
        third = channels(input) if input2 is not None else input.new_empty((0,), dtype=accumulation_dtype(input.dtype))
        return channels(input), channels(input), third

    @torch.library.register_fake("fused_resnet::bn_act_backward_elemt")
    def _(grad_output, output, input, mean, coef_dy, coef_xmu, coef_const, input2, mean2, coef2_dy, coef2_xmu,
          coef2_const, residual_grad):
        other = like(input) if (input2 is not None or residual_grad) else input.new_empty((0,))
        return like(input), other


if _native.has_extension():
    _register_fake_implementations()
