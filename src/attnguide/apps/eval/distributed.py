"""Processes of a ``torchrun`` launch: each rank samples its share of the shards, rank 0 scores them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["Dist", "setup_distributed"]


@dataclass
class Dist:
    """Rank, world size and the barrier of a torchrun launch (world 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in a single process)."""
        if self.world > 1:
            import torch.distributed as dist

            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def close(self) -> None:
        """Destroy the process group, if this launch made one."""
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def setup_distributed(device: str) -> tuple[Dist, str]:
    """Join the process group of a torchrun launch (``WORLD_SIZE`` > 1): NCCL with one GPU per local rank
    on CUDA, gloo on the CPU. Returns the ranks and the device this process uses."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, backend), device
