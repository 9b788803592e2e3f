"""The process group of a distributed run and what the loop asks of it (rank, world, barriers, means).

``torchrun --nproc-per-node N -m unimedvl.train ...`` (or ``unimedvl train`` under torchrun) sets
``WORLD_SIZE``/``RANK``; :func:`init_from_env` then joins the process group (NCCL on GPUs, gloo on
CPUs) and returns the :class:`DistContext` the trainer carries.  Sharding the model (FSDP2) and
activation checkpointing are applied from outside the model by :mod:`.parallelize`; sharded
checkpoints are written by :mod:`.checkpointing`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a scalar over ranks (for logging)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world


def init_from_env() -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size())
