"""The training objective, outside the network (ARCHITECTURE 8.1-8.2).

* rectified flow: per noisy image ``tau ~ N(0, 1)``, ``t = sigmoid(tau)`` then shifted
  ``s t / (1 + (s - 1) t)``; ``x_t = (1 - t) x0 + t eps``; the target velocity is ``eps - x0``;
* MSE on noisy latent tokens: squared error averaged over channels per token, then over tokens;
* cross-entropy on text tokens that carry loss, summed and divided by their count;
* ``total = ce_weight * CE + mse_weight * MSE``.

Distributed runs pass the global token counts so that every rank divides by the same number
(the reference's normalisation); single-process runs need not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..flow import time_shift


def sample_flow_times(n: int, generator: torch.Generator | None = None, shift: float = 1.0) -> torch.Tensor:
    """``n`` logit-normal flow times in (0, 1), shifted (training default shift 1.0)."""
    tau = torch.randn(n, generator=generator)
    return time_shift(torch.sigmoid(tau), shift)


def noise_latents(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t eps``; ``t`` broadcasts over the token dimension (one per image)."""
    t = t.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1))) if t.dim() else t.to(x0.dtype)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0


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
