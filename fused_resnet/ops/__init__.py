"""The fused ops: the layer between the kernel sets (:mod:`fused_resnet.kernels`) and the modules, which checks
the arguments, picks the backend and runs the kernels under autograd.

* :func:`residual_block` — ``relu(F(x) + shortcut(x))`` for a chain of conv-BN units (BasicBlock: two,
  Bottleneck: three, a deep stem: three without a shortcut) and an identity, projection, option A or absent
  shortcut: every fused block runs through it;
* :func:`conv_bn_relu` — ``relu(batch_norm(conv(x)))``: a stem, a ConvBNReLU;
* :func:`batch_norm_act` — ``[relu](batch_norm(input) + residual)``, the F.batch_norm of a fused world, for users'
  own modules (the library's modules fuse their BatchNorms with the convolutions through the two above).

On the ``torch`` backend they run the reference composite (:mod:`fused_resnet.reference`). On the others, in
training (and whenever a gradient is needed) a block runs as a chain of autograd nodes (:mod:`.nodes`) that keep
only the raw convolution outputs, the block output and per-channel statistics for backward: the normalized
activations between convolutions are recomputed there, never saved. In inference (no gradient, running
statistics) BatchNorm is folded into each convolution's weights, cached per module (:mod:`.folding`), and bias,
residual and ReLU run in the convolution's epilogue (:mod:`.block`).

Every check (:mod:`.checks`) happens before anything is computed or updated, so a call that raises changes no
running statistic.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .. import reference
from ..backends import select_backend
from ..kernels import kernels_for
from ..params import BatchNormParams, ConvBN, MaxPoolParams
from .batch_norm import update_running_stats
from .block import Shortcut, preferred_memory_format, run_block
from .checks import check_activation, check_batch_norm, check_like
from .folding import FoldedWeights, clear_folded_weights, fold_batch_norm
from .nodes import run_bn_act

__all__ = ["FoldedWeights", "Shortcut", "batch_norm_act", "clear_folded_weights", "conv_bn_relu", "fold_batch_norm",
           "preferred_memory_format", "residual_block"]


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
    check_activation(op, "input", input)
    if not training and running_mean is None:
        raise ValueError(f"{op}: running_mean and running_var are required when training=False")
    bn = BatchNormParams(weight, bias, running_mean, running_var, None, momentum, eps, training)
    check_batch_norm(op, "", bn, list(input.shape), input)
    if residual is not None:
        check_activation(op, "residual", residual)
        check_like(op, "residual", residual, input, "input")
        if residual.shape != input.shape:
            raise ValueError(
                f"{op}: expected residual of shape {list(input.shape)} like input, got {list(residual.shape)}")
    name = select_backend(input.device, backend)
    if name == "torch":
        return reference.batch_norm_act(input, bn, residual, relu)
    kernels = kernels_for(name)
    stats = kernels.batch_stats(input.detach()) if bn.use_batch_stats else ()
    out = run_bn_act(kernels, bn, input, stats, relu, residual)
    if bn.use_batch_stats:
        update_running_stats(kernels, bn, *stats, input.numel() // input.shape[1])
    return out


def residual_block(
    x: Tensor,
    units: Sequence[ConvBN],
    shortcut: Shortcut = "identity",
    *,
    shortcut_input: Tensor | None = None,
    folded: FoldedWeights | None = None,
    memory: str | None = None,
    backend: str | None = None,
) -> Tensor:
    """``relu(F(x) + shortcut(x))``: `units` are the block's convolutions with their BatchNorms (ReLU between
    them), `shortcut` is "identity", a projection ConvBN, option A's ZeroPadIdentity, or None. The projection
    convolves `shortcut_input` when given (timm's avg_down: the average-pooled x), else x. BatchNorm running
    statistics are updated as nn.BatchNorm2d updates them. `folded` caches BN-folded weights for inference between
    calls. `memory` is the memory policy of training (:mod:`fused_resnet.memory`; None: the context's)."""
    return run_block("residual_block", x, units, shortcut, folded, backend, shortcut_input, memory)


def conv_bn_relu(
    x: Tensor, unit: ConvBN, *, max_pool: MaxPoolParams | None = None, folded: FoldedWeights | None = None,
    memory: str | None = None, backend: str | None = None
) -> Tensor:
    """``relu(batch_norm(conv(x)))`` with nn.BatchNorm2d's semantics (see :func:`residual_block`), max-pooled
    when `max_pool` is given: a ResNet's stem, which then keeps neither its activation nor the pool's indices for
    backward under the "min" memory policy."""
    if max_pool is not None and not isinstance(max_pool, MaxPoolParams):
        raise TypeError(f"conv_bn_relu: expected max_pool to be a MaxPoolParams, got {type(max_pool).__name__}")
    return run_block("conv_bn_relu", x, [unit], None, folded, backend, memory=memory, max_pool=max_pool)
