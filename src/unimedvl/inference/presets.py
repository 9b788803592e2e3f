"""Sampler presets: the one table of image-sampling settings, each with where its numbers come from.

Every door - :class:`~unimedvl.inference.UniMedVLPipeline`, ``unimedvl generate/edit``, the HTTP
API, the web UI, the evaluation and the demo - names a preset and overrides single fields; a door
that names none gets the task's default from :data:`DEFAULT_PRESET`, so the same prompt and seed
give the same image whichever door it came through.

Fields use the official names (``num_timesteps`` is ``steps``: the schedule's length, ``steps - 1``
model evaluations).  Guidance is on for ``t`` in ``(lo, hi]`` of ``cfg_interval``; see
:func:`unimedvl.flow.combine_guidance` for the renorm types.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass
from typing import TypedDict

from ..flow import RENORM_TYPES, GuidanceConfig, check_shift, checked_interval
from .step_cache import StepCache, StepCacheError, step_cache

TASKS = ("text-to-image", "image-to-image")


class SettingError(ValueError):
    """A bad value of one named argument (a sampler field, ``height``, ``temperature``...).

    ``field`` is the Python name; ``reason`` the rule it broke with the value given.  The message
    is ``"{field} {reason}"``; the command line names the option instead (``--timestep-shift``)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field} {reason}")
        self.field, self.reason = field, reason

    @property
    def option(self) -> str:
        """The field as a command-line option: ``timestep_shift`` -> ``--timestep-shift``."""
        return "--" + self.field.replace("_", "-")


