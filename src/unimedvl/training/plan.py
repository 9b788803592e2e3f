"""The curriculum plan: a YAML file validated into typed dataclasses.

A plan has ``defaults`` (every stage setting) and ``stages``, each overriding any default.  The
shipped plans live in ``unimedvl/training/plans/``: ``unimedvl.yaml`` (the paper's three stages,
DATA.md 3, with the documented choices where the paper is silent) and ``demo.yaml`` (the same
three stages at the ``tiny`` preset on the demo dataset, minutes on a 2-core CPU).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, InferenceTransforms
from ..precision import PRECISIONS
from ..data.schema import FAMILIES
from ..formats.yaml_config import read_yaml
from .lora import LoRAConfig

PLANS_DIR = Path(__file__).parent / "plans"
MIXTURE_KEYS = (*FAMILIES, "text")  # "text": text-only samples (a side stream in the paper)


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class AutoencoderPlan:
    """A plan's ``autoencoder:`` section: train the image autoencoder before the stages
    (:mod:`unimedvl.training.autoencoder`)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 20
    crop: int = 32  # side of the random training windows (a multiple of the downsampling factor)
    kl_weight: float = 1e-6
    max_images: int = 4096  # images kept in memory (evenly spread over the train split)
    log_every: int = 10
    initial_logvar: float = -8.0  # the posterior's starting log-variance (see _start_with_small_variance)
    resume_weights: bool = False  # keep the autoencoder's current weights (fine-tune) instead of re-initialising the variance

    def validate(self, downsample: int, where: str = "autoencoder") -> "AutoencoderPlan":
        if self.steps < 1 or self.batch_size < 1 or self.max_images < 1:
            raise ValueError(f"{where}: steps, batch_size and max_images must be positive")
        if self.crop < downsample or self.crop % downsample:
            raise ValueError(f"{where}: crop={self.crop} must be a positive multiple of the autoencoder's downsampling ({downsample})")
        if self.lr <= 0 or self.kl_weight < 0:
            raise ValueError(f"{where}: lr must be positive and kl_weight non-negative")
        return self


@dataclass(frozen=True)
class StageConfig:
    name: str
    steps: int
    mixture: dict[str, float]  # task family -> share of samples (normalised)
    source_weights: dict[str, float] = field(default_factory=dict)  # source -> relative weight within its family
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "constant"  # constant or cosine
    min_lr: float = 1e-7
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-15
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.995
    ce_weight: float = 0.25
    mse_weight: float = 1.0
    timestep_shift: float = 1.0
    dropout_text: float = 0.3
    dropout_vit: float = 0.05
    dropout_vae: float = 0.05
    tokens_per_batch: int = 10240  # packing budget of one micro-batch
    max_tokens_per_sample: int = 16384
    vit_transform: tuple[int, int, int, int] = (980, 378, 14, 2_007_040)  # max, min, stride, max_pixels
    vae_transform: tuple[int, int, int] = (1024, 512, 16)
    frozen: tuple[str, ...] = ("vae_model",)  # parameter-name prefixes that do not train
    augment: bool = False  # random crop + intensity jitter of understanding images (training.augment)
    checkpoint_every: int = 1000
    log_every: int = 10

    def lr_at(self, step: int) -> float:
        """Learning rate at ``step`` (0-based) of this stage: linear warm-up, then constant or cosine."""
        import math

        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "cosine":
            progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr




@dataclass(frozen=True)
class Plan:
    name: str
    preset: str  # model preset for training from scratch (ignored with --init-from)
    seed: int
    stages: tuple[StageConfig, ...]
    precision: str = "auto"  # auto: bf16 autocast on GPUs, fp32 on CPUs
    activation_checkpointing: bool = False  # recompute each decoder and ViT layer in backward (.parallelize)
    lora: LoRAConfig | None = None  # train LoRA adapters instead of the full model
    autoencoder: AutoencoderPlan | None = None  # train the autoencoder first (no pretrained one at this scale)
    inference: InferenceTransforms | None = None  # resize rules the exported model is used with (default: official)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_at(self, global_step: int) -> tuple[int, int]:
        """(stage index, step within the stage) of a global step."""
        for i, s in enumerate(self.stages):
            if global_step < s.steps:
                return i, global_step
            global_step -= s.steps
        return len(self.stages), 0


