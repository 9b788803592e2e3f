"""The Knowledge layer: training objective, sequence packing and the curriculum trainer."""

from .objective import Losses, compute_losses, noise_latents, sample_flow_times, velocity_target
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
    "velocity_target",
]


def training_losses(model, tb: TrainingBatch, *, ce_weight: float = 0.25, mse_weight: float = 1.0, backend: str = "sdpa") -> Losses:
    """One cache-free forward of a packed training batch and its weighted losses."""
    out = model(tb.batch, attention_backend=backend)
    velocities = out.velocities[tb.noisy_rows] if out.velocities is not None and tb.noisy_rows.numel() else None
    return compute_losses(out.logits, tb.labels if tb.labels.numel() else None, velocities,
                          tb.targets if tb.targets.numel() else None, ce_weight=ce_weight, mse_weight=mse_weight)


__all__.append("training_losses")
