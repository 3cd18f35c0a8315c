"""Determinism: the same inputs give bitwise-identical outputs, gradients and running statistics, run after run, on
every available backend; the fused kernels of the CPU backend also with 1 or 2 threads (reductions tile by shape,
never by thread, and merge in a fixed order; there are no floating-point atomics).

Across thread counts the blocks are not compared: their convolutions run in ATen (oneDNN), whose 1x1
channels_last convolution sums in a thread-dependent order (1 ulp apart between 1 and 2 threads on this machine),
which the library does not control. The fused ops without a convolution (batch_norm_act: statistics, fused apply,
both backward passes) are.

The batch_norm_act shape is large enough that the kernels cut its reductions into several tiles (4,096 values of
a plane; ~16K values of channels_last rows) and split work across threads."""

from __future__ import annotations

import copy

import pytest
import torch

import fused_resnet
from conftest import CPU_TENSOR_BACKENDS, randomize_batchnorms, to_layout
from fused_resnet import ops, use_backend

BACKENDS = CPU_TENSOR_BACKENDS
# The backends whose kernels run on the CPU with ATen's thread pool.
THREADED = [b for b in BACKENDS if b == "cpu"]


def make_block(kind: str, dtype: torch.dtype) -> torch.nn.Module:
    if kind == "basic-projection":
        downsample = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 1, 2, bias=False), torch.nn.BatchNorm2d(32))
        block = fused_resnet.BasicBlock(16, 32, 2, downsample)
    elif kind == "bottleneck":
        block = fused_resnet.Bottleneck(32, 8)
    else:
        block = fused_resnet.BasicBlock(16, 32, 2, shortcut="A")
    return randomize_batchnorms(block).to(dtype)


def run(block: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, mode: str, backend: str) -> list[torch.Tensor]:
    """Output, input gradient, every parameter gradient and every buffer of one step on a copy of `block`."""
    block = copy.deepcopy(block).train(mode == "train")
    x = x.clone().requires_grad_(mode != "inference")
    with use_backend(backend), torch.set_grad_enabled(mode != "inference"):
        out = block(x)
    if mode == "inference":
        return [out, *block.buffers()]
    out.backward(grad)
    return [out, x.grad, *(p.grad for p in block.parameters()), *block.buffers()]


def assert_bitwise_equal(first: list[torch.Tensor], second: list[torch.Tensor], what: str) -> None:
    assert len(first) == len(second)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"{what}: tensor {i} of shape {tuple(a.shape)} differs " \
                                  f"(max difference {(a.double() - b.double()).abs().max().item():.3e})"


def inputs(kind: str, dtype: torch.dtype, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    cin, out_shape = (32, (2, 32, 12, 12)) if kind == "bottleneck" else (16, (2, 32, 6, 6))
    x = to_layout(torch.randn(2, cin, 12, 12, dtype=dtype) + 0.5, channels_last)
    return x, torch.randn(out_shape, dtype=dtype)


KINDS = ["basic-projection", "bottleneck", "option-A"]


def dtypes_for(backend: str) -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16] if backend == "triton" else [torch.float32, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["train", "eval-grad", "inference"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_blocks_are_bitwise_reproducible(backend, kind, mode, channels_last):
    # Triton's interpreter is slow here: its blocks in fp32 only (batch_norm_act covers its bf16 kernels).
    for dtype in dtypes_for(backend) if backend != "triton" else [torch.float32]:
        block = make_block(kind, dtype)
        x, grad = inputs(kind, dtype, channels_last)
        first = run(block, x, grad, mode, backend)
        assert_bitwise_equal(first, run(block, x, grad, mode, backend), f"{dtype}, second run")


def batch_norm_act_step(dtype: torch.dtype, channels_last: bool, backend: str):
    """A function running one training step of batch_norm_act (with a residual) on fixed random inputs and
    returning its output, the gradients of input, residual, weight and bias, and the running statistics."""
    x = to_layout(torch.randn(8, 24, 20, 20, dtype=dtype) * 3 + 1, channels_last)
    residual, grad = torch.randn_like(x), torch.randn_like(x)
    weight, bias = torch.rand(24, dtype=dtype) + 0.5, torch.randn(24, dtype=dtype)

    def step():
        leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
        running = [torch.zeros(24, dtype=dtype), torch.ones(24, dtype=dtype)]
        out = ops.batch_norm_act(leaves[0], *running, leaves[2], leaves[3], True, 0.1, 1e-5, leaves[1],
                                 backend=backend)
        out.backward(grad)
        return [out, *(t.grad for t in leaves), *running]

    return step


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_act_is_bitwise_reproducible(backend, channels_last):
    for dtype in dtypes_for(backend):
        step = batch_norm_act_step(dtype, channels_last, backend)
        assert_bitwise_equal(step(), step(), f"{dtype}")


def with_threads(n: int, fn):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("backend", THREADED)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_batch_norm_act_is_bitwise_identical_across_thread_counts(backend, channels_last, dtype):
    step = batch_norm_act_step(dtype, channels_last, backend)
    assert_bitwise_equal(with_threads(1, step), with_threads(2, step), "1 thread against 2")


def test_a_changed_input_is_detected():
    """The comparison itself has power: one input value changed by 0.1% changes the result's bits."""
    block = make_block("bottleneck", torch.float32)
    x, grad = inputs("bottleneck", torch.float32, channels_last=False)
    nudged = x.clone()
    nudged[0, 0, 0, 0] *= 1.001
    with pytest.raises(AssertionError, match="differs"):
        assert_bitwise_equal(run(block, x, grad, "train", "torch"), run(block, nudged, grad, "train", "torch"),
                             "nudged")
