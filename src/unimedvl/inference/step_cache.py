"""Step caching for image sampling: skip full forwards and forecast the velocities instead.

Method (``taylorseer``, after TaylorSeer, Liu et al. 2025, the caching the official BAGEL adopted):
along one sampling trajectory the network's velocity changes smoothly with the flow time ``t``, so
after a few *full* steps the velocity of the next steps can be extrapolated from the last
``order + 1`` computed ones (a Newton polynomial in ``t`` through them: order 0 reuses the last
velocity, order 1 extends the line through the last two, ...).  Divided differences in ``t`` rather
than in the step index, because the shifted schedule spaces its steps unevenly.

Choices, and why:

* **What is forecast: each guidance branch's velocity, before guidance combines them.**  Every
  branch (conditional, text-unconditional, image-unconditional) keeps its own history and is
  forecast on its own, so the combination - scales, interval, renorm - acts on forecasts exactly as
  it acts on computed velocities.  Caching the combined velocity, or one branch only, would lose
  guidance (washed-out images).
* **The whole forward is skipped, not single layers.**  Forecasting every layer's output
  (TaylorSeer on DiT features) amounts to forecasting the sum, and would hold
  ``layers x tokens x hidden x (order + 1)`` values per branch - gigabytes at 1024^2 on the 14B model;
  a velocity is ``tokens x p*p*C`` (64 channels).
* **A fixed schedule**: the first ``warmup`` and the last ``final`` steps are computed, in between one
  step in ``interval``; a branch with too short a history (guidance just switched on) forces a full
  step.  The cost is known before sampling starts and images batched together (the server's
  text-to-image batches) take their full steps together.  Adaptive methods (TeaCache) decide per
  image from a calibrated estimate of change, which needs a calibration per model and breaks
  batching.

``interval == 1`` computes every step: the loop is then exactly the uncached one.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

import torch

METHODS = ("taylorseer",)
OFF = ("none", "off")  # names that mean "no caching"
DEFAULT_CACHE = "taylorseer"  # what a mapping of settings without a preset starts from


class StepCacheError(ValueError):
    """A bad step-cache setting; ``field`` names it (``cache``, ``cache.interval``...)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field} {reason}")
        self.field, self.reason = field, reason


