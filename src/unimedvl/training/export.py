"""Export a training checkpoint to the official layout (``ema.safetensors``, ``model.safetensors``,
``ae.safetensors``, configs, tokenizer) that :meth:`UniMedVL.from_pretrained` - and the official
reference code - load."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..checkpoint import read_config, save_pretrained
from ..model import UniMedVL
from ..tokenizer import Tokenizer, has_tokenizer
from .lora import LoRAConfig, apply_lora, merge_lora


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    pointer = path / "checkpoints" / "latest.json"
    if pointer.is_file():
        return path / "checkpoints" / json.loads(pointer.read_text())["checkpoint"]
    raise FileNotFoundError(f"{path}: neither a training checkpoint (state.json) nor a run folder with checkpoints/latest.json")


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    ckpt = resolve_checkpoint(checkpoint)
    config = read_config(ckpt)
    tokenizer = Tokenizer(ckpt) if has_tokenizer(ckpt) else None
    lora = json.loads((ckpt / "state.json").read_text()).get("lora")
    for weights in ("model", "ema"):
        model = UniMedVL.from_config(config)
        if lora:  # rebuild the adapters, load them, fold them into the base weights
            apply_lora(model, LoRAConfig(rank=lora["rank"], alpha=lora["alpha"], targets=tuple(lora["targets"])))
        state = load_file(str(ckpt / f"{weights}.safetensors"))
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()}, strict=True)
        merge_lora(model)
        save_pretrained(model, out, weights=weights, dtype=dtype, tokenizer=tokenizer)
    return Path(out)
