"""The fused BatchNorm + residual add + ReLU op on one activation tensor vs the unfused PyTorch sequence it
replaces, ``torch.relu(F.batch_norm(x, ...) + residual)``. The op is memory-bound, so besides images/s the
table reports GB/s against the bytes the fused op must move (a multiple of one activation tensor's size):

* train forward: read x twice (statistics, then the fused apply), read the residual, write the output: 4;
* train forward + backward: the forward's 4, then the backward's reduction pass (read grad_out, the output for
  the ReLU mask, x: 3) and elementwise pass (read the same 3, write grad_x and grad_residual: 5): 12;
* eval forward: read x and the residual, write the output: 3.

The same byte count is used for every provider, so GB/s compares like images/s does; the unfused sequence moves
more bytes than that, which is the point of fusing. The bar for GB/s is the device's own: a plain copy of a tensor
of the same size and layout (read it, write it: 2 passes), measured in the same run.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import fused_resnet
from benchmarks.harness import Layout, Provider
from benchmarks.measure import random_activation, synchronize

TENSOR_PASSES = {"train fwd": 4, "train fwd+bwd": 12, "eval fwd": 3}


def unfused_bn_add_relu(x, running_mean, running_var, weight, bias, training, residual):
    return torch.relu(F.batch_norm(x, running_mean, running_var, weight, bias, training) + residual)


def _op_for(provider: Provider) -> tuple[str, Callable]:
    """(the name the table shows, the function with unfused_bn_add_relu's signature) of `provider`."""
    if provider.is_fused:
        def fused(x, running_mean, running_var, weight, bias, training, residual):
            return fused_resnet.ops.batch_norm_act(x, running_mean, running_var, weight, bias, training,
                                                   residual=residual, backend=provider.backend)
        return provider.name, provider.compile(fused)  # compiled for torch-compile-fused-<backend>
    if provider.compiled:
        return provider.name, provider.compile(unfused_bn_add_relu)
    return "torch-unfused", unfused_bn_add_relu


def _shape_label(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


@pytest.mark.parametrize("op_case", list(TENSOR_PASSES), ids=lambda op_case: op_case.replace(" ", "-"))
def test_bn_add_relu(op_case: str, layout: Layout, provider: Provider, size, device, measure) -> None:
    n, c, h, w = size.op_shape
    training = op_case != "eval fwd"
    with_backward = op_case == "train fwd+bwd"
    x = random_activation((n, c, h, w), device, layout).requires_grad_(with_backward)
    residual = random_activation((n, c, h, w), device, layout).requires_grad_(with_backward)
    grad_out = random_activation((n, c, h, w), device, layout)
    # BatchNorm's parameters and statistics stay fp32 in low-precision runs, as under autocast.
    weight = (1 + 0.1 * torch.randn(c, device=device)).requires_grad_(with_backward)
    bias = (0.1 * torch.randn(c, device=device)).requires_grad_(with_backward)
    running_mean, running_var = torch.zeros(c, device=device), torch.ones(c, device=device)
    name, op = _op_for(provider)
    leaves = (x, residual, weight, bias)

    def step() -> None:
        if with_backward:
            for leaf in leaves:
                leaf.grad = None
            op(x, running_mean, running_var, weight, bias, training, residual).backward(grad_out)
        else:
            with torch.no_grad():
                op(x, running_mean, running_var, weight, bias, training, residual)
        synchronize(device)

    measure(step, suite="ops", case=f"bn+add+relu {_shape_label(size.op_shape)}", mode=op_case, provider=name,
            is_reference=provider.is_reference, images=n, layout=layout,
            bytes_moved=TENSOR_PASSES[op_case] * x.numel() * x.element_size(), rounds=size.op_rounds)


def test_device_copy(layout: Layout, size, device, measure) -> None:
    """The device's copy bandwidth on a tensor of the op benchmarks' size: as fast as a memory-bound op can go."""
    source = random_activation(size.op_shape, device, layout)
    target = torch.empty_like(source)

    def step() -> None:
        target.copy_(source)
        synchronize(device)

    measure(step, suite="copy", case=_shape_label(size.op_shape), mode="copy", provider="torch copy_",
            is_reference=True, images=size.op_shape[0], layout=layout,
            bytes_moved=2 * source.numel() * source.element_size(), rounds=size.op_rounds)
