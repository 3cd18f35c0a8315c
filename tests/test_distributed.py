"""Fused models under DistributedDataParallel with synchronized BatchNorm: 2 processes on the CPU (gloo), each
with its own shard of the batch, unequal in size.

torch.nn.SyncBatchNorm itself refuses CPU tensors ("SyncBatchNorm expected input tensor to be on GPU"), so the
reference is what it computes by definition: torchvision's network with plain BatchNorm on the whole batch in one
process. The per-rank losses are scaled so that DDP's average of the gradients is the gradient of the whole
batch's mean loss; the losses, every gradient, the parameters and the running statistics must then agree to
rounding in float64. The same run without sync_bn must not (the shards' statistics differ), so the check can
fail."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fused_resnet
from conftest import CPU_BACKENDS, assert_rel, every_unit_network, rel_err

pytestmark = pytest.mark.skipif(not (CPU_BACKENDS and dist.is_available() and dist.is_gloo_available()),
                                reason="needs a fused CPU backend and torch.distributed with gloo")

WORLD = 2
SHARDS = (3, 1)  # samples per rank: the merged statistics must weigh each rank by its count
STEPS = 3
# (SyncBatchNorm, memory policy) of the runs each rank makes
RUNS = ((True, "default"), (True, "min"), (False, "default"))


def network() -> nn.Module:
    """conftest's every_unit_network in float64, the same on every rank."""
    torch.manual_seed(0)
    return every_unit_network().double()


def shard_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """This rank's part of the whole batch's mean loss, times the world size (DDP averages over the ranks)."""
    return F.cross_entropy(out, target, reduction="sum") * WORLD / sum(SHARDS)


def train(model: nn.Module, batches, loss_fn) -> dict:
    """STEPS SGD steps; the losses, the gradients of the last step, and the final parameters and buffers."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, target in batches:
        optimizer.zero_grad()
        loss = loss_fn(model(x), target)
        loss.backward()
        losses.append(loss.detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
    return {"losses": torch.stack(losses), "grads": grads,
            "state": {n: t.clone() for n, t in model.state_dict().items()}}


def _worker(rank: int, batches, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A file rendezvous rather than tcp://: no port to find free beforehand, and no store server thread in rank 0
    # (one CI run lost rank 0 to "terminate called without an active exception" while the group was torn down).
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        start = sum(SHARDS[:rank])
        shard = [(x[start:start + SHARDS[rank]], t[start:start + SHARDS[rank]]) for x, t in batches]
        for sync_bn, memory in RUNS:
            with warnings.catch_warnings():
                warnings.simplefilter("error", fused_resnet.FusionWarning)
                model = DistributedDataParallel(fused_resnet.convert(network(), memory=memory))
            if sync_bn:
                # DDP refuses to wrap a CPU module holding nn.SyncBatchNorm (which runs only on GPUs); the fused
                # ops synchronize on the CPU too, so the BatchNorms become SyncBatchNorm after the wrapping (they
                # keep their parameter and buffer tensors, which DDP holds).
                fused_resnet.convert_sync_batchnorm(model.module)
                assert sum(type(m) is nn.SyncBatchNorm for m in model.modules()) == 10
                # The reference composite cannot synchronize: asking it to is an error, not a silent unsync.
                with fused_resnet.use_backend("torch"), pytest.raises(ValueError, match="does not synchronize"):
                    model.module[1](shard[0][0].new_ones(1, 8, 4, 4))
            assert fused_resnet.unfused_modules(model) == {}
            result = train(model, shard, shard_loss)
            torch.save(result, f"{out_dir}/rank{rank}-sync{sync_bn}-{memory}.pt")
        # Neither rank tears down its connections while the other may still be using them.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sync_bn_under_ddp_matches_whole_batch_batchnorm(tmp_path):
    batches = [(torch.randn(sum(SHARDS), 3, 12, 10, dtype=torch.float64), torch.randint(0, 5, (sum(SHARDS),)))
               for _ in range(STEPS)]
    mp.spawn(_worker, args=(batches, str(tmp_path)), nprocs=WORLD, join=True)
    results = {(rank, sync_bn, memory): torch.load(tmp_path / f"rank{rank}-sync{sync_bn}-{memory}.pt")
               for rank in range(WORLD) for sync_bn, memory in RUNS}

    expected = train(network(), batches, lambda out, target: F.cross_entropy(out, target))
    for memory in ("default", "min"):
        for rank in range(WORLD):
            got = results[(rank, True, memory)]
            for n, g in expected["grads"].items():
                assert_rel(got["grads"][f"module.{n}"], g, 1e-9, f"rank {rank} grad {n} ({memory})", floor=1e-6)
            for n, t in expected["state"].items():
                assert_rel(got["state"][f"module.{n}"], t, 1e-10, f"rank {rank} {n} ({memory})", floor=1e-6)
        # The whole batch's loss is the average of the ranks' scaled shard losses.
        losses = sum(results[(rank, True, memory)]["losses"] for rank in range(WORLD)) / WORLD
        assert_rel(losses, expected["losses"], 1e-10, f"losses ({memory})")

    unsynced = results[(0, False, "default")]
    running = [n for n in expected["state"] if n.endswith("running_var")]
    assert max(rel_err(unsynced["state"][f"module.{n}"], expected["state"][n]) for n in running) > 1e-3


def test_sync_bn_conversion_keeps_keys_and_is_plain_batchnorm_outside_distributed():
    """convert(sync_bn=True) gives nn.SyncBatchNorm modules with the same state_dict keys, still fused; without
    an initialized process group they compute what BatchNorm2d does, in training too."""
    reference = network()
    model = fused_resnet.convert(copy.deepcopy(reference), sync_bn=True)
    assert sum(type(m) is nn.SyncBatchNorm for m in model.modules()) == 10
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert list(model.state_dict()) == list(reference.state_dict())
    assert fused_resnet.unfused_modules(model) == {}
    x = torch.randn(4, 3, 12, 10, dtype=torch.float64)
    with fused_resnet.use_backend(CPU_BACKENDS[0]):
        fused = train(model, [(x, torch.arange(4) % 5)] * 2, F.cross_entropy)
    expected = train(reference, [(x, torch.arange(4) % 5)] * 2, F.cross_entropy)
    assert_rel(fused["losses"], expected["losses"], 1e-10, "losses")
    for n, t in expected["state"].items():
        assert_rel(fused["state"][n], t, 1e-10, n, floor=1e-6)
    with pytest.raises(ValueError, match="a process_group is only used with sync_bn=True"):
        fused_resnet.convert(network(), process_group=object())
