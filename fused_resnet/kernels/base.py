"""The kernel-set interface: what the fused autograd functions (fused_resnet.ops) call, whichever backend runs them.

A kernel set supplies the memory-bound BatchNorm/residual/ReLU passes (batch statistics, the fused apply, and the
backward's reduction and elementwise passes) and the convolutions around them. What every set shares lives here:
the four BatchNorm ops have one schema (csrc/ops.cpp) in torch.ops.fused_resnet and torch.ops.fused_resnet_triton,
so a set only names the namespace that holds them; and convolution backward is ATen's in every set (cuDNN's and
oneDNN's dgrad and wgrad are tuned per architecture; the fusions that remove memory passes are all in the forward).
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

from ..params import ConvParams, ZeroPadIdentity
from ..tensors import as_dtype, memory_format_of, scalar_operand

BackwardCoefs = tuple[Tensor, Tensor, Tensor]  # (coef_dy, coef_xmu, coef_const) of bn_act_backward_elemt


class KernelSet(abc.ABC):
    """The kernels of one backend. `ops` is the op namespace holding batch_stats, bn_act, bn_act_backward_reduce and
    bn_act_backward_elemt with the schemas of csrc/ops.cpp."""

    def __init__(self, ops: torch._ops._OpNamespace):
        self.ops = ops

    # -----------------------------------------------------------------------------------------------------------
    # BatchNorm, residual and ReLU: the same four ops in every set

    def batch_stats(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """The per-channel (mean, biased variance) of y, in the accumulation dtype."""
        return self.ops.batch_stats(y)

    def bn_act(
        self,
        y: Tensor,
        mean: Tensor | None,
        scale: Tensor,
        shift: Tensor,
        residual: Tensor | None = None,
        residual_mean: Tensor | None = None,
        residual_scale: Tensor | None = None,
        residual_shift: Tensor | None = None,
        relu: bool = True,
        zero_pad: ZeroPadIdentity | None = None,
    ) -> Tensor:
        """[relu]((y - mean) * scale + shift + R), R = (residual - residual_mean) * residual_scale + residual_shift
        or `residual` itself; with `zero_pad`, R is option A's subsampled, zero-padded `residual`. A None mean is 0
        (a BN folded into the convolution). A residual in another dtype than y (the block input, under autocast) is
        added in y's, as torchvision's in-place `out += identity` does."""
        if residual is not None:
            residual = as_dtype(residual, y.dtype)
        if zero_pad is not None:
            return self.ops.bn_act(y, mean, scale, shift, residual, None, None, None, relu, zero_pad.stride,
                                   zero_pad.channels_before)
        return self.ops.bn_act(y, mean, scale, shift, residual, residual_mean, residual_scale, residual_shift, relu)

    # The backward passes' ReLU mask: `output > 0` (the ReLU's saved output), or with mask_scale and mask_shift
    # (output None) `(y - mean) * mask_scale + mask_shift > 0` recomputed as bn_act computes it, bit for bit the
    # mask of bn_act(y, mean, mask_scale, mask_shift)'s output without reading it; or none.

    def backward_reduce(
        self, grad: Tensor, output: Tensor | None, y: Tensor, mean: Tensor, y2: Tensor | None = None,
        mean2: Tensor | None = None, mask_scale: Tensor | None = None, mask_shift: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return self.ops.bn_act_backward_reduce(grad, output, y, mean, y2, mean2, mask_scale, mask_shift)

    def backward_elemt(
        self, grad: Tensor, output: Tensor | None, y: Tensor, mean: Tensor, coefs: BackwardCoefs,
        y2: Tensor | None = None, mean2: Tensor | None = None, coefs2: BackwardCoefs | None = None,
        residual_grad: bool = False, mask_scale: Tensor | None = None, mask_shift: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        k2 = coefs2 if coefs2 is not None else (None, None, None)
        grad_y, grad_other = self.ops.bn_act_backward_elemt(
            grad, output, y, mean, *coefs, y2, mean2, *k2, residual_grad, mask_scale, mask_shift
        )
        return grad_y, (grad_other if (y2 is not None or residual_grad) else None)

    # -----------------------------------------------------------------------------------------------------------
    # BatchNorm's per-channel arithmetic in training, on vectors in the accumulation dtype: ATen ops here, the
    # reference; the cpu set runs each as one compiled op with the same rounding (csrc/ops.cpp).

    def bn_affine(self, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
                  ) -> tuple[Tensor, Tensor, Tensor]:
        """(invstd, scale, shift) of a BatchNorm with variance `var`: 1 / sqrt(var + eps), invstd * weight, bias,
        in var's dtype."""
        invstd = torch.rsqrt(var + scalar_operand(eps, var))
        scale = invstd * as_dtype(weight, var.dtype) if weight is not None else invstd
        shift = as_dtype(bias, var.dtype) if bias is not None else torch.zeros_like(invstd)
        return invstd, scale, shift

    def bn_backward_coefs(
        self, sum_dy: Tensor, sum_dy_xmu: Tensor, invstd: Tensor, weight: Tensor | None, use_batch_stats: bool,
        count: int | Tensor,
    ) -> tuple[BackwardCoefs, Tensor, Tensor]:
        """The coefficients of BN's input gradient, grad_y = k_dy*g + k_xmu*(y - mean) + k_0 (g masked by the
        ReLU), and the weight's and bias's gradients (the bias's is sum_dy itself). With batch statistics the mean
        and variance depend on y:
            grad_y = w*invstd * (g - mean(g) - (y - mean) * invstd^2 * mean(g * (y - mean))).
        `count` (the values the sums run over) is an int, or a synchronized BatchNorm's 0-d float64 tensor of the
        group's count, on the device: -1.0 / count is then the same float64 as with an int."""
        w_invstd = invstd * as_dtype(weight, invstd.dtype) if weight is not None else invstd
        sum_dy_xhat = sum_dy_xmu * invstd  # also the weight's gradient
        if use_batch_stats:
            # invstd^3 on its own underflows fp32 for a spread above ~4e12 (bf16 activations reach 1e38):
            # multiplying sum(g * x_hat) by invstd and then w*invstd keeps every intermediate in range.
            minus_inv_count = scalar_operand(-1.0 / count, invstd)
            coefs = (w_invstd, (sum_dy_xhat * invstd).mul_(w_invstd).mul_(minus_inv_count),
                     (w_invstd * sum_dy).mul_(minus_inv_count))
        else:
            zeros = torch.zeros_like(invstd)
            coefs = (w_invstd, zeros, zeros)
        return coefs, sum_dy_xhat, sum_dy

    def update_running_stats(
        self, running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, factor: float | Tensor,
        count: int | Tensor,
    ) -> None:
        """nn.BatchNorm2d's running-statistics update from the batch's mean and biased variance over `count`
        values per channel (an int, or a synchronized BatchNorm's 0-d float64 tensor: count / (count - 1) is then
        the same float64): running += factor * (batch - running), with the unbiased variance, computed in the
        batch statistics' (accumulation) dtype and rounded once into the running statistics' own, as
        nn.BatchNorm2d does for low-precision ones. A tensor `factor` (momentum=None) has the batch's dtype."""
        unbiased = var * scalar_operand(count / (count - 1), var)
        for running, batch in ((running_mean, mean), (running_var, unbiased)):
            if running.dtype == batch.dtype:
                running.lerp_(batch, factor)
            else:
                running.copy_(torch.lerp(running.to(batch.dtype), batch, factor))

    # -----------------------------------------------------------------------------------------------------------
    # Convolutions: each set's own forward, ATen's backward

    def preferred_memory_format(self, x: Tensor, training: bool = False) -> torch.memory_format:
        """The memory format in which a chain of blocks runs fastest for an input like x, in inference or (`training`)
        under autograd: x's own unless this set's convolutions prefer another."""
        return memory_format_of(x)

    @abc.abstractmethod
    def conv(self, x: Tensor, conv: ConvParams) -> Tensor:
        """conv(x) with the convolution's own weight and bias."""

    @abc.abstractmethod
    def conv_stats(self, x: Tensor, conv: ConvParams, stats: bool) -> tuple[Tensor, ...]:
        """conv(x), followed by the per-channel (mean, biased variance) of the result when `stats` (for the
        BatchNorm after it, in training)."""

    @abc.abstractmethod
    def bn_relu_conv(
        self, y: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, conv: ConvParams, stats: bool
    ) -> tuple[Tensor, ...]:
        """conv(relu((y - mean) * scale + shift)) as :meth:`conv_stats` returns it."""

    @abc.abstractmethod
    def conv_bias_act(
        self, x: Tensor, conv: ConvParams, weight: Tensor, bias: Tensor, residual: Tensor | None, relu: bool,
        zero_pad: ZeroPadIdentity | None = None,
    ) -> Tensor:
        """Inference with BN folded into (weight, bias): [relu](conv(x, weight) + bias [+ residual]), the residual
        option A's when `zero_pad` is given."""

    def conv_backward(
        self, grad_y: Tensor, x: Tensor, conv: ConvParams, need_input: bool, need_weight: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if not (need_input or need_weight or need_bias):
            return None, None, None
        # Under autocast the forward convolved in x's lower precision with the weight cast to it; the backward
        # does the same, and hands the parameter gradients back in the parameters' dtype.
        # oneDNN and cuDNN run a convolution in its activations' layout: a weight laid out otherwise (an NCHW model's,
        # with the channels_last activations its blocks run in on the CPU) is converted once here for both gradients
        # (inside ATen the input and the weight gradient would each convert it), and its gradient handed back below
        # in the weight's own layout.
        weight = as_dtype(conv.weight, x.dtype).contiguous(memory_format=memory_format_of(x))
        if need_weight and x.device.type == "cpu" and onednn_weight_grad_may_crash(conv):
            # A 1x1 convolution with stride s and no padding reads only x[:, :, ::s, ::s]: its weight gradient is
            # that of a stride-1 convolution (a GEMM) of the subsampled input.
            subsampled = x[:, :, ::conv.stride[0], ::conv.stride[1]].contiguous(memory_format=memory_format_of(x))
            grad_w = self.conv_backward(grad_y, subsampled, conv._replace(bias=None, stride=(1, 1)), False, True,
                                        False)[1]
            grad_x, _, grad_b = self.conv_backward(grad_y, x, conv, need_input, False, need_bias)
            return grad_x, grad_w, grad_b
        if need_weight and _onednn_low_precision_weight_grad_fails(x, conv):
            grad_w = self.conv_backward(grad_y.float(), x.float(), conv._replace(weight=conv.weight.float(), bias=None),
                                        False, True, False)[1]
            grad_x, _, grad_b = self.conv_backward(grad_y, x, conv, need_input, False, need_bias)
            return grad_x, as_dtype(grad_w, conv.weight.dtype), grad_b
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
        if grad_w is not None:
            # In the weight's own layout: ATen returns it in the activations' (an NCHW model's weight gradient comes
            # channels_last from channels_last activations), which AccumulateGrad would copy anyway.
            grad_w = grad_w.contiguous(memory_format=memory_format_of(conv.weight))
        return (grad_x, grad_w if grad_w is None else as_dtype(grad_w, conv.weight.dtype),
                grad_b if grad_b is None else as_dtype(grad_b, conv.bias.dtype))


def _onednn_low_precision_weight_grad_fails(x: Tensor, conv: ConvParams) -> bool:
    """Whether ATen's weight gradient of this convolution may come back as NaN or garbage: PyTorch 2.14's oneDNN, on
    CPUs with AMX, returns such values, differently from call to call, in the bfloat16 weight gradient of strided
    convolutions of images one pixel wide (3x3 stride 2, 1-3 input channels, 3 or 5 pixels high: 49-61 of 216
    configurations per sweep; none with oneDNN held to AVX512_CORE_BF16, none at stride 1 or 2-3 pixels wide).
    Such a gradient is computed in float32 and rounded once, which costs nothing at these sizes, on every CPU."""
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and tuple(conv.stride) != (1, 1)
            and min(x.shape[2:]) == 1)


def onednn_weight_grad_may_crash(conv: ConvParams) -> bool:
    """Whether ATen's weight gradient of this convolution may crash the process: PyTorch 2.14's bundled oneDNN
    segfaults in the AVX-512 weight gradient of 1x1 stride-2 convolutions with fewer than 16 input channels (2-15
    crashed at some batches of 1-15 images and 14-112 pixels, channels_last input; 1 and 16-256 never did, nor
    stride 1 or 3). Any stride above 1 counts here: the way around it costs nothing measurable at so few
    channels, and it is taken on every CPU (by every kernel set, for CPU tensors), the crash being a property of
    oneDNN's code path."""
    return (conv.weight.shape[2:] == (1, 1) and tuple(conv.stride) != (1, 1) and tuple(conv.padding) == (0, 0)
            and conv.weight.shape[1] * conv.groups < 16)
