"""Where the run happens: the device, and under torchrun the process group (env:// initialization; nccl on CUDA,
gloo on the CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process reports: the progress bar, the logs and the checkpoints are rank 0's."""
        return self.rank == 0

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the processes (in place)."""
        if self.distributed:
            dist.all_reduce(values)
        return values


def start(device: str | None) -> Runtime:
    """The runtime of this process: one process, or one of torchrun's (WORLD_SIZE > 1), each on its own GPU
    (LOCAL_RANK) when the device is CUDA."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Runtime(torch.device(device if device is not None else kind))
    if kind == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device(kind)
    dist.init_process_group("nccl" if kind == "cuda" else "gloo", init_method="env://")
    return Runtime(target, dist.get_rank(), dist.get_world_size())


def stop(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