_STAGE_FIELDS = {f.name: f for f in dataclasses.fields(StageConfig)}


def _coerce(name: str, value, where: str, fields: dict = _STAGE_FIELDS, label: str = ""):
    """``value`` as the type of dataclass field ``name`` (``fields``: a stage's by default)."""
    f = fields[name]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind.startswith("tuple"):
            if not isinstance(value, (list, tuple)):
                raise TypeError
            if "int" in kind:
                return tuple(_coerce_int(v) for v in value)
            if "float" in kind:
                return tuple(_coerce_float(v) for v in value)
            if not all(isinstance(v, str) for v in value):
                raise TypeError
            return tuple(value)
        if kind.startswith("dict"):
            if not isinstance(value, dict):
                raise TypeError
            return {str(k): _coerce_float(v) for k, v in value.items()}
        if kind == "int":
            return _coerce_int(value)
        if kind == "float":
            return _coerce_float(value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise TypeError
            return value
        return str(value)
    except (TypeError, ValueError, OverflowError):
        what = {"int": " (an integer)", "float": " (a finite number)", "bool": " (true or false)"}.get(kind, "")
        raise PlanError(f"{where}: {label}{name} must be {kind}{what}, got {value!r}") from None


def _coerce_int(value) -> int:
    """An integer from YAML: an int, or a float with no fractional part (``2.0``); never a bool or ``2.7``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise TypeError
    return int(value)


def _coerce_float(value) -> float:
    """A finite number from YAML (YAML's ``.nan`` / ``.inf`` and strings are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError
    return float(value)


# (field, lowest allowed, whether the bound itself is excluded): checked on every stage
_STAGE_BOUNDS = (
    ("steps", 1, False), ("grad_accum", 1, False), ("tokens_per_batch", 1, False), ("max_tokens_per_sample", 1, False),
    ("lr", 0, True), ("min_lr", 0, False), ("warmup_steps", 0, False), ("weight_decay", 0, False), ("eps", 0, True),
    ("grad_clip", 0, True), ("ce_weight", 0, False), ("mse_weight", 0, False), ("timestep_shift", 0, True),
    ("checkpoint_every", 1, False), ("log_every", 1, False),
)


def min_sample_tokens(stage: "StageConfig") -> int:
    """Tokens of the smallest image-text sample the stage's transforms can produce: one image at the
    ViT's smallest size and one at the autoencoder's (each with its 2 markers) and two one-token text
    segments (each with its 2 wrappers).  A micro-batch budget below this cannot hold one sample."""
    vit_max, vit_min, vit_stride = stage.vit_transform[:3]
    vae_max, vae_min, vae_stride = stage.vae_transform
    vit = max(1, min(vit_min, vit_max) // 14) ** 2 + 2
    vae = max(1, min(vae_min, vae_max) // 16) ** 2 + 2
    return vit + vae + 2 * 3


def _stage(doc: dict, defaults: dict, where: str) -> StageConfig:
    merged = {**defaults, **doc}
    unknown = set(merged) - set(_STAGE_FIELDS)
    if unknown:
        raise PlanError(f"{where}: unknown field(s) {sorted(unknown)}")
    for required in ("name", "steps", "mixture"):
        if required not in merged:
            raise PlanError(f"{where}: missing {required}")
    values = {k: _coerce(k, v, where) for k, v in merged.items()}
    mixture = values["mixture"]
    bad = set(mixture) - set(MIXTURE_KEYS)
    if bad or not mixture or any(v < 0 for v in mixture.values()) or sum(mixture.values()) <= 0:
        raise PlanError(f"{where}: mixture needs non-negative shares of {list(MIXTURE_KEYS)} summing above 0, got {mixture}")
    total = sum(mixture.values())
    values["mixture"] = {k: v / total for k, v in mixture.items() if v > 0}
    stage = StageConfig(**values)
    for name, low, strict in _STAGE_BOUNDS:
        value = getattr(stage, name)
        if value < low or (strict and value == low):
            raise PlanError(f"{where}: {name} must be {'>' if strict else '>='} {low}, got {value!r}")
    if stage.schedule not in ("constant", "cosine"):
        raise PlanError(f"{where}: schedule must be constant or cosine, got {stage.schedule!r}")
    if not 0 <= stage.ema_decay < 1:
        raise PlanError(f"{where}: ema_decay must be in [0, 1)")
    for name in ("dropout_text", "dropout_vit", "dropout_vae"):
        if not 0 <= getattr(stage, name) <= 1:
            raise PlanError(f"{where}: {name} must be in [0, 1]")
    if len(stage.vit_transform) != 4 or len(stage.vae_transform) != 3 or len(stage.betas) != 2:
        raise PlanError(f"{where}: vit_transform needs 4 values, vae_transform 3, betas 2")
    if not all(0 <= b < 1 for b in stage.betas):
        raise PlanError(f"{where}: betas must both be in [0, 1), got {list(stage.betas)}")
    for name in ("vit_transform", "vae_transform"):
        if any(v < 1 for v in getattr(stage, name)):
            raise PlanError(f"{where}: {name} values must be positive integers, got {list(getattr(stage, name))}")
    need = min_sample_tokens(stage)
    if stage.tokens_per_batch < need:
        raise PlanError(f"{where}: tokens_per_batch={stage.tokens_per_batch} is below what one sample needs: at least {need} "
                        f"tokens (one image at the smallest vit_transform and vae_transform sizes plus their text)")
    if stage.max_tokens_per_sample < need:
        raise PlanError(f"{where}: max_tokens_per_sample={stage.max_tokens_per_sample} would skip every sample: it must be at least {need}")
    if not all(isinstance(f, str) and f for f in stage.frozen):
        raise PlanError(f"{where}: frozen must be a list of module names, got {list(stage.frozen)}")
    return stage


def parse_plan(doc: dict, where: str = "plan") -> Plan:
    if not isinstance(doc, dict):
        raise PlanError(f"{where}: expected a mapping")
    extra = set(doc) - {"name", "preset", "seed", "defaults", "stages", "precision", "activation_checkpointing", "lora", "autoencoder", "inference"}
    if extra:
        raise PlanError(f"{where}: unknown field(s) {sorted(extra)}")
    defaults = doc.get("defaults", {}) or {}
    stages = doc.get("stages")
    if not isinstance(stages, list) or not stages:
        raise PlanError(f"{where}: stages must be a non-empty list")
    parsed = tuple(_stage(s, defaults, f"{where}: stages[{i}]") for i, s in enumerate(stages))
    names = [s.name for s in parsed]
    if len(set(names)) != len(names):
        raise PlanError(f"{where}: stage names must be unique, got {names}")
    try:
        seed = _coerce_int(doc.get("seed", 0))
    except (TypeError, ValueError, OverflowError):
        raise PlanError(f"{where}: seed must be an integer, got {doc.get('seed')!r}") from None
    if seed < 0:
        raise PlanError(f"{where}: seed must be >= 0, got {seed}")
    return Plan(str(doc.get("name", "plan")), str(doc.get("preset", "tiny")), seed, parsed,
                precision=_precision(doc.get("precision", "auto"), where),
                activation_checkpointing=_checkpointing(doc.get("activation_checkpointing", False), where),
                lora=_lora(doc.get("lora"), where), autoencoder=_autoencoder(doc.get("autoencoder"), where),
                inference=_inference(doc.get("inference"), where))


def _autoencoder(doc, where: str) -> AutoencoderPlan | None:
    if doc is None:
        return None
    fields = {f.name: f for f in dataclasses.fields(AutoencoderPlan)}
    if not isinstance(doc, dict) or set(doc) - set(fields):
        raise PlanError(f"{where}: autoencoder takes {sorted(fields)}, got {doc!r}")
    plan = AutoencoderPlan(**{k: _coerce(k, v, where, fields, "autoencoder.") for k, v in doc.items()})
    try:
        plan.validate(downsample=1, where=f"{where}: autoencoder")
    except ValueError as e:
        raise PlanError(str(e)) from None
    return plan


def _inference(doc, where: str) -> InferenceTransforms | None:
    if doc is None:
        return None
    try:
        transforms = InferenceTransforms.from_json(doc, f"{where}: inference")
        transforms.validate()
    except (ConfigError, TypeError, ValueError) as e:
        raise PlanError(f"{where}: inference: {e}") from None
    return transforms


def _precision(value, where: str) -> str:
    if value not in PRECISIONS:
        raise PlanError(f"{where}: precision must be one of {list(PRECISIONS)}, got {value!r}")
    return value


def _checkpointing(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise PlanError(f"{where}: activation_checkpointing must be true or false, got {value!r}")
    return value


def _lora(doc, where: str) -> LoRAConfig | None:
    """``{rank, alpha, targets}`` -> a LoRA config; rank 0 (or no section) trains the full model."""
    if doc is None:
        return None
    if not isinstance(doc, dict) or set(doc) - {"rank", "alpha", "targets"}:
        raise PlanError(f"{where}: lora takes rank, alpha and targets, got {doc!r}")
    try:
        rank, alpha = int(doc.get("rank", 0)), float(doc.get("alpha", 32.0))
    except (TypeError, ValueError):
        raise PlanError(f"{where}: lora rank must be an integer and alpha a number, got {doc!r}") from None
    targets = doc.get("targets") or []
    if rank < 0 or not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise PlanError(f"{where}: lora rank must be >= 0 and targets a list of regexes, got {doc!r}")
    if rank == 0:
        return None
    try:
        return LoRAConfig(rank, alpha, **({"targets": tuple(targets)} if targets else {}))
    except re.error as e:
        raise PlanError(f"{where}: lora targets: not a regular expression ({e})") from None


def with_overrides(plan: Plan, *, precision: str | None = None, activation_checkpointing: bool | None = None,
                   lora_rank: int | None = None, lora_alpha: float | None = None, lora_targets: tuple[str, ...] = ()) -> Plan:
    """``plan`` with the run-level settings given on a command line (``None`` / empty: the plan's)."""
    where = "command line"
    changes: dict = {}
    if precision is not None:
        changes["precision"] = _precision(precision, where)
    if activation_checkpointing is not None:
        changes["activation_checkpointing"] = _checkpointing(activation_checkpointing, where)
    if lora_rank is not None or lora_alpha is not None or lora_targets:
        current = plan.lora
        changes["lora"] = _lora({"rank": lora_rank if lora_rank is not None else (current.rank if current else 0),
                                 "alpha": lora_alpha if lora_alpha is not None else (current.alpha if current else 32.0),
                                 "targets": list(lora_targets or (current.targets if current else ()))}, where)
    return dataclasses.replace(plan, **changes)


def load_plan(path_or_name: str | Path) -> Plan:
    """A plan file, or the name of a shipped plan (``unimedvl``, ``demo``)."""
    path = Path(path_or_name)
    if not path.is_file() and (PLANS_DIR / f"{path_or_name}.yaml").is_file():
        path = PLANS_DIR / f"{path_or_name}.yaml"
    if not path.is_file():
        raise PlanError(f"{path_or_name}: no such plan file (shipped plans: {sorted(p.stem for p in PLANS_DIR.glob('*.yaml'))})")
    return parse_plan(read_yaml(path, PlanError), str(path))
