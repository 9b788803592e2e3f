"""Parameter counts per component, computed on the meta device (no memory)."""

from __future__ import annotations

import re

import torch

from ..config import UniMedVLConfig
from .unimedvl import UniMedVL

# (component, pattern over state-dict keys); the first matching pattern wins.
COMPONENTS: list[tuple[str, re.Pattern]] = [
    ("llm_gen_expert", re.compile(r"^language_model\.model\.layers\.\d+\..*_moe_gen")),
    ("llm_und_expert", re.compile(r"^language_model\.model\.layers\.")),
    ("llm_embed_tokens", re.compile(r"^language_model\.model\.embed_tokens\.")),
    ("llm_lm_head", re.compile(r"^language_model\.lm_head\.")),
    ("llm_final_norms", re.compile(r"^language_model\.model\.norm")),
    ("vit", re.compile(r"^vit_model\.")),
    ("connector", re.compile(r"^connector\.")),
    ("generation_adapters", re.compile(r"^(time_embedder|vae2llm|llm2vae)\.")),
    ("fixed_position_tables", re.compile(r"^(vit_pos_embed|latent_pos_embed)\.")),
    ("vae", re.compile(r"^vae_model\.")),
]


def parameter_counts(config: UniMedVLConfig) -> dict[str, int]:
    """Parameters per component plus totals: ``checkpoint_total`` (what ``ema.safetensors`` holds) and ``total``."""
    with torch.device("meta"):
        model = UniMedVL(config)
    counts = {name: 0 for name, _ in COMPONENTS}
    for key, p in model.state_dict().items():
        name = next(n for n, pat in COMPONENTS if pat.match(key))
        counts[name] += p.numel()
    counts["checkpoint_total"] = sum(v for k, v in counts.items() if k != "vae")
    counts["total"] = counts["checkpoint_total"] + counts["vae"]
    return counts
