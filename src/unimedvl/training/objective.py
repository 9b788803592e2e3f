"""The training objective, outside the network (ARCHITECTURE 8.1-8.2).

* rectified flow: the noisy latents and their velocity targets are drawn when the batch is packed
  (:mod:`.sequence`, with :func:`unimedvl.flow.sample_flow_times`, :func:`~unimedvl.flow.noise_latents`
  and :func:`~unimedvl.flow.velocity_target`: ``t`` logit-normal and shifted, ``x_t = (1 - t) x0 + t eps``,
  target ``eps - x0``);
* MSE on noisy latent tokens: squared error averaged over channels per token, then over tokens;
* cross-entropy on text tokens that carry loss, summed and divided by their count;
* ``total = ce_weight * CE + mse_weight * MSE``.

:func:`training_losses` runs the model's cache-free forward on a packed :class:`~.sequence.TrainingBatch`
and applies :func:`compute_losses`; the trainer and the benchmarks call it.  Distributed runs pass
the global token counts so that every rank divides by the same number (the reference's
normalisation); single-process runs need not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .sequence import TrainingBatch


@dataclass
class Losses:
    total: torch.Tensor
    ce: torch.Tensor | None  # mean over CE tokens (None when the batch has none)
    mse: torch.Tensor | None  # mean over noisy latent tokens
    ce_tokens: int
    mse_tokens: int
    per_family: dict = field(default_factory=dict)  # family -> {"ce": mean, "mse": mean}, for logging

    def as_floats(self) -> dict:
        return {
            "loss": float(self.total.detach()),
            "ce": None if self.ce is None else float(self.ce.detach()),
            "mse": None if self.mse is None else float(self.mse.detach()),
            "ce_tokens": self.ce_tokens,
            "mse_tokens": self.mse_tokens,
            "per_family": self.per_family,
        }


def compute_losses(
    logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    velocities: torch.Tensor | None,
    targets: torch.Tensor | None,
    *,
    ce_weight: float = 0.25,
    mse_weight: float = 1.0,
    ce_normalizer: int | None = None,
    mse_normalizer: int | None = None,
) -> Losses:
    """Weighted CE + MSE.  ``logits [n_ce, V]`` with ``labels [n_ce]``; ``velocities`` and
    ``targets [n_noisy, C]``.  The normalisers default to this batch's token counts.  UniMedVL
    weights CE : MSE as 0.25 : 1 (DATA.md 3); BAGEL uses 1 : 1."""
    ce = mse = None
    n_ce = 0 if labels is None else int(labels.numel())
    n_mse = 0 if targets is None else int(targets.shape[0])
    parts = []
    if n_ce:
        ce_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        ce = ce_sum / (ce_normalizer or n_ce)
        parts.append(ce_weight * ce)
    if n_mse:
        per_token = (velocities.float() - targets.float()).pow(2).mean(dim=-1)
        mse = per_token.sum() / (mse_normalizer or n_mse)
        parts.append(mse_weight * mse)
    if not parts:
        raise ValueError("the batch has neither text tokens with loss nor noisy latent tokens")
    total = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    return Losses(total, ce, mse, n_ce, n_mse)


def training_losses(model, tb: TrainingBatch, *, ce_weight: float = 0.25, mse_weight: float = 1.0, backend: str = "sdpa") -> Losses:
    """One cache-free forward of a packed training batch and its weighted losses; ``per_family``
    holds each task family's mean CE and MSE (no extra compute, for logging)."""
    out = model(tb.batch, attention_backend=backend)
    # out.velocities [N_lat, p*p*C] for every latent token, clean ones included; the loss takes the noisy rows
    velocities = out.velocities[tb.noisy_rows] if out.velocities is not None and tb.noisy_rows.numel() else None
    losses = compute_losses(out.logits, tb.labels if tb.labels.numel() else None, velocities,
                            tb.targets if tb.targets.numel() else None, ce_weight=ce_weight, mse_weight=mse_weight)
    with torch.no_grad():
        families = tb.family_of_sample
        if losses.ce_tokens and tb.label_sample is not None:
            per_token = F.cross_entropy(out.logits.float(), tb.labels, reduction="none").cpu()  # [n_ce]
            for f in set(families):
                mask = torch.tensor([families[i] == f for i in tb.label_sample.tolist()], dtype=torch.bool)
                if mask.any():
                    losses.per_family.setdefault(f, {})["ce"] = float(per_token[mask].mean())
        if losses.mse_tokens and tb.noisy_sample is not None:
            per_token = (velocities.float() - tb.targets.float()).pow(2).mean(-1).cpu()  # [n_noisy]
            for f in set(families):
                mask = torch.tensor([families[i] == f for i in tb.noisy_sample.tolist()], dtype=torch.bool)
                if mask.any():
                    losses.per_family.setdefault(f, {})["mse"] = float(per_token[mask].mean())
    return losses
