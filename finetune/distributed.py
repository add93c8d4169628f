"""Distributed helpers: torch's environment protocol (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT set by
torchrun). Not configuration: torchrun sets these for the processes it starts."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    """This process's place in a torchrun job (world 1, rank 0 when not distributed)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False  # the process group was initialised by setup_distributed, which tears it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def setup_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU).

    Returns (DistInfo, device): under torchrun on CUDA the device becomes cuda:LOCAL_RANK. Idempotent: a group
    that already exists is used as is.
    """
    import torch.distributed as dist

    device = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        owns = False
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's protocol, not our configuration
        if world <= 1:
            return DistInfo(), device
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        world, rank, owns = dist.get_world_size(), dist.get_rank(), True
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return DistInfo(world, rank, local_rank, owns), device


def teardown_distributed(info: DistInfo) -> None:
    """Destroy the process group if `setup_distributed` created it."""
    if info.owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
