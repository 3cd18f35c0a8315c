"""A training step reads nothing back from the device, so that it can be captured in a CUDA graph (issue 14, item 10).

A host read (Tensor.item(), int(t), bool(t), a nonzero or any check, an output whose shape depends on values) waits
for the device to finish; inside torch.cuda.graph it is an error. It always goes through an ATen op whose value or
shape depends on the data: aten._local_scalar_dense and the ops tagged data_dependent_output or
dynamic_output_shape. A TorchDispatchMode sees every ATen op a step on CPU tensors issues, also those inside the
fused_resnet and fused_resnet_triton ops (the recorder runs their kernels under itself): the op layer, the modules and
the kernel sets run the same Python for CUDA tensors, but for the device-specific branches of the kernel sets and the
Triton launchers, which tests/test_gpu_backends.py covers by capturing a step in a CUDA graph on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models import resnet as tv_resnet

import fused_resnet
import fused_resnet.modules
from conftest import CPU_TENSOR_BACKENDS, every_unit_network, randomize_batchnorms

aten = torch.ops.aten
HOST_READ_TAGS = frozenset([torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape])
# Reads back untagged (bool(t) runs is_nonzero, which reads the value it returns).
UNTAGGED_HOST_READS = frozenset([aten._local_scalar_dense.default, aten.is_nonzero.default])


class HostReadRecorder(TorchDispatchMode):
    """Records every op that reads a tensor's value back to the host (`reads`) and the names of all ops run (`ops`),
    on CPU tensors. The kernels of ops outside aten (the extension's, the Triton launchers', c10d's) run under the
    recorder too, so that ATen calls inside them are seen."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.add(str(func.overloadpacket))
        if func in UNTAGGED_HOST_READS or HOST_READ_TAGS.intersection(func.tags):
            self.reads.append(str(func))
        if func.namespace != "aten":
            # Inside __torch_dispatch__ the mode is off; running the op's CPU kernel with it back on records the
            # ATen calls the kernel makes (calling func itself would come back here).
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        return func(*args, **kwargs)


def resnet18() -> nn.Module:
    return randomize_batchnorms(tv_resnet.resnet18(num_classes=5))


# Interpreted Triton runs some thousand times slower: the small network only, on 8x8 images.
CASES = [(backend, builder, 8 if backend == "triton" else 32)
         for backend in CPU_TENSOR_BACKENDS for builder in (every_unit_network, resnet18)
         if backend != "triton" or builder is every_unit_network]
FUSED_CASES = [case for case in CASES if case[0] != "torch"]
# An op that each backend's step runs: the proof that the step ran on it.
BACKEND_OPS = {"torch": "aten.native_batch_norm", "cpu": "fused_resnet.bn_act", "triton": "fused_resnet_triton.conv2d"}


def train_step_reads(model: nn.Module, backend: str, size: int) -> HostReadRecorder:
    """One SGD step of `model` in training (forward, backward, optimizer step) on a random batch, under the
    recorder."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, size, size)
    target = torch.randint(0, 5, (2,))
    model.train()
    with fused_resnet.use_backend(backend), HostReadRecorder() as recorder:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
    assert all(p.grad is not None for p in model.parameters())
    assert BACKEND_OPS[backend] in recorder.ops
    return recorder


@pytest.fixture
def one_rank_group(monkeypatch):
    """A gloo process group of one rank for SyncBatchNorm modules to synchronize over. nn.SyncBatchNorm (and the
    fused modules after it) skip a group of one rank, so the fused modules are told to use it anyway: the
    synchronized path (its all_gather over one rank) then runs in this process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    monkeypatch.setattr(fused_resnet.modules, "sync_process_group",
                        lambda bn: dist.group.WORLD if bn.training else None)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("backend, builder, size", CASES)
def test_train_step_reads_nothing_back(backend, builder, size):
    """BatchNorm2d with its default momentum: no host read on any backend (the torch one included)."""
    recorder = train_step_reads(fused_resnet.convert(builder()), backend, size)
    assert recorder.reads == []


@pytest.mark.parametrize("backend, builder, size", FUSED_CASES)
def test_min_memory_train_step_reads_nothing_back(backend, builder, size):
    """The "min" memory policy's recomputations (the last convolutions, the stem's max-pool indices) neither."""
    recorder = train_step_reads(fused_resnet.convert(builder(), memory="min"), backend, size)
    assert recorder.reads == []


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed's gloo")
@pytest.mark.parametrize("backend, builder, size", FUSED_CASES)
def test_synchronized_train_step_reads_nothing_back(backend, builder, size, one_rank_group):
    """SyncBatchNorm: the group's count of values per channel (the unbiased running variance's and the backward
    coefficients' divisor) stays a tensor on the device; it was read back with .item(), twice per BatchNorm."""
    recorder = train_step_reads(fused_resnet.convert(builder(), sync_bn=True), backend, size)
    assert "c10d.allgather_" in recorder.ops  # the statistics were synchronized
    assert recorder.reads == []


@pytest.mark.parametrize("backend, builder, size", FUSED_CASES)
def test_cumulative_average_train_step_reads_nothing_back(backend, builder, size):
    """momentum=None (the running statistics a cumulative average): its factor 1 / num_batches_tracked stays a
    tensor on the device; it was read back with float(). (The torch backend reads it, as nn.BatchNorm2d does:
    F.batch_norm takes the factor as a float.)"""
    model = fused_resnet.convert(builder())
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    recorder = train_step_reads(model, backend, size)
    assert recorder.reads == []


@torch.library.custom_op("fused_resnet_test_host_sync::scaled_by_sum", mutates_args=())
def scaled_by_sum(x: torch.Tensor) -> torch.Tensor:
    return x * x.sum().item()


def test_recorder_sees_host_reads_also_inside_other_ops():
    """The recorder's own check: each way of reading back is recorded, also inside a custom op's kernel (as the
    fused_resnet and Triton ops are), and ops that read nothing are not."""
    x = torch.randn(5)
    with HostReadRecorder() as recorder:
        (x * 2 + 1).relu().sum(0)
    assert recorder.reads == []
    for read in (lambda: x.sum().item(), lambda: bool(x[0] > 0), lambda: int(x.sum()), lambda: x.nonzero(),
                 lambda: torch.equal(x, x), lambda: (x > 0).any().item(), lambda: x[x > 0], lambda: scaled_by_sum(x)):
        with HostReadRecorder() as recorder:
            read()
        assert recorder.reads, "a host read went unrecorded"