def _real(value) -> float | None:
    """``value`` as a float if it is a real number (not a bool), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def check_finite(field: str, value, *, minimum: float | None = None, above: float | None = None,
                 maximum: float | None = None) -> float:
    """``value`` as a finite float within the bounds (``minimum <= value``, ``above < value``,
    ``value <= maximum``), else :class:`SettingError` naming ``field``."""
    v = _real(value)
    rule = "a finite number"
    if minimum is not None:
        rule += f" >= {minimum:g}"
    if above is not None:
        rule += f" > {above:g}"
    if maximum is not None:
        rule += f" {'and ' if minimum is not None or above is not None else ''}<= {maximum:g}"
    if (v is None or not math.isfinite(v) or (minimum is not None and v < minimum) or (above is not None and v <= above)
            or (maximum is not None and v > maximum)):
        raise SettingError(field, f"must be {rule}, got {value!r}")
    return v


def check_whole(field: str, value, *, minimum: int, why: str = "") -> int:
    """``value`` as an int ``>= minimum`` (a float with a whole value is accepted), else :class:`SettingError`."""
    v = _real(value)
    if v is None or not math.isfinite(v) or not v.is_integer() or v < minimum:
        raise SettingError(field, f"must be >= {minimum}, a whole number{why}, got {value!r}")
    return int(v)


def check_fields(**fields) -> dict:
    """The image-sampler fields given (any of :class:`SamplerSettings`'), each checked and
    normalised; the first bad one raises :class:`SettingError` naming it.  ``None`` values are
    passed through (they mean "the preset's value")."""
    out = {}
    for field, value in fields.items():
        if value is None or field == "name":
            out[field] = value
        elif field == "steps":
            out[field] = check_whole(field, value, minimum=2, why=" (the schedule's length, steps - 1 model evaluations)")
        elif field in ("cfg_text_scale", "cfg_img_scale"):
            out[field] = check_finite(field, value, minimum=0)
        elif field == "cfg_renorm_min":
            out[field] = check_finite(field, value, minimum=0, maximum=1)
        elif field == "timestep_shift":
            out[field] = check_finite(field, value, above=0)
            try:
                check_shift(out[field])
            except ValueError:
                raise SettingError(field, f"must be a finite number > 0 that keeps the float32 schedule finite "
                                          f"and starting at t = 1 (about 1e-4 to 1e38), got {value!r}") from None
        elif field == "cfg_renorm_type":
            if value not in RENORM_TYPES:
                raise SettingError(field, f"must be one of {', '.join(RENORM_TYPES)}, got {value!r}")
            out[field] = value
        elif field == "cache":
            try:
                out[field] = step_cache(value)
            except StepCacheError as e:  # cache.interval -> cache_interval, the --cache-interval option
                raise SettingError(e.field.replace(".", "_"), e.reason) from None
        elif field == "cfg_interval":
            try:
                out[field] = checked_interval(value)
            except ValueError as e:
                raise SettingError(field, str(e)) from None
        else:
            raise TypeError(f"unknown sampler setting {field!r}")
    return out


@dataclass(frozen=True)
class SamplerSettings:
    """Image sampler settings, checked on construction (before any model work starts)."""

    steps: int = 50
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    cfg_renorm_type: str = "global"
    cfg_renorm_min: float = 0.0
    timestep_shift: float = 3.0
    cache: StepCache | None = None  # step caching (.step_cache); None: every step computed
    name: str = "custom"  # the preset these settings came from (recorded in generated files)

    def __post_init__(self):
        # every field checked (finite, in range) and normalised; a bad one raises SettingError naming it
        checked = check_fields(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"})
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        self.guidance  # builds (and so checks) the guidance settings

    def with_overrides(self, **overrides) -> "SamplerSettings":
        """A copy with the given fields replaced; ``None`` values keep the preset's."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown sampler settings {sorted(unknown)}")
        changes = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    @functools.cached_property
    def guidance(self) -> GuidanceConfig:
        """The guidance part, checked by :class:`~unimedvl.flow.GuidanceConfig` itself."""
        return GuidanceConfig(self.cfg_text_scale, self.cfg_img_scale, self.cfg_interval, self.cfg_renorm_type, self.cfg_renorm_min)

    def record(self, height: int, width: int) -> dict:
        """The settings as recorded in generated files (official names; ``cache`` only when on)."""
        out = dict(
            preset=self.name, num_timesteps=self.steps, cfg_text_scale=self.cfg_text_scale, cfg_img_scale=self.cfg_img_scale,
            cfg_interval=list(self.cfg_interval), cfg_renorm_type=self.cfg_renorm_type, cfg_renorm_min=self.cfg_renorm_min,
            timestep_shift=self.timestep_shift, height=height, width=width,
        )
        if self.cache is not None:
            out["cache"] = self.cache.record()
        return out


class SamplerOverrides(TypedDict, total=False):
    """Fields a caller may override on a preset (``None`` keeps the preset's value)."""

    steps: int | None
    cfg_text_scale: float | None
    cfg_img_scale: float | None
    cfg_interval: tuple[float, float] | None
    cfg_renorm_type: str | None
    cfg_renorm_min: float | None
    timestep_shift: float | None
    cache: StepCache | str | dict | None  # a step-cache name ("taylorseer", "none"), settings or a mapping


# name -> (settings, where the numbers come from).  ARCHITECTURE 9.5 and EVALUATION 5 quote the sources.
_TABLE: dict[str, tuple[dict, str]] = {
    "driver": (
        dict(steps=50, cfg_text_scale=3.0, cfg_img_scale=1.5, cfg_interval=(0.4, 1.0), cfg_renorm_type="global", timestep_shift=3.0),
        "the defaults of the reference inference driver (BAGEL's InterleaveInferencer), which UniMedVL's scripts call; "
        "UniMedVL ships no dedicated text-to-image script. For text-to-image the image-unconditional context equals the "
        "conditional one, so the image scale only rescales text guidance: effective text scale 1 + 1.5 * (3 - 1) = 4.",
    ),
    "bagel-t2i": (
        dict(steps=50, cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0), cfg_renorm_type="global", timestep_shift=3.0),
        "BAGEL's documented text-to-image setting (image guidance off, as it only rescales text guidance there).",
    ),
    "unimedvl-edit": (
        dict(steps=50, cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel", timestep_shift=3.0),
        "UniMedVL's image-editing script (interactive_image_generator): virtual staining, super-resolution, "
        "contrast translation, counterfactuals; the same numbers as BAGEL's documented editing setting.",
    ),
    "evaluation": (
        dict(steps=50, cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel", timestep_shift=3.0),
        "the generation settings of the public evaluation scripts (EVALUATION.md 5: text scale 4.0, interval [0, 1], "
        "text_channel renorm, shift 3, 50 steps); image scale 1.0 because a text-to-image prompt has no image to guide by.",
    ),
}

SAMPLER_PRESETS: dict[str, SamplerSettings] = {name: SamplerSettings(**values, name=name) for name, (values, _) in _TABLE.items()}
PRESET_SOURCES: dict[str, str] = {name: source for name, (_, source) in _TABLE.items()}

# The default of each task, the same at every door.
DEFAULT_PRESET = {"text-to-image": "driver", "image-to-image": "unimedvl-edit"}
EVALUATION_PRESET = "evaluation"  # `unimedvl eval t2i` reproduces the paper's protocol unless told otherwise


def sampler_settings(task: str, preset: str | SamplerSettings | None = None, **overrides) -> SamplerSettings:
    """The settings for ``task`` (``text-to-image`` or ``image-to-image``): ``preset`` (a name of
    :data:`SAMPLER_PRESETS`, settings, or ``None`` for the task's default) with ``overrides``
    (``None`` values ignored) applied."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if preset is None:
        preset = DEFAULT_PRESET[task]
    if isinstance(preset, str):
        if preset not in SAMPLER_PRESETS:
            raise ValueError(f"unknown sampler preset {preset!r}; known: {', '.join(SAMPLER_PRESETS)}")
        preset = SAMPLER_PRESETS[preset]
    return preset.with_overrides(**overrides)
