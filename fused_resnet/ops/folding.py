"""Inference with BatchNorm folded into the convolution before it: the per-module cache of folded weights, and
when it refolds."""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..params import ConvBN
from ..tensors import accumulation_dtype

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

    NO_HANDLE = -1  # the handle of no cache: with_handle() returns a new, empty one

    _handles = itertools.count()
    _live: weakref.WeakValueDictionary[int, FoldedWeights] = weakref.WeakValueDictionary()

    def __init__(self) -> None:
        self._entries: dict[int, tuple[tuple, tuple, tuple[Tensor, Tensor]]] = {}  # (sources, versions, folded)
        # A compiled graph names the cache by this number (ops/inference.py): graphs hold ints, not Python objects.
        self.handle = next(FoldedWeights._handles)
        FoldedWeights._live[self.handle] = self

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    @classmethod
    def with_handle(cls, handle: int) -> FoldedWeights:
        """The live cache numbered `handle`, or a new one (which folds on every call) if it is gone. A cache found
        through a stale handle is still safe: each entry checks its sources before it is used."""
        cache = cls._live.get(handle)
        return cache if cache is not None else cls()

    def clear(self) -> None:
        """Forgets every folded weight: the next inference call folds again."""
        self._entries.clear()

    def get(self, index: int, unit: ConvBN) -> tuple[Tensor, Tensor]:
        conv, bn = unit.conv, unit.bn
        sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        try:
            versions = tuple(t._version if t is not None else None for t in sources) + (bn.eps, _optimizer_steps)
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
