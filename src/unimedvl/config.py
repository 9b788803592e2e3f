"""Typed configuration of the UniMedVL model and the table of named presets.

A UniMedVL model has four parts, each with its own dataclass:

* :class:`LLMConfig` - the Qwen2 decoder with Mixture-of-Transformers experts
  (``llm_config.json`` in the official layout);
* :class:`ViTConfig` - the SigLIP NaViT encoder (``vit_config.json``; the official file
  lists one layer more than is instantiated, see :meth:`ViTConfig.from_official_json`);
* :class:`AutoencoderConfig` - the FLUX-style autoencoder (hard-coded in the official loader;
  we also read an optional ``ae_config.json``);
* :class:`UniMedVLConfig` - the three above plus the BAGEL-level constants (position-table
  grids, latent patch size, ...).

Presets are entries of :data:`PRESETS`; ``UniMedVLConfig.from_preset("tiny", llm={"num_layers": 1})``
gives a variant.  Values of ``unimedvl-14b`` are those of ARCHITECTURE.md section 2.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message names the field."""


def json_int(d: dict[str, Any], key: str, source: str, default: Any = None, minimum: int | None = 1) -> int:
    """``d[key]`` as an integer (``default`` when absent): a JSON number with no fractional part,
    at least ``minimum``; anything else raises :class:`ConfigError` naming ``source`` and the field."""
    value = d.get(key, default)
    ok = not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and value.is_integer()))
    if not ok:
        raise ConfigError(f"{source}: field {key!r} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{source}: field {key!r} must be >= {minimum}, got {value!r}")
    return int(value)


def json_float(d: dict[str, Any], key: str, source: str, default: Any = None, positive: bool = False) -> float:
    """``d[key]`` as a finite number (``default`` when absent); :class:`ConfigError` naming the field otherwise."""
    import math

    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{source}: field {key!r} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{source}: field {key!r} must be > 0, got {value!r}")
    return float(value)


@dataclass
class LLMConfig:
    """Qwen2 decoder; every layer has an understanding and a generation expert."""

    hidden_size: int = 3584
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    intermediate_size: int = 18944
    vocab_size: int = 152064
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"llm.hidden_size={self.hidden_size} is not divisible by llm.num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"llm.num_heads={self.num_heads} is not divisible by llm.num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"llm head_dim={self.head_dim} must be even for rotary embeddings")

    @classmethod
    def from_official_json(cls, d: dict[str, Any], source: str = "llm_config.json") -> "LLMConfig":
        """Read the Qwen2 fields of ``llm_config.json``.

        The official loaders force ``qk_norm=True``, ``tie_word_embeddings=False`` and the MoT layer type,
        whatever the file says; our model always has these, so those fields are not read.
        """
        required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {missing}")
        return cls(
            hidden_size=json_int(d, "hidden_size", source),
            num_layers=json_int(d, "num_hidden_layers", source),
            num_heads=json_int(d, "num_attention_heads", source),
            num_kv_heads=json_int(d, "num_key_value_heads", source, d["num_attention_heads"]),
            intermediate_size=json_int(d, "intermediate_size", source),
            vocab_size=json_int(d, "vocab_size", source),
            rms_norm_eps=json_float(d, "rms_norm_eps", source, 1e-6, positive=True),
            rope_theta=json_float(d, "rope_theta", source, 10000.0, positive=True),
            max_position_embeddings=json_int(d, "max_position_embeddings", source, 32768),
        )

    def to_official_json(self, eos_token_id: int | None = None, bos_token_id: int | None = None) -> dict[str, Any]:
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_layers,
            "model_type": "qwen2",
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": None,
            "rope_theta": self.rope_theta,
            "sliding_window": self.max_position_embeddings,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": self.vocab_size,
            "qk_norm": True,
            "layer_module": "Qwen2MoTDecoderLayer",
        }


