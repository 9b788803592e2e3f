"""Rectified-flow maths outside the network: noising and targets for training, schedules,
classifier-free guidance and the Euler step for sampling.

Convention (ARCHITECTURE 8.1, 9.4): ``x_t = (1 - t) x_0 + t eps``; ``t = 1`` is pure noise, ``t = 0``
data; the network predicts the velocity ``v = eps - x_0`` and sampling integrates from 1 to 0.
Training draws ``t`` logit-normal and shifted (:func:`sample_flow_times`), noises the clean latents
(:func:`noise_latents`) and regresses :func:`velocity_target`; the losses themselves live in
:mod:`unimedvl.training.objective`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

RENORM_TYPES = ("global", "channel", "text_channel")


def check_shift(shift: float) -> None:
    """A time shift must be finite and > 0 (``0`` or less makes the schedule divide by zero or change
    sign: NaN latents; ``inf``/``NaN`` make it NaN), and keep the float32 schedule finite and starting
    at pure noise (below about 1e-4 the denominator at ``t = 1`` loses its digits and, near 1e-7,
    rounds to 0; above about 3e38 ``s`` itself overflows)."""
    ok = isinstance(shift, numbers.Real) and not isinstance(shift, bool) and math.isfinite(shift) and shift > 0
    if ok:
        probe = time_shift(torch.tensor([1.0, 0.5, 1e-3, 0.0]), shift)  # float32, as sampling computes it
        ok = bool(torch.isfinite(probe).all()) and abs(float(probe[0]) - 1.0) <= 1e-3 and float(probe.min()) >= 0.0
    if not ok:
        raise ValueError(f"timestep_shift must be a finite number > 0 that keeps the float32 schedule finite and "
                         f"starting at t = 1 (about 1e-4 to 1e38), got {shift!r}")


def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``s t / (1 + (s - 1) t)``: spends more steps near pure noise for ``s > 1``."""
    return shift * t / (1 + (shift - 1) * t)


def sample_flow_times(n: int, generator: torch.Generator | None = None, shift: float = 1.0) -> torch.Tensor:
    """``n`` logit-normal flow times in (0, 1), shifted (training default shift 1.0): ``tau ~ N(0, 1)``,
    ``t = time_shift(sigmoid(tau), shift)``.  Returns ``[n]`` float32."""
    tau = torch.randn(n, generator=generator)
    return time_shift(torch.sigmoid(tau), shift)


def noise_latents(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t eps``.  ``x0``, ``eps [n, ...]`` (one image's latent tokens ``[n, C]``);
    a 0-d ``t`` applies to every row, a ``t [n]`` one time per row (broadcast over the trailing dims)."""
    t = t.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1))) if t.dim() else t.to(x0.dtype)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The velocity the network regresses, ``eps - x0`` (``d x_t / d t``), same shape as ``x0``."""
    return eps - x0


def sampling_timesteps(num_timesteps: int, shift: float) -> torch.Tensor:
    """``num_timesteps`` float32 times from 1 to 0, shifted; ``num_timesteps - 1`` model evaluations."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    check_shift(shift)
    ts = time_shift(torch.linspace(1, 0, num_timesteps), shift)
    if not bool(torch.isfinite(ts).all()):
        raise ValueError(f"timestep_shift {shift!r} gives a non-finite schedule of {num_timesteps} steps")
    return ts


def checked_interval(interval) -> tuple[float, float]:
    """A guidance interval as floats ``(lo, hi)`` with ``0 <= lo < hi <= 1``, else ``ValueError``
    (the message is the rule and the value, without the field's name).  ``lo == hi`` would leave
    guidance off at every step without a word."""
    try:
        lo, hi = interval
    except (TypeError, ValueError):
        lo = hi = None
    real = all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (lo, hi))
    if not (real and math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo < hi <= 1.0):
        shown = tuple(interval) if isinstance(interval, (list, tuple)) else interval
        raise ValueError(f"must be (lo, hi) with 0 <= lo < hi <= 1 (guidance is on for t in (lo, hi]), got {shown!r}")
    return float(lo), float(hi)


@dataclass(frozen=True)
class GuidanceConfig:
    """Classifier-free guidance settings (names as in the official scripts)."""

    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_type: str = "global"
    cfg_renorm_min: float = 0.0

    def __post_init__(self):
        # NaN compares false both ways, so every check is written as "is in range" and negated
        try:
            checked_interval(self.cfg_interval)
        except ValueError as e:
            raise ValueError(f"cfg_interval {e}") from None
        for name in ("cfg_text_scale", "cfg_img_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (math.isfinite(self.cfg_renorm_min) and 0.0 <= self.cfg_renorm_min <= 1.0):
            raise ValueError(f"cfg_renorm_min must be a finite number in [0, 1], got {self.cfg_renorm_min!r}")
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {self.cfg_renorm_type!r}")

    def scales_at(self, t: float) -> tuple[float, float]:
        """(text, image) scales at time ``t``: the configured ones inside ``(lo, hi]``, else 1."""
        lo, hi = self.cfg_interval
        if lo < t <= hi:
            return self.cfg_text_scale, self.cfg_img_scale
        return 1.0, 1.0


def _norm(v: torch.Tensor, per_token: bool) -> torch.Tensor:
    return torch.linalg.vector_norm(v, dim=-1, keepdim=True) if per_token else torch.linalg.vector_norm(v)


def combine_guidance(
    v_cond: torch.Tensor,
    v_text_uncond: torch.Tensor | None,
    v_img_uncond: torch.Tensor | None,
    text_scale: float,
    img_scale: float,
    renorm_type: str = "global",
    renorm_min: float = 0.0,
) -> torch.Tensor:
    """Guided velocity from the conditional / text-dropped / image-dropped branches (ARCHITECTURE 9.4.5).

    ``v_* [n, C]``.  As in the reference, nothing is guided when ``text_scale <= 1`` (even if
    ``img_scale > 1``).  ``global`` renormalises over all elements, ``channel`` and ``text_channel`` per token.
    """
    if text_scale <= 1.0:
        return v_cond
    if v_text_uncond is None:
        raise ValueError("text guidance needs the text-unconditional velocity")
    guided = v_text_uncond + text_scale * (v_cond - v_text_uncond)
    if renorm_type == "text_channel":
        ratio = (_norm(v_cond, True) / (_norm(guided, True) + 1e-8)).clamp(renorm_min, 1.0)
        guided = guided * ratio
        if img_scale > 1.0:
            guided = v_img_uncond + img_scale * (guided - v_img_uncond)
        return guided
    if img_scale > 1.0:
        if v_img_uncond is None:
            raise ValueError("image guidance needs the image-unconditional velocity")
        guided = v_img_uncond + img_scale * (guided - v_img_uncond)
    per_token = renorm_type == "channel"
    ratio = (_norm(v_cond, per_token) / (_norm(guided, per_token) + 1e-8)).clamp(renorm_min, 1.0)
    return guided * ratio


def euler_step(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """One step toward data: ``x - v (t - t_next)``, in the dtype of ``x`` (float32)."""
    return x - v.to(x.dtype) * (t - t_next)
