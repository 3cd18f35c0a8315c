"""The memory policy of training: what the fused autograd nodes keep for backward.

``"default"``: the raw convolution outputs, the block outputs and per-channel statistics (the normalized
activations between convolutions are recomputed in backward, never kept).
``"min"``: besides, a block's last convolution output and its projection shortcut's are recomputed in backward
from what is kept anyway, and a ResNet's stem keeps neither its activation nor max-pool's indices (both are
recomputed from its convolution output). That costs a second forward of those convolutions in backward; the
outputs, gradients and running statistics are the same (docs/design.md §5).

A block or model takes the policy as its `memory` attribute (``fused_resnet.convert(model, memory="min")``,
``fused_resnet.resnet50(memory="min")``, ``Bottleneck(..., memory="min")``); where that is None, the innermost
:func:`use_memory_policy` context decides, then the ``FUSED_RESNET_MEMORY`` environment variable, then
``"default"``.
"""

from __future__ import annotations

import contextlib

from torch import nn

from .settings import Setting

MEMORY_POLICIES = ("default", "min")
ENV_VAR = "FUSED_RESNET_MEMORY"
_MEMORY = Setting("memory policy", MEMORY_POLICIES, ENV_VAR, "default")


def use_memory_policy(policy: str) -> contextlib.AbstractContextManager[None]:
    """Trains the fused modules inside the ``with`` block under `policy`, unless a module has its own."""
    return _MEMORY.use(policy, "use_memory_policy")


def requested_memory_policy(policy: str | None = None, where: str = "memory") -> str:
    """`policy` when given (checked; an error names `where`), else the context's, the environment's or the
    default."""
    return _MEMORY.requested(policy, where)


def check_memory_policy(policy: str | None, where: str) -> str | None:
    """`policy` (None: follow the context) or a ValueError naming `where`."""
    return policy if policy is None else _MEMORY.check(policy, where)


def set_memory_policy(model: nn.Module, policy: str | None) -> nn.Module:
    """Sets the memory policy of every fused module of `model` (itself included) that has one; None makes them
    follow the context again. Returns `model`."""
    check_memory_policy(policy, "set_memory_policy: policy")
    for module in model.modules():
        if hasattr(module, "memory"):
            module.memory = policy
    return model