@dataclass
class ViTConfig:
    """SigLIP NaViT encoder (no pooling head, learned absolute position table)."""

    hidden_size: int = 1152
    num_layers: int = 26  # instantiated layers (the official json says 27, see from_official_json)
    num_heads: int = 16
    intermediate_size: int = 4304
    patch_size: int = 14
    image_size: int = 980  # image_size / patch_size = rows and columns of the position table
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vit.hidden_size={self.hidden_size} is not divisible by vit.num_heads={self.num_heads}")
        if self.num_layers < 1:
            raise ConfigError(f"vit.num_layers={self.num_layers} must be >= 1")

    @classmethod
    def from_official_json(cls, d: dict[str, Any], source: str = "vit_config.json") -> "ViTConfig":
        """Read ``vit_config.json``.

        The official loaders use the penultimate layer's features: they build
        ``num_hidden_layers - 1`` layers and the checkpoint holds exactly those.
        """
        required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size"]
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {missing}")
        if json_int(d, "num_hidden_layers", source) < 2:
            raise ConfigError(f"{source}: num_hidden_layers={d['num_hidden_layers']} must be >= 2 (one is dropped)")
        return cls(
            hidden_size=json_int(d, "hidden_size", source),
            num_layers=json_int(d, "num_hidden_layers", source) - 1,
            num_heads=json_int(d, "num_attention_heads", source),
            intermediate_size=json_int(d, "intermediate_size", source),
            patch_size=json_int(d, "patch_size", source),
            image_size=json_int(d, "image_size", source, 980),
            layer_norm_eps=json_float(d, "layer_norm_eps", source, 1e-6, positive=True),
        )

    def to_official_json(self) -> dict[str, Any]:
        return {
            "architectures": ["SiglipVisionModel"],
            "attention_dropout": 0.0,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": self.hidden_size,
            "image_size": self.image_size,
            "intermediate_size": self.intermediate_size,
            "layer_norm_eps": self.layer_norm_eps,
            "model_type": "siglip_vision_model",
            "num_attention_heads": self.num_heads,
            "num_channels": 3,
            "num_hidden_layers": self.num_layers + 1,
            "patch_size": self.patch_size,
        }


