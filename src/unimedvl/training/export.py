"""Export a training checkpoint to the official layout (``ema.safetensors``, ``model.safetensors``,
``ae.safetensors``, configs, tokenizer) that :func:`unimedvl.load_pretrained` - and the official
reference code - load."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..formats.checkpoint import CheckpointError, read_config, read_json_object, save_pretrained
from ..model import UniMedVL
from ..tokenizer import Tokenizer, has_tokenizer
from .checkpointing import CHECKPOINTS_DIR, SHARDED_DIR, _check_tensors, latest_checkpoint, load_weights_file
from .lora import LoRAConfig, apply_lora, merge_lora


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest complete checkpoint)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    raise FileNotFoundError(f"{path}: neither a training checkpoint (state.json) nor a run folder with a complete checkpoint "
                            f"named by {CHECKPOINTS_DIR}/latest.json")


def load_training_weights(checkpoint: str | Path, which: str = "model") -> dict[str, torch.Tensor]:
    """The full ``model`` or ``ema`` weights of a training checkpoint, in the trainer's key names,
    from either format: a single process's safetensors or an FSDP run's sharded
    ``torch.distributed.checkpoint`` folder (assembled here, in one process, without a process group)."""
    ckpt = resolve_checkpoint(checkpoint)
    if which not in ("model", "ema"):
        raise ValueError(f"which must be model or ema, got {which!r}")
    if (ckpt / f"{which}.safetensors").is_file():
        return load_weights_file(ckpt / f"{which}.safetensors")
    if not (ckpt / SHARDED_DIR / ".metadata").is_file():
        raise FileNotFoundError(f"{ckpt}: no {which}.safetensors and no sharded checkpoint ({SHARDED_DIR}/.metadata)")
    import torch.distributed.checkpoint as dcp

    model = _empty_model(ckpt)
    target = {which: {k: torch.empty_like(v, dtype=torch.float32 if which == "ema" else v.dtype) for k, v in model.state_dict().items()}}
    with warnings.catch_warnings():  # loading in one process is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, checkpoint_id=str(ckpt / SHARDED_DIR))
    return target[which]


def _empty_model(ckpt: Path) -> UniMedVL:
    model = UniMedVL.from_config(read_config(ckpt), dtype="fp32")  # the trained weights are cast on export only
    file = ckpt / "state.json"
    state = read_json_object(file)
    lora = state.get("lora")
    if lora is not None and not (isinstance(lora, dict) and {"rank", "alpha", "targets"} <= set(lora)):
        raise CheckpointError(f"{file}: field 'lora' must be null or an object with rank, alpha and targets, got {lora!r:.80}")
    if lora:  # the adapters' keys are part of the trained state
        apply_lora(model, LoRAConfig(lora["rank"], lora["alpha"], tuple(lora["targets"])))
    return model


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    ckpt = resolve_checkpoint(checkpoint)
    tokenizer = Tokenizer(ckpt) if has_tokenizer(ckpt) else None
    for weights in ("model", "ema"):
        model = _empty_model(ckpt)  # with LoRA adapters rebuilt, loaded, then folded into the base weights
        state = load_training_weights(ckpt, weights)
        _check_tensors(ckpt / f"{weights}.safetensors", state, model.state_dict())
        extra = sorted(set(state) - set(model.state_dict()))
        if extra:
            raise CheckpointError(f"{ckpt / f'{weights}.safetensors'}: {len(extra)} tensor(s) the model does not have, e.g. {extra[:3]}")
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()}, strict=True)
        merge_lora(model)
        save_pretrained(model, out, weights=weights, dtype=dtype, tokenizer=tokenizer)
    return Path(out)
