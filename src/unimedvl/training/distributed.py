"""Distributed training from outside the model: process group, FSDP2 sharding, full-state gathers.

``torchrun --nproc-per-node N -m unimedvl.train ...`` (or ``unimedvl train`` under torchrun) sets
``WORLD_SIZE``/``RANK``; :func:`init_from_env` then joins the process group (NCCL on GPUs, gloo on
CPUs) and :func:`shard_model` applies ``fully_shard`` to every decoder and ViT layer and to the
root, so each rank holds a shard of every trained weight (the frozen autoencoder, used outside the
forward to encode training images, stays whole on every rank).  Checkpoints are written with
``torch.distributed.checkpoint``: each rank saves its own shards, nothing is gathered.
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


def shard_model(model, bf16: bool = False) -> None:
    """``fully_shard`` every decoder and ViT layer, then the root.  ``bf16``: gather parameters in
    bf16 for compute and reduce gradients in fp32 (the sharded master weights stay fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in model.language_model.model.layers:
        fully_shard(layer, mp_policy=policy)
    for layer in model.vit_model.vision_model.encoder.layers:
        fully_shard(layer, mp_policy=policy)
    # the frozen autoencoder encodes training images outside the model's forward: each rank keeps it whole
    ignored = set(model.vae_model.parameters()) if getattr(model.config, "visual_gen", False) else set()
    fully_shard(model, ignored_params=ignored, mp_policy=policy)


def like(template: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``template`` (sharded the same way when it is a DTensor)."""
    if hasattr(template, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(template.dtype), template.device_mesh, template.placements)
    return full.to(template.dtype)