@dataclass
class AutoencoderConfig:
    """FLUX.1 autoencoder; the official loader hard-codes these values (no config file)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    resolution: int = 256  # recorded for compatibility, unused at run time

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self) -> None:
        for m in self.ch_mult:
            if (self.ch * m) % 32:
                raise ConfigError(f"ae.ch*ch_mult={self.ch * m} must be a multiple of 32 (GroupNorm with 32 groups)")

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = "ae_config.json") -> "AutoencoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - known - {"out_ch", "downsample"}
        if extra:
            raise ConfigError(f"{source}: unknown field(s) {sorted(extra)}")
        d = dict(d)
        if "out_ch" in d:
            d["out_channels"] = d.pop("out_ch")
        kw: dict[str, Any] = {}
        for k in known & set(d):
            if k in ("scale_factor", "shift_factor"):
                kw[k] = json_float(d, k, source)
            elif k == "ch_mult":
                mult = d[k]
                if not isinstance(mult, list) or not mult:
                    raise ConfigError(f"{source}: field 'ch_mult' must be a non-empty list of positive integers, got {mult!r}")
                kw[k] = tuple(json_int({"ch_mult": x}, "ch_mult", source) for x in mult)
            else:
                kw[k] = json_int(d, k, source)
        cfg = cls(**kw)
        if "downsample" in d and json_int(d, "downsample", source) != cfg.downsample:
            raise ConfigError(f"{source}: downsample={d['downsample']} disagrees with ch_mult {list(cfg.ch_mult)}")
        return cfg

    def to_json(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "in_channels": self.in_channels,
            "downsample": self.downsample,
            "ch": self.ch,
            "out_ch": self.out_channels,
            "ch_mult": list(self.ch_mult),
            "num_res_blocks": self.num_res_blocks,
            "z_channels": self.z_channels,
            "scale_factor": self.scale_factor,
            "shift_factor": self.shift_factor,
        }


@dataclass
class InferenceTransforms:
    """The image resize rules used at inference (``ImageTransform`` arguments: max side, min side,
    stride[, max pixels]) and the default generated size.  The defaults are the official scripts'
    (ARCHITECTURE 6.1); a model trained at another scale (the demo's 56/64 pixels) records its own
    in ``unimedvl_config.json`` so that it is asked and drawn at the scale it learned."""

    understanding_vit: tuple[int, ...] = (980, 378, 14, 2_007_040)
    generation_vit: tuple[int, ...] = (980, 387, 14)
    generation_vae: tuple[int, ...] = (1024, 32, 16)
    image_size: int = 1024

    def validate(self) -> None:
        for name in ("understanding_vit", "generation_vit", "generation_vae"):
            value = tuple(getattr(self, name))
            if len(value) not in (3, 4) or any(int(v) <= 0 for v in value) or value[1] > value[0]:
                raise ConfigError(f"transforms.{name} must be (max_side, min_side, stride[, max_pixels]) with min <= max, got {list(value)}")
        if self.image_size < 16:
            raise ConfigError(f"transforms.image_size must be >= 16, got {self.image_size}")

    def to_json(self) -> dict[str, Any]:
        return {"understanding_vit": list(self.understanding_vit), "generation_vit": list(self.generation_vit),
                "generation_vae": list(self.generation_vae), "image_size": self.image_size}

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = "unimedvl_config.json") -> "InferenceTransforms":
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - known:
            raise ConfigError(f"{source}: image_transforms takes {sorted(known)}, got {d!r}")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if k == "image_size":
                kw[k] = json_int(d, k, f"{source}: image_transforms")
            elif not isinstance(v, (list, tuple)):
                raise ConfigError(f"{source}: image_transforms.{k} must be a list of 3 or 4 positive integers, got {v!r}")
            else:
                kw[k] = tuple(json_int({k: x}, k, f"{source}: image_transforms") for x in v)
        return cls(**kw)


@dataclass
class UniMedVLConfig:
    """The whole model: LLM + ViT + autoencoder + the BAGEL-level constants."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    ae: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    latent_patch_size: int = 2
    max_latent_size: int = 64  # official loaders force 64 (class default 32), grid of latent_pos_embed
    timestep_freq_size: int = 256
    # Understanding-only models (visual_gen=False) have no generation expert, no generation
    # adapters and no autoencoder: nothing an image question uses is missing (the official VQA
    # loader builds the generation expert and never runs it).
    visual_gen: bool = True
    transforms: InferenceTransforms = field(default_factory=InferenceTransforms)

    @property
    def vit_grid(self) -> int:
        """Rows/columns of the ViT position tables (``vit_max_num_patch_per_side``)."""
        return self.vit.num_patches_per_side

    @property
    def latent_channels(self) -> int:
        return self.ae.z_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side: autoencoder downsample x latent patch size (16)."""
        return self.ae.downsample * self.latent_patch_size

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.ae.z_channels

    def validate(self) -> "UniMedVLConfig":
        self.llm.validate()
        self.vit.validate()
        self.ae.validate()
        self.transforms.validate()
        if self.llm.hidden_size % 4:
            raise ConfigError("llm.hidden_size must be a multiple of 4 for the 2D sin-cos tables")
        return self

    # ---- presets ---------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: dict[str, Any] | Any) -> "UniMedVLConfig":
        """A named preset, optionally with per-part overrides: ``from_preset("tiny", llm={"num_layers": 1})``."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        cfg = copy.deepcopy(PRESETS[name])
        for key, value in overrides.items():
            if not hasattr(cfg, key):
                raise ConfigError(f"unknown config field {key!r}")
            part = getattr(cfg, key)
            if dataclasses.is_dataclass(part) and isinstance(value, dict):
                for k, v in value.items():
                    if not hasattr(part, k):
                        raise ConfigError(f"unknown config field {key}.{k}")
                    setattr(part, k, v)
            else:
                setattr(cfg, key, value)
        return cfg.validate()

    def bagel_json(self) -> dict[str, Any]:
        """The BAGEL-level fields that the official files do not carry (``unimedvl_config.json``)."""
        return {
            "latent_patch_size": self.latent_patch_size,
            "max_latent_size": self.max_latent_size,
            "vit_max_num_patch_per_side": self.vit_grid,
            "timestep_freq_size": self.timestep_freq_size,
            "connector_act": "gelu_pytorch_tanh",
            "interpolate_pos": False,
            "visual_gen": self.visual_gen,
            "image_transforms": self.transforms.to_json(),
        }


PRESETS: dict[str, UniMedVLConfig] = {
    # Tests and the embedded demo: runs every code path on a CPU in seconds.
    # Same shapes as the reference fixture `official_tiny_a` except the vocabulary, which is
    # that of the bundled tiny tokenizer.
    "tiny": UniMedVLConfig(
        llm=LLMConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=160, vocab_size=2048),
        vit=ViTConfig(hidden_size=48, num_layers=2, num_heads=4, intermediate_size=96),
        ae=AutoencoderConfig(ch=32),
    ),
    # Benchmarks: a Qwen2.5-vocabulary decoder of hidden 512 / 8 layers, ViT 384 / 6 layers and
    # the full FLUX autoencoder.
    "small": UniMedVLConfig(
        llm=LLMConfig(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1408),
        vit=ViTConfig(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536),
        ae=AutoencoderConfig(),
    ),
    # The official UniMedVL / BAGEL-7B-MoT checkpoint (ARCHITECTURE.md section 2).
    "unimedvl-14b": UniMedVLConfig(),
}