def _whole(field: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value or float(value) != int(value) or value < minimum:
        raise StepCacheError(f"cache.{field}", f"must be a whole number >= {minimum}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class StepCache:
    """How sampling skips full forwards (see the module's text).  Checked on construction."""

    method: str = "taylorseer"
    interval: int = 3  # one full forward every `interval` steps between warm-up and the final steps
    order: int = 1  # Taylor order: the forecast goes through the last order + 1 computed velocities
    warmup: int = 2  # first steps always computed (at least order + 1: the first forecast needs them)
    final: int = 1  # last steps always computed (the image's fine detail is settled there)
    name: str = "custom"  # the preset these settings came from (recorded in generated files)

    def __post_init__(self):
        if self.method not in METHODS:
            raise StepCacheError("cache.method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        object.__setattr__(self, "interval", _whole("interval", self.interval, 1))
        object.__setattr__(self, "order", _whole("order", self.order, 0))
        object.__setattr__(self, "warmup", _whole("warmup", self.warmup, 0))
        object.__setattr__(self, "final", _whole("final", self.final, 0))
        if self.order > 3:
            raise StepCacheError("cache.order", f"must be at most 3 (higher orders extrapolate noise), got {self.order}")
        if self.warmup < self.order + 1:
            raise StepCacheError("cache.warmup", f"must be at least order + 1 = {self.order + 1} (the first forecast needs "
                                                 f"{self.order + 1} computed steps), got {self.warmup}")

    def is_full(self, step: int, total: int) -> bool:
        """Whether model evaluation ``step`` (0-based, of ``total``) is computed by the schedule."""
        if step < self.warmup or step >= total - self.final:
            return True
        return (step - self.warmup) % self.interval == 0

    def full_steps(self, total: int) -> int:
        """Full forwards the schedule computes over ``total`` evaluations (a branch switching on
        mid-run adds more)."""
        return sum(self.is_full(k, total) for k in range(total))

    def with_overrides(self, **overrides) -> "StepCache":
        changes = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown step-cache settings {sorted(unknown)}")
        return dataclasses.replace(self, **{"name": "custom", **changes}) if changes else self

    def record(self) -> dict:
        """As recorded in generated files."""
        return dataclasses.asdict(self)


# name -> (settings, why).  `taylorseer` is the default of `--cache taylorseer`; see
# benchmarks/step_cache.py for the speed/quality curve these were chosen from.
_TABLE: dict[str, tuple[dict, str]] = {
    "taylorseer": (dict(interval=3, order=1, warmup=2, final=1),
                   "first-order forecast, one full forward in three: 19 of 49 forwards at 50 steps"),
    "taylorseer-fast": (dict(interval=5, order=1, warmup=2, final=1),
                        "first-order forecast, one full forward in five: 13 of 49 forwards at 50 steps"),
    "taylorseer-safe": (dict(interval=2, order=1, warmup=3, final=2),
                        "first-order forecast, every other forward: 27 of 49 forwards at 50 steps"),
}
STEP_CACHE_PRESETS: dict[str, StepCache] = {name: StepCache(**values, name=name) for name, (values, _) in _TABLE.items()}
STEP_CACHE_SOURCES: dict[str, str] = {name: why for name, (_, why) in _TABLE.items()}


def step_cache(value) -> StepCache | None:
    """A step-cache setting from what a caller gave: ``None`` or ``"none"``/``"off"`` (no caching),
    a preset name, a :class:`StepCache`, or a mapping ``{"method"|"preset": ..., "interval": ...}``
    (a preset with fields overridden)."""
    if value is None or isinstance(value, StepCache):
        return value
    if isinstance(value, str):
        if value in OFF:
            return None
        if value not in STEP_CACHE_PRESETS:
            raise StepCacheError("cache", f"must be one of {', '.join(OFF + tuple(STEP_CACHE_PRESETS))}, got {value!r}")
        return STEP_CACHE_PRESETS[value]
    if isinstance(value, dict):
        fields = dict(value)
        base = fields.pop("preset", None) or fields.pop("method", None) or DEFAULT_CACHE
        start = step_cache(base)
        if start is None:
            if fields:
                raise StepCacheError("cache", f"{base!r} takes no settings, got {sorted(fields)}")
            return None
        try:
            return start.with_overrides(**fields)
        except TypeError:
            known = [f.name for f in dataclasses.fields(StepCache) if f.name != "name"]
            raise StepCacheError("cache", f"has unknown settings {sorted(set(fields) - set(known))}; known: {', '.join(known)}") from None
    raise StepCacheError("cache", f"must be a cache name, a mapping of settings or None, got {type(value).__name__}")


class VelocityForecaster:
    """The velocity histories of one sampling run: one per (image, branch) slot.

    ``history: slot -> [(t, v [h*w, p*p*C] float32), ...]`` newest last, at most ``order + 1``
    entries; the Newton coefficients through them are computed when a velocity is recorded (once per
    full step), so a forecast step only evaluates the polynomial.
    """

    def __init__(self, cache: StepCache):
        self.cache = cache
        self.history: dict[tuple, list[tuple[float, torch.Tensor]]] = {}
        self._coefs: dict[tuple, list[torch.Tensor]] = {}  # slot -> f[t_0], f[t_0, t_1], ... (divided differences)

    def can_forecast(self, slots) -> bool:
        return all(len(self.history.get(s, ())) >= self.cache.order + 1 for s in slots)

    def record(self, slot, t: float, v: torch.Tensor) -> None:
        points = self.history.setdefault(slot, [])
        points.append((float(t), v))
        del points[: -(self.cache.order + 1)]
        ts = [p[0] for p in points]
        table, coefs = [p[1] for p in points], [points[0][1]]
        for level in range(1, len(points)):
            table = [(table[i + 1] - table[i]) / (ts[i + level] - ts[i]) for i in range(len(table) - 1)]
            coefs.append(table[0])
        self._coefs[slot] = coefs

    def keep_only(self, image: int, slots) -> None:
        """Drop image ``image``'s histories of branches not running now: a branch that stops and
        starts again (a guidance interval) restarts from computed steps, not stale ones."""
        keep = set(slots)
        for slot in [s for s in self.history if s[0] == image and s not in keep]:
            del self.history[slot], self._coefs[slot]

    def forecast(self, slot, t: float) -> torch.Tensor:
        """The Newton polynomial through the slot's history, evaluated at ``t`` (Horner form)."""
        ts, coefs = [p[0] for p in self.history[slot]], self._coefs[slot]
        out = coefs[-1]
        for j in range(len(coefs) - 2, -1, -1):
            out = coefs[j] + (t - ts[j]) * out
        return out
