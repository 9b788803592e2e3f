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
    """One cache-free forward of a packed training batch and its weighted losses; ``per_family``
    holds each task family's mean CE and MSE (no extra compute, for logging)."""
    import torch
    import torch.nn.functional as F

    out = model(tb.batch, attention_backend=backend)
    velocities = out.velocities[tb.noisy_rows] if out.velocities is not None and tb.noisy_rows.numel() else None
    losses = compute_losses(out.logits, tb.labels if tb.labels.numel() else None, velocities,
                            tb.targets if tb.targets.numel() else None, ce_weight=ce_weight, mse_weight=mse_weight)
    with torch.no_grad():
        families = tb.family_of_sample
        if losses.ce_tokens and tb.label_sample is not None:
            per_token = F.cross_entropy(out.logits.float(), tb.labels, reduction="none").cpu()
            for f in set(families):
                mask = torch.tensor([families[i] == f for i in tb.label_sample.tolist()], dtype=torch.bool)
                if mask.any():
                    losses.per_family.setdefault(f, {})["ce"] = float(per_token[mask].mean())
        if losses.mse_tokens and tb.noisy_sample is not None:
            per_token = (velocities.float() - tb.targets.float()).pow(2).mean(-1).cpu()
            for f in set(families):
                mask = torch.tensor([families[i] == f for i in tb.noisy_sample.tolist()], dtype=torch.bool)
                if mask.any():
                    losses.per_family.setdefault(f, {})["mse"] = float(per_token[mask].mean())
    return losses


__all__.append("training_losses")
