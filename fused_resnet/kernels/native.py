"""The kernel sets of the compiled extension (fused_resnet._C): the `cpu` and `cuda` backends.

Both run the four memory-bound ops of torch.ops.fused_resnet (the dispatcher picks the CPU or CUDA implementation
by the tensors' device) and convolutions through ATen: oneDNN on the CPU, cuDNN on the GPU. They differ in
inference, where each hands conv+bias+ReLU (and conv+bias+add+ReLU) to its library's fused convolution, and the
CPU's 3x3 layers go to the extension's Winograd convolution where it is the faster one (docs/design.md §4).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.weak import WeakIdKeyDictionary

from .. import _native
from ..params import ConvParams, ZeroPadIdentity
from ..settings import Setting
from ..tensors import accumulation_dtype, as_dtype, is_channels_last, memory_format_of, strides_format
from .base import BackwardCoefs, KernelSet, onednn_weight_grad_may_crash
from .choices import MeasuredChoices

CPU_CONVOLUTIONS = ("auto", "direct", "winograd")
_CPU_CONVOLUTIONS = Setting("cpu convolutions", CPU_CONVOLUTIONS, "FUSED_RESNET_CPU_CONVOLUTIONS", "auto")


def use_cpu_convolutions(choice: str) -> contextlib.AbstractContextManager[None]:
    """The cpu backend's convolutions inside the ``with`` block (else the ``FUSED_RESNET_CPU_CONVOLUTIONS``
    environment variable, else ``"auto"``):

    - ``"auto"``: inference runs float32 3x3 stride-1 layers as Winograd's F(4x4, 3x3) where that was measured
      faster on this machine, each configuration timed both ways at its first call (cpu_convolution_choices() lists
      them; docs/design.md §4); training runs oneDNN's direct convolutions, so that its gradients are as accurate
      as torchvision's, and runs each convolution, input gradient and weight gradient (float32, bfloat16 or
      float16) either by oneDNN or as one GEMM with the input's patches (conv_gemm, conv_input_grad_gemm,
      conv_weight_grad_gemm), whichever was measured faster for its configuration: both are float32 sums of the
      same products, in another order, each rounded once.
    - ``"direct"``: oneDNN's direct convolutions only, in inference and in every gradient.
    - ``"winograd"``: Winograd in training too (forward, input and weight gradients), by explicit choice. Its float32
      results differ from the exact ones by ~5e-6 of a layer's largest output (as cuDNN's Winograd kernels do on a
      GPU), ~30x a direct convolution's rounding; a training step's activations end up 1.5-2.8x as far from the
      exact ones as torchvision's, so ~2x as many ReLU inputs near zero land on the other side, and where
      BatchNorm normalizes over few values (late stages at small images and batches) one such flip moves a
      channel's gradients by a few percent (docs/design.md §4). Convolutions Winograd does not suit are chosen as
      under "auto"."""
    return _CPU_CONVOLUTIONS.use(choice, "use_cpu_convolutions")


# The cpu backend's algorithm for each configuration it measured, on this machine: ("conv3x3", ...) for an
# inference convolution Winograd suits, ("forward" | "input_grad" | "weight_grad", ...) for a training one.
CONVOLUTION_CHOICES = MeasuredChoices()


def cpu_convolution_choices() -> dict[str, dict]:
    """What the cpu backend runs for each convolution configuration it has measured so far
    (use_cpu_convolutions("auto")): {"<input shape> -> <output channels>[ + residual][, relu], <n> threads" for an
    inference 3x3 convolution, "<forward | input gradient | weight gradient> <input shape> [channels_last] ->
    <weight shape>[ NCHW], stride <s>, padding <p>[, dilation <d>], <n> threads" for a training one: {"algorithm":
    "winograd" or "direct", or "gemm", "direct" or "channels_last", "ms": each candidate's median milliseconds per
    call}}, and for the forward of an NCHW weight with channels_last activations "channels_last rounding": how many
    times as much as oneDNN's NCHW forward its channels_last one rounded (a candidate up to ROUNDING_ALLOWANCE).
    Each configuration is measured once, at its first call, and runs the chosen algorithm from then on."""
    choices = {}
    for configuration, choice in CONVOLUTION_CHOICES.items():
        entry = choices[_describe(configuration)] = {
            "algorithm": choice.algorithm,
            "ms": {algorithm: round(seconds * 1e3, 3) for algorithm, seconds in choice.seconds.items()}}
        if configuration in CHANNELS_LAST_ROUNDING:
            entry["channels_last rounding"] = round(CHANNELS_LAST_ROUNDING[configuration], 2)
    return choices


def _describe(configuration: tuple) -> str:
    kind, input_shape, weight_shape, *rest = configuration
    shape = "x".join(map(str, input_shape))
    if kind == "conv3x3":
        residual, relu, threads = rest
        return (f"{shape} -> {weight_shape[0]}{' + residual' if residual else ''}{', relu' if relu else ''}, "
                f"{threads} threads")
    stride, padding, dilation, channels_last, nchw_weight, threads = rest
    return (f"{_GEMM_KINDS[kind]} {shape}{' channels_last' if channels_last else ''} -> "
            f"{'x'.join(map(str, weight_shape))}{' NCHW' if channels_last and nchw_weight else ''}, "
            f"stride {stride[0]}, padding {padding[0]}"
            f"{f', dilation {dilation[0]}' if dilation != (1, 1) else ''}, {threads} threads")


def _nchw_weight(weight: Tensor) -> bool:
    """Whether the weight is laid out NCHW and not channels_last too (a 1x1 weight is both, which no algorithm
    minds)."""
    return not weight.is_contiguous(memory_format=torch.channels_last)


# The dtypes whose training convolutions may run as GEMMs (bfloat16 and float16 multiply in MKL's or oneDNN's
# matrix units, accumulating in float32, as oneDNN's convolutions do).
_GEMM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# What each kind of training choice computes, as cpu_convolution_choices() names it.
_GEMM_KINDS = {"forward": "forward", "input_grad": "input gradient", "weight_grad": "weight gradient"}


class NativeKernels(KernelSet):
    """The compiled ops of fused_resnet._C (CPU or CUDA, by the tensors' device) and ATen convolutions, each
    activation one pass and one tensor."""

    def __init__(self) -> None:
        super().__init__(torch.ops.fused_resnet)

    def conv(self, x: Tensor, conv: ConvParams) -> Tensor:
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def conv_stats(self, x: Tensor, conv: ConvParams, stats: bool) -> tuple[Tensor, ...]:
        y = self.conv(x, conv)
        return (y, *self.batch_stats(y)) if stats else (y,)

    def bn_relu_conv(
        self, y: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, conv: ConvParams, stats: bool
    ) -> tuple[Tensor, ...]:
        # The activation is a pass of its own here; the Triton set applies it while loading the convolution's input.
        return self.conv_stats(self.bn_act(y, mean, scale, shift, relu=True), conv, stats)

    def conv_bias_act(
        self, x: Tensor, conv: ConvParams, weight: Tensor, bias: Tensor, residual: Tensor | None, relu: bool,
        zero_pad: ZeroPadIdentity | None = None,
    ) -> Tensor:
        """Convolution, then one fused pass adding the bias (and the residual) and applying the ReLU."""
        y = F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        ones = torch.ones(bias.shape, dtype=accumulation_dtype(y.dtype), device=y.device)
        return self.bn_act(y, None, ones, bias, residual, relu=relu, zero_pad=zero_pad)


class OneDnnKernels(NativeKernels):
    """The `cpu` backend. On the CPU, channels_last inference runs conv+bias+ReLU (and conv+bias+add+ReLU) as single
    oneDNN primitives, the ones torch.compile's CPU backend uses, where oneDNN supports the dtype; else conv then one
    fused pass. 3x3 stride-1 convolutions run as winograd_conv3x3 where it suits them (_winograd_suits): in
    inference from each folded weight's cached transform, where measured faster (CONVOLUTION_CHOICES); in training
    only under use_cpu_convolutions("winograd") (forward, and backward's input gradient, a 3x3 convolution of the
    output gradient with the flipped, transposed weight, transforming the weight each step, and their weight
    gradients as winograd_conv3x3_weight_grad)."""

    # BatchNorm's per-channel arithmetic as one compiled op each (csrc/cpu/batch_norm_channels_cpu.cpp), the
    # reference's rounding: ~15 ATen calls a BatchNorm fewer in a training step, and each bias gradient a tensor of
    # its own (a projection block's two BatchNorms no longer share one, which AccumulateGrad copied). A
    # synchronized BatchNorm's count (a tensor), momentum=None's tensor factor and low-precision or non-contiguous
    # running statistics take the reference.

    def bn_affine(self, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
                  ) -> tuple[Tensor, Tensor, Tensor]:
        return self.ops.batch_norm_affine(var, weight, bias, eps)

    def bn_backward_coefs(
        self, sum_dy: Tensor, sum_dy_xmu: Tensor, invstd: Tensor, weight: Tensor | None, use_batch_stats: bool,
        count: int | Tensor,
    ) -> tuple[BackwardCoefs, Tensor, Tensor]:
        if isinstance(count, Tensor):
            return super().bn_backward_coefs(sum_dy, sum_dy_xmu, invstd, weight, use_batch_stats, count)
        *coefs, grad_weight, grad_bias = self.ops.batch_norm_backward_coefs(sum_dy, sum_dy_xmu, invstd, weight,
                                                                            use_batch_stats, count)
        return tuple(coefs), grad_weight, grad_bias

    def update_running_stats(
        self, running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, factor: float | Tensor,
        count: int | Tensor,
    ) -> None:
        if (isinstance(factor, Tensor) or isinstance(count, Tensor) or running_mean.dtype != mean.dtype
                or not (running_mean.is_contiguous() and running_var.is_contiguous())):
            return super().update_running_stats(running_mean, running_var, mean, var, factor, count)
        self.ops.batch_norm_update_running_stats_(running_mean, running_var, mean, var, factor, count)

    def conv(self, x: Tensor, conv: ConvParams) -> Tensor:
        if self._winograd_runs(x, conv):
            return self.ops.winograd_conv3x3(x, self.ops.winograd_weight_transform(conv.weight), conv.bias, None,
                                             False)
        algorithm = self._training_algorithm("forward", x, conv)
        if algorithm == "gemm":
            return self._gemm("forward", x, conv)
        return self._direct_forward(x, conv, in_channels_last=algorithm == "channels_last")

    def _direct_forward(self, x: Tensor, conv: ConvParams, in_channels_last: bool = False) -> Tensor:
        """oneDNN's convolution. Channels_last activations with an NCHW 3x3 or 7x7 weight (an NCHW model's blocks in
        training, which run channels_last: FusedStem.enter_blocks) convolve in NCHW, the activations converted there
        and back, unless `in_channels_last` (_rounds_as_nchw): oneDNN's channels_last forward can round several times
        as much as its NCHW one, and an NCHW model is held to torchvision's NCHW rounding
        (tests/test_training_accuracy.py). resnet18 at 96x96, batch 4, on a 2-core AVX-512 Xeon: block outputs
        1.3-1.7x as far from float64 as torchvision's with every such layer channels_last, 1.0-1.1x in NCHW."""
        if is_channels_last(x) and _nchw_weight(conv.weight) and not in_channels_last:
            return super().conv(x.contiguous(), conv).contiguous(memory_format=torch.channels_last)
        return super().conv(x, conv)

    def conv_backward(
        self, grad_y: Tensor, x: Tensor, conv: ConvParams, need_input: bool, need_weight: bool, need_bias: bool
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        winograd_input = need_input and self._winograd_runs(grad_y, conv)
        winograd_weight = need_weight and self._winograd_runs(x, conv) and is_channels_last(grad_y)
        gemm_input = (need_input and not winograd_input
                      and self._training_algorithm("input_grad", x, conv, grad_y) == "gemm")
        gemm_weight = (need_weight and not winograd_weight
                       and self._training_algorithm("weight_grad", x, conv, grad_y) == "gemm")
        if not (winograd_input or winograd_weight or gemm_input or gemm_weight):
            return super().conv_backward(grad_y, x, conv, need_input, need_weight, need_bias)
        grad_x, grad_weight, grad_bias = super().conv_backward(
            grad_y, x, conv, need_input and not (winograd_input or gemm_input),
            need_weight and not (winograd_weight or gemm_weight), need_bias)
        if winograd_input:
            flipped = conv.weight.flip(2, 3).transpose(0, 1)
            grad_x = self.ops.winograd_conv3x3(grad_y, self.ops.winograd_weight_transform(flipped), None, None, False)
        if winograd_weight:
            grad_weight = self.ops.winograd_conv3x3_weight_grad(x, grad_y).contiguous(
                memory_format=memory_format_of(conv.weight))
        if gemm_input:
            grad_x = self._gemm("input_grad", x, conv, grad_y)
        if gemm_weight:
            grad_weight = self._gemm("weight_grad", x, conv, grad_y)
        return grad_x, grad_weight, grad_bias

    def _gemm(self, kind: str, x: Tensor, conv: ConvParams, grad_y: Tensor | None = None) -> Tensor:
        """The convolution ("forward"), its input gradient ("input_grad") or its weight gradient ("weight_grad") as
        one GEMM with the input's patches (csrc/cpu/conv_gemm_cpu.cpp)."""
        geometry = (list(conv.stride), list(conv.padding), list(conv.dilation))
        if kind == "forward":
            return self.ops.conv_gemm(x, conv.weight, *geometry)
        if kind == "input_grad":
            return self.ops.conv_input_grad_gemm(grad_y, conv.weight, list(x.shape), *geometry)
        return self.ops.conv_weight_grad_gemm(x, grad_y, list(conv.weight.shape[2:]), *geometry,
                                              strides_format(conv.weight))

    def _training_algorithm(self, kind: str, x: Tensor, conv: ConvParams, grad_y: Tensor | None = None) -> str:
        """"gemm" where this convolution's `kind` (see _gemm) runs as a GEMM, "direct" where as oneDNN's direct
        convolution, "channels_last" where an NCHW weight's forward with channels_last activations runs as oneDNN's
        channels_last convolution (_direct_forward): measured the first time its configuration (kind, input and
        weight shapes, geometry, layouts, thread count) comes, on these very tensors, and fixed from then on
        (CONVOLUTION_CHOICES, _measured_choice). The last is a candidate only where it rounds as the NCHW
        convolution does (_rounds_as_nchw). oneDNN's
        direct convolutions run far below the GEMM's speed on small images with many channels: on a 2-core AVX-512
        Xeon, ResNet's 512-channel 3x3 layer at 4x4 pixels, batch 4, channels_last, took 2.2 ms forward, 2.4 for
        the input gradient and 8.9 for the weight gradient, against 1.5, 1.5 and 1.2 as GEMMs; the GEMMs lose on
        large images with few channels (64 channels at 40x40, batch 16: 5.6 ms forward against 9.8), so the
        machine at hand decides. Candidates (_gemm_suits): float32 convolutions of one group, eagerly, under "auto"
        (or "winograd", where Winograd does not run)."""
        if not self._gemm_suits(kind, x, conv, grad_y):
            return "direct"

        def direct() -> Tensor:
            if kind == "forward":
                return self._direct_forward(x, conv)
            need_input = kind == "input_grad"
            grads = super(OneDnnKernels, self).conv_backward(grad_y, x, conv, need_input, not need_input, False)
            return grads[0 if need_input else 1]

        configuration = (kind, tuple(x.shape), tuple(conv.weight.shape), tuple(conv.stride), tuple(conv.padding),
                         tuple(conv.dilation), is_channels_last(x), _nchw_weight(conv.weight),
                         torch.get_num_threads())
        candidates = {"direct": direct, "gemm": lambda: self._gemm(kind, x, conv, grad_y)}
        if kind == "forward" and is_channels_last(x) and _nchw_weight(conv.weight) and _rounds_as_nchw(
                configuration, x, conv):
            candidates["channels_last"] = lambda: self._direct_forward(x, conv, in_channels_last=True)
        return _measured_choice(configuration, candidates, x)

    @staticmethod
    def _gemms_may_run(x: Tensor) -> bool:
        """Whether training convolutions of tensors like x may run as GEMMs (see _gemm_suits): what makes
        channels_last activations pay in training (preferred_memory_format)."""
        return (_CPU_CONVOLUTIONS.requested() == "auto" and not torch.compiler.is_compiling()
                and not torch.is_autocast_enabled("cpu") and x.device.type == "cpu" and x.dtype in _GEMM_DTYPES)

    @staticmethod
    def _gemm_suits(kind: str, x: Tensor, conv: ConvParams, grad_y: Tensor | None) -> bool:
        """Whether the GEMM is a candidate: float32, bfloat16 or float16 CPU tensors of one dtype and one layout (the
        weight's may be NCHW for channels_last activations, the patches then taking its order; NCHW activations
        need an NCHW weight, unless 1x1: no operand is converted), one group, no bias in the forward, outside
        torch.compile's trace and autocast, not the bfloat16 or float16 input gradient of a kernel larger than 1x1
        (its GEMM rounds each patch's gradient before col2im sums up to kh x kw of them: 1.5-1.8x the rounding of
        oneDNN's, which rounds each sum once; forward, weight gradients and 1x1 input gradients round as oneDNN's),
        under "auto" or "winograd"; not under autograd (the ops have no derivative: the fused nodes call them
        from their forward and backward); not the weight gradients whose oneDNN form may crash (a candidate runs
        it; KernelSet.conv_backward goes around them, through the stride-1 gradient of the subsampled input, itself
        a candidate)."""
        tensors = (x, conv.weight) if grad_y is None else (x, conv.weight, grad_y)
        layout = is_channels_last(x)
        return (_CPU_CONVOLUTIONS.requested() != "direct" and not torch.compiler.is_compiling()
                and not torch.is_autocast_enabled("cpu") and x.device.type == "cpu" and conv.groups == 1
                and x.dtype in _GEMM_DTYPES and all(t.dtype == x.dtype and t.dim() == 4 for t in tensors)
                and (grad_y is None or is_channels_last(grad_y) == layout)
                and (layout or conv.weight.shape[2:] == (1, 1) or not is_channels_last(conv.weight))
                and not (kind == "forward" and conv.bias is not None)
                and not (kind == "input_grad" and x.dtype != torch.float32 and conv.weight.shape[2:] != (1, 1))
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
                and not (kind == "weight_grad" and onednn_weight_grad_may_crash(conv)))

    def conv_bias_act(
        self, x: Tensor, conv: ConvParams, weight: Tensor, bias: Tensor, residual: Tensor | None, relu: bool,
        zero_pad: ZeroPadIdentity | None = None,
    ) -> Tensor:
        def direct() -> Tensor:
            return self._direct_conv_bias_act(x, conv, weight, bias, residual, relu, zero_pad)

        if zero_pad is None and self._winograd_runs(x, conv, residual, inference=True):
            winograd_bias = as_dtype(bias, weight.dtype)

            def winograd() -> Tensor:
                return self.ops.winograd_conv3x3(x, self._winograd_transform(weight), winograd_bias, residual, relu)

            if (_CPU_CONVOLUTIONS.requested() == "winograd"
                    or self._inference_algorithm(x, weight, residual, relu, winograd, direct) == "winograd"):
                return winograd()
        return direct()

    def _direct_conv_bias_act(
        self, x: Tensor, conv: ConvParams, weight: Tensor, bias: Tensor, residual: Tensor | None, relu: bool,
        zero_pad: ZeroPadIdentity | None,
    ) -> Tensor:
        """conv_bias_act by a direct convolution: one oneDNN primitive with the weight packed once where it can,
        else conv + one fused pass."""
        # Under torch.compile the tracer needs fake implementations, which oneDNN's fused ops lack; the compiler
        # makes its own fusions from conv + one pass. torch.jit.trace cannot record their list of optional scalars
        # (it records winograd_conv3x3). Under autocast the convolution must run in the autocast dtype, as
        # torchvision's does, which only F.conv2d knows to do.
        if (zero_pad is not None or torch.compiler.is_compiling() or torch.jit.is_tracing()
                or torch.is_autocast_enabled("cpu") or not self._onednn_supports(x, residual)):
            return super().conv_bias_act(x, conv, weight, bias, residual, relu, zero_pad)
        bias = as_dtype(bias, weight.dtype)
        geometry = (conv.padding, conv.stride, conv.dilation, conv.groups)
        weight = self._packed(weight, geometry, x)
        unary = "relu" if relu else "none"
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise.default(x, weight, bias, *geometry, unary, [None], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual, weight, bias, *geometry, "add", None, unary, [None], "")

    def _inference_algorithm(self, x: Tensor, weight: Tensor, residual: Tensor | None, relu: bool,
                             winograd: Callable[[], Tensor], direct: Callable[[], Tensor]) -> str:
        """"winograd" or "direct" for this inference convolution, measured the first time its configuration (input
        and weight shapes, residual, ReLU, thread count) comes, on these very tensors, and fixed from then on
        (CONVOLUTION_CHOICES; _measured_choice)."""
        configuration = ("conv3x3", tuple(x.shape), tuple(weight.shape), residual is not None, relu,
                         torch.get_num_threads())
        return _measured_choice(configuration, {"winograd": winograd, "direct": direct}, x)

    def preferred_memory_format(self, x: Tensor, training: bool = False) -> torch.memory_format:
        # oneDNN runs NCHW convolutions through reorders to and from its blocked layouts: a converted resnet50's
        # inference (batch 16, 160x160, float32) took 662 ms on NCHW input against 528 in channels_last. Inside
        # torch.compile's (or torch.jit.trace's) trace only float32 is answered, since the dtype query would break
        # the graph (and its boolean result cannot be traced).
        # In training an NCHW model's weights stay NCHW (its parameters, gradients and optimizer state are the
        # user's); channels_last activations pay off where the GEMMs, which read NCHW weights as they are, are
        # candidates: with oneDNN alone each convolution would convert its weight in every call and its weight
        # gradient back (a converted resnet18 in NCHW, batch 2 @64: 71 copies a step; the training entry point,
        # resnet18 batch 32 @64, ran at 0.82x torchvision's).
        if training and not self._gemms_may_run(x):
            return super().preferred_memory_format(x)
        tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
        dtypes = frozenset([torch.float32]) if tracing else self._onednn_dtypes
        if x.device.type == "cpu" and x.dim() == 4 and x.dtype in dtypes:
            return torch.channels_last
        return super().preferred_memory_format(x)

    def _packed(self, weight: Tensor, geometry: tuple, x: Tensor) -> Tensor:
        """`weight` reordered once into the blocked layout oneDNN picks for inputs shaped like x, kept while the
        weight lives: a folded weight lives as long as its entry in the module's folded-weight cache, so the reorder
        runs once per refold instead of inside every call (resnet50, batch 16 at 160x160: the 3x3 and 1x1
        convolutions 2-5% faster). The form packed for x's shape serves any shape, only less well. It is repacked
        when the number of threads changes too: oneDNN picks the blocked layout for the thread count, and a form
        packed for another count is reordered again inside every call (a 3x3 convolution, 64 channels at 8x8 packed
        under 2 threads and run under 1: 2.3 ms a call instead of 0.1; a resnet18 at 32x32 ran 6x slower)."""
        key = (x.shape, torch.get_num_threads())
        entry = self._packed_weights.get(weight)
        if entry is None or entry[0] != key:
            entry = (key, torch.ops.mkldnn._reorder_convolution_weight(weight, *geometry, list(x.shape)))
            self._packed_weights[weight] = entry
        return entry[1]

    @functools.cached_property
    def _packed_weights(self) -> WeakIdKeyDictionary:
        """{folded weight: ((the input shape, the thread count) it was packed for, its packed form)}; an entry goes
        with its weight."""
        return WeakIdKeyDictionary()

    def _winograd_runs(self, x: Tensor, conv: ConvParams, residual: Tensor | None = None,
                       inference: bool = False) -> bool:
        """Whether winograd_conv3x3 runs this convolution (x its input, or in backward the output gradient): in
        inference, or in training where use_cpu_convolutions("winograd") asks for it; eagerly or under
        torch.jit.trace (torch.compile sees ATen's convolution), outside autocast, on strictly channels_last float32
        tensors of a shape it suits."""
        requested = _CPU_CONVOLUTIONS.requested()
        return (requested == "winograd" or (inference and requested == "auto")) and (
                not (torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"))
                and conv.weight.dtype == torch.float32 and is_channels_last(x)
                and (residual is None or is_channels_last(residual)) and _winograd_suits(x, conv))

    def _winograd_transform(self, weight: Tensor) -> Tensor:
        """winograd_weight_transform(weight), kept while the weight lives, as _packed keeps packed forms: made once
        per refold of a folded weight."""
        transform = self._winograd_transforms.get(weight)
        if transform is None:
            transform = self.ops.winograd_weight_transform(weight)
            self._winograd_transforms[weight] = transform
        return transform

    @functools.cached_property
    def _winograd_transforms(self) -> WeakIdKeyDictionary:
        """{folded weight: its Winograd transform}; an entry goes with its weight."""
        return WeakIdKeyDictionary()

    @functools.cached_property
    def _onednn_dtypes(self) -> frozenset[torch.dtype]:
        """The dtypes oneDNN's fused convolutions take on this CPU, asked once, on the first eager inference call
        (each query costs a call): bf16 needs AVX512-BF16 or AMX; fp16 would need AVX512-FP16 or AVX-NE-CONVERT and
        goes through conv + one pass. Asked then rather than when the set is made, so that importing fused_resnet
        queries nothing; never inside torch.compile's trace (where a query would break the graph), as
        conv_bias_act returns before asking when compiling."""
        if not torch.backends.mkldnn.is_available():
            return frozenset()
        bf16 = [torch.bfloat16] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else []
        return frozenset([torch.float32, *bf16])

    def _onednn_supports(self, x: Tensor, residual: Tensor | None) -> bool:
        # Channels_last only: there the fused primitive beats conv + one pass (64@56, batch 8: 8.6 ms against
        # 11.1); on NCHW it was slower (14.8 ms against 13.9), its add falling back to a separate ATen add_relu.
        # Strictly channels_last: a tensor that is NCHW too (one channel, or 1x1 pixels) sends oneDNN down its NCHW
        # path, whose add has no bf16 kernel.
        return (x.dtype in self._onednn_dtypes and is_channels_last(x)
                and (residual is None or is_channels_last(residual)))


def _measured_choice(configuration: tuple, candidates: dict[str, Callable[[], object]], x: Tensor) -> str:
    """CONVOLUTION_CHOICES.choose(configuration, candidates), measured only on real tensors and outside
    torch.jit.trace (which would record the candidates). On fake tensors (the benchmarks' traffic count) timings
    mean nothing, and a choice made on them would hold for real tensors of that shape too: there, and in a trace, a
    configuration chosen before runs as chosen, any other directly."""
    if torch.jit.is_tracing() or isinstance(x, FakeTensor):
        made = CONVOLUTION_CHOICES.made(configuration)
        return made.algorithm if made is not None else "direct"
    return CONVOLUTION_CHOICES.choose(configuration, candidates)


# Whether oneDNN's channels_last forward rounds as its NCHW one, for each configuration asked (_rounds_as_nchw), with
# the ratio of the two errors measured.
CHANNELS_LAST_ROUNDING: dict[tuple, float] = {}
# How much more than oneDNN's NCHW convolution another forward may round, by its largest error against float64
# relative to the largest output, on a configuration's first call: the GEMMs' own measure 1.0-1.6x on ResNet's
# layers, and with them a model's activations stay within the accuracy test's bound (resnet18 at 96x96: 1.1-1.3x
# torchvision's NCHW distance with every forward a GEMM). oneDNN's channels_last forward measured 2.5-7.7x on the
# 64-512-channel 3x3 layers of an AVX-512 Xeon, 1.0x on the 3-channel 7x7 stem, where it runs 3x as fast.
ROUNDING_ALLOWANCE = 1.6


def _rounds_as_nchw(configuration: tuple, x: Tensor, conv: ConvParams) -> bool:
    """Whether oneDNN's channels_last forward of this configuration (channels_last x, an NCHW weight) rounds within
    ROUNDING_ALLOWANCE of its NCHW forward: measured once per configuration on x against float64
    (CHANNELS_LAST_ROUNDING), never on fake tensors or in a trace (there: no)."""
    if configuration not in CHANNELS_LAST_ROUNDING:
        if torch.jit.is_tracing() or isinstance(x, FakeTensor):
            return False
        geometry = (conv.stride, conv.padding, conv.dilation, conv.groups)
        exact = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                         *geometry)
        scale = exact.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
        errors = [(F.conv2d(x_laid, weight, conv.bias, *geometry).double() - exact).abs().max() / scale
                  for x_laid, weight in ((x.contiguous(), conv.weight),
                                         (x, conv.weight.contiguous(memory_format=torch.channels_last)))]
        CHANNELS_LAST_ROUNDING[configuration] = (errors[1] / errors[0].clamp_min(1e-30)).item()
    return CHANNELS_LAST_ROUNDING[configuration] <= ROUNDING_ALLOWANCE


def _winograd_suits(x: Tensor, conv: ConvParams) -> bool:
    """Whether winograd_conv3x3 (F(4x4, 3x3): a quarter of the direct convolution's multiplications, for 36/9 the
    weight's bytes) is a candidate for this convolution, which inference then times against the direct one on the
    machine at hand (CONVOLUTION_CHOICES), and training runs under use_cpu_convolutions("winograd"): a float32
    3x3 convolution with stride 1, padding 1 and one group, of 32 or more input and output channels, on an image
    that fills at least half of its 4x4 tiles, in 16 tiles or more unless the transformed weight (36 x C x K
    floats) is small enough to stay in cache. Against oneDNN's direct convolution with the same post-ops (2-core AMD
    EPYC, AVX2, channels_last): 64 to 512 channels at 7x7 to 56x56 pixels, batch 1 to 16, 1.2-2.5x faster; it lost
    with 16 channels (0.75-0.94x: thin GEMMs, transforms that move more bytes than the convolution), at 5x5 pixels
    (0.94x: the tiles are 60% padding) and at 512 channels in fewer than 16 tiles (0.5-0.75x: the 38 MB transformed
    weight read for a few pixels). On a 2-core AVX-512 Xeon, measured by the choice itself: ResNet-50's layers at
    batch 1 and 16 1.2-2.1x faster, but 64 channels at 56x56 pixels, batch 16, 0.56x (17 ms direct, 30 Winograd),
    where inference now runs the direct convolution."""
    images, _, height, width = x.shape
    out_channels, in_channels = conv.weight.shape[:2]
    tiles_h, tiles_w = (height + 3) // 4, (width + 3) // 4
    return (x.dtype == torch.float32 and conv.weight.shape[2:] == (3, 3)
            and tuple(conv.stride) == (1, 1) and tuple(conv.padding) == (1, 1) and tuple(conv.dilation) == (1, 1)
            and conv.groups == 1
            and min(in_channels, out_channels) >= 32 and 2 * height * width >= 16 * tiles_h * tiles_w
            and (images * tiles_h * tiles_w >= 16 or in_channels * out_channels <= 256 * 256))


class CudnnKernels(NativeKernels):
    """The `cuda` backend. On CUDA, inference runs conv+bias+ReLU and conv+bias+add+ReLU as single cuDNN calls
    (cuDNN's fused convolution-bias-activation, what docs/design.md §4 names the bar to beat), and a projection's
    conv+bias as one F.conv2d. Where cuDNN turns a configuration down (it supports fewer dtype/layout/algorithm
    combinations than plain convolution), that configuration goes through conv + one fused pass from then on, with
    a warning."""

    def __init__(self) -> None:
        super().__init__()
        self._cudnn_refused: set[tuple] = set()

    def conv_bias_act(
        self, x: Tensor, conv: ConvParams, weight: Tensor, bias: Tensor, residual: Tensor | None, relu: bool,
        zero_pad: ZeroPadIdentity | None = None,
    ) -> Tensor:
        # Under torch.compile the compiler makes its own fusions; under autocast only F.conv2d knows to cast.
        if zero_pad is not None or torch.compiler.is_compiling() or torch.is_autocast_enabled("cuda"):
            return super().conv_bias_act(x, conv, weight, bias, residual, relu, zero_pad)
        geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        cudnn_bias = as_dtype(bias, weight.dtype)  # cuDNN adds a bias in the convolution's dtype
        if not relu and residual is None:
            return F.conv2d(x, weight, cudnn_bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        key = (x.dtype, memory_format_of(x), residual is not None, relu)
        if not relu or key in self._cudnn_refused or not torch.backends.cudnn.is_available():
            return super().conv_bias_act(x, conv, weight, bias, residual, relu, zero_pad)
        try:
            if residual is None:
                return torch.ops.aten.cudnn_convolution_relu(x, weight, cudnn_bias, *geometry)
            return torch.ops.aten.cudnn_convolution_add_relu(x, weight, as_dtype(residual, x.dtype), 1.0, cudnn_bias,
                                                             *geometry)
        except RuntimeError as error:
            self._cudnn_refused.add(key)
            warnings.warn(f"fused_resnet: cuDNN's fused convolution refused {key} ({error}); that configuration "
                          "runs as convolution + one fused pass from now on", RuntimeWarning, stacklevel=2)
            return super().conv_bias_act(x, conv, weight, bias, residual, relu, zero_pad)


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
    def _(input, mean, scale, shift, residual, residual_mean, residual_scale, residual_shift, relu,
          residual_stride=1, residual_channel_offset=0):
        return like(input)

    @torch.library.register_fake("fused_resnet::bn_act_backward_reduce")
    def _(grad_output, output, input, mean, input2, mean2, mask_scale=None, mask_shift=None):
        third = channels(input) if input2 is not None else input.new_empty((0,), dtype=accumulation_dtype(input.dtype))
        return channels(input), channels(input), third

    @torch.library.register_fake("fused_resnet::batch_norm_affine")
    def _(var, weight, bias, eps):
        return torch.empty_like(var), torch.empty_like(var), torch.empty_like(var)

    @torch.library.register_fake("fused_resnet::batch_norm_backward_coefs")
    def _(sum_dy, sum_dy_xmu, invstd, weight, use_batch_stats, count):
        return tuple(torch.empty_like(invstd) for _ in range(5))

    @torch.library.register_fake("fused_resnet::batch_norm_update_running_stats_")
    def _(running_mean, running_var, mean, var, factor, count):
        return None

    @torch.library.register_fake("fused_resnet::winograd_weight_transform")
    def _(weight):
        return weight.new_empty((36, weight.shape[1], weight.shape[0]))

    @torch.library.register_fake("fused_resnet::winograd_conv3x3")
    def _(input, weight_transform, bias, residual, relu):
        shape = (input.shape[0], weight_transform.shape[2], *input.shape[2:])
        return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=torch.channels_last)

    @torch.library.register_fake("fused_resnet::winograd_conv3x3_weight_grad")
    def _(input, grad_output):
        return input.new_empty((grad_output.shape[1], input.shape[1], 3, 3))

    def laid_out_as(t: Tensor, shape) -> Tensor:
        return torch.empty(shape, dtype=t.dtype, device=t.device, memory_format=memory_format_of(t))

    @torch.library.register_fake("fused_resnet::conv_gemm")
    def _(input, weight, stride, padding, dilation):
        sizes = [(size + 2 * pad - dil * (k - 1) - 1) // s + 1
                 for size, k, s, pad, dil in zip(input.shape[2:], weight.shape[2:], stride, padding, dilation)]
        return laid_out_as(input, (input.shape[0], weight.shape[0], *sizes))

    @torch.library.register_fake("fused_resnet::conv_input_grad_gemm")
    def _(grad_output, weight, input_size, stride, padding, dilation):
        return laid_out_as(grad_output, input_size)

    @torch.library.register_fake("fused_resnet::conv_weight_grad_gemm")
    def _(input, grad_output, kernel_size, stride, padding, dilation, weight_format=None):
        shape = (grad_output.shape[1], input.shape[1], *kernel_size)
        if weight_format is None:
            return laid_out_as(input, shape)
        return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=weight_format)

    @torch.library.register_fake("fused_resnet::bn_act_backward_elemt")
    def _(grad_output, output, input, mean, coef_dy, coef_xmu, coef_const, input2, mean2, coef2_dy, coef2_xmu,
          coef2_const, residual_grad, mask_scale=None, mask_shift=None):
        other = like(input) if (input2 is not None or residual_grad) else input.new_empty((0,))
        return like(input), other


if _native.has_extension():
    _register_fake_implementations()
