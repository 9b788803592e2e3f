"""The Knowledge layer: training objective, sequence packing and the curriculum trainer.

The loop is :mod:`.trainer`; its checkpoints :mod:`.checkpointing`; activation checkpointing and
FSDP2 :mod:`.parallelize` (the process group :mod:`.distributed`); the losses :mod:`.objective`.
The flow-matching noising helpers live in :mod:`unimedvl.flow` and are re-exported here.
"""

from ..flow import noise_latents, sample_flow_times, velocity_target
from .objective import Losses, compute_losses, training_losses
from .sequence import DropoutConfig, PlanItem, TrainingBatch, build_batch, plan_record

__all__ = [
    "DropoutConfig",
    "Losses",
    "PlanItem",
    "TrainingBatch",
    "build_batch",
    "compute_losses",
    "noise_latents",
    "plan_record",
    "sample_flow_times",
    "training_losses",
    "velocity_target",
]
