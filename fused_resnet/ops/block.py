"""A block's backend dispatch: the reference composite on the ``torch`` backend; else, when no gradient is needed
and every BatchNorm uses its running statistics, inference with the BatchNorms folded into the convolutions; else
the chain of autograd nodes (:mod:`.nodes`), after which the running statistics move."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import reference
from ..backends import select_backend
from ..kernels import kernels_for
from ..memory import requested_memory_policy
from ..params import ConvBN, MaxPoolParams, ZeroPadIdentity
from ..tensors import memory_format_of
from .batch_norm import update_running_stats
from .checks import check_block
from .folding import FoldedWeights
from .inference import inference_block
from .nodes import RecomputeSource, run_bn_act, run_bn_relu_conv, run_bn_relu_max_pool, run_conv
from .sync import synchronized

# A projection, "identity", option A's zero-padded identity, or None (a plain block).
Shortcut = ConvBN | ZeroPadIdentity | str | None


def run_block(
    op: str, x: Tensor, units: Sequence[ConvBN], shortcut: Shortcut, folded: FoldedWeights | None, backend: str | None,
    shortcut_input: Tensor | None = None, memory: str | None = None, max_pool: MaxPoolParams | None = None,
) -> Tensor:
    """residual_block (and conv_bn_relu, a block of one unit without a shortcut, then `max_pool` when given) as
    public op `op`, under memory policy `memory` (:mod:`fused_resnet.memory`)."""
    shapes = check_block(op, x, units, shortcut, shortcut_input)
    min_memory = requested_memory_policy(memory, f"{op}: memory") == "min"
    name = select_backend(x.device, backend)
    every_unit = [*units, shortcut] if isinstance(shortcut, ConvBN) else list(units)
    if name == "torch":
        if any(u.bn.process_group is not None for u in every_unit):
            raise ValueError(f"{op}: the torch backend (the reference composite) does not synchronize BatchNorm "
                             "statistics over a process group; use the cpu or cuda backend")
        return _pooled(reference.residual_block(x, units, shortcut, shortcut_input), max_pool)
    kernels = kernels_for(name)
    projected = x if shortcut_input is None else shortcut_input
    if not _needs_autograd([x, projected], every_unit) and not any(u.bn.use_batch_stats for u in every_unit):
        return _pooled(inference_block(name, x, units, shortcut, projected, folded), max_pool)
    first = units[0]
    y, *stats = run_conv(kernels, x, first.conv, first.bn.use_batch_stats)
    # (bn, batch statistics, their count) of each unit, for the running statistics
    batch_stats = [(first.bn, *synchronized(first.bn, stats, shapes[0]))]
    recompute = None  # under the minimum-memory policy: how the last node recomputes the last convolution's output
    for previous, unit, shape in zip(units[:-1], units[1:], shapes[1:]):
        if min_memory:
            recompute = RecomputeSource(y, previous.bn, batch_stats[-1][1], unit.conv)
        y, *stats = run_bn_relu_conv(kernels, previous.bn, y, batch_stats[-1][1], unit.conv, unit.bn.use_batch_stats)
        batch_stats.append((unit.bn, *synchronized(unit.bn, stats, shape)))
    projection = recompute_projection = None
    if isinstance(shortcut, ConvBN):
        y2, *stats = run_conv(kernels, projected, shortcut.conv, shortcut.bn.use_batch_stats)
        batch_stats.append((shortcut.bn, *synchronized(shortcut.bn, stats, shapes[-1])))
        projection = (shortcut.bn, y2, batch_stats[-1][1])
        if min_memory:
            recompute_projection = (projected, shortcut.conv)
    identity = shortcut == "identity" or isinstance(shortcut, ZeroPadIdentity)
    zero_pad = shortcut if isinstance(shortcut, ZeroPadIdentity) else None
    last_stats = batch_stats[len(units) - 1][1]
    if min_memory and max_pool is not None and len(units) == 1 and shortcut is None:
        out = run_bn_relu_max_pool(kernels, units[-1].bn, y, last_stats, max_pool)
    else:
        out = _pooled(run_bn_act(kernels, units[-1].bn, y, last_stats, True, x if identity else None, zero_pad,
                                 projection, recompute, recompute_projection), max_pool)
    # The running statistics move only once every node has run.
    for bn, stats, count in batch_stats:
        if stats:
            update_running_stats(kernels, bn, *stats, count)
    return out


def _pooled(out: Tensor, max_pool: MaxPoolParams | None) -> Tensor:
    return out if max_pool is None else max_pool.apply(out)


def preferred_memory_format(x: Tensor, backend: str | None = None, training: bool = False) -> torch.memory_format:
    """The memory format in which fused blocks run fastest on an input like x, in inference or (`training`) under
    autograd: x's own, or the one the backend's convolutions prefer (channels_last on the cpu backend)."""
    name = select_backend(x.device, backend)
    return memory_format_of(x) if name == "torch" else kernels_for(name).preferred_memory_format(x, training)


def _needs_autograd(inputs: Sequence[Tensor], units: Sequence[ConvBN]) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = (t for u in units for t in (u.conv.weight, u.conv.bias, u.bn.weight, u.bn.bias))
    return any(t.requires_grad for t in inputs) or any(t is not None and t.requires_grad for t in tensors)
