"""Training checkpoints beside the loop: save, load, find the latest (nanochat's ``checkpoint_manager``).

A run's checkpoints live in ``RUN/checkpoints/step-NNNNNNN/``; ``RUN/checkpoints/latest.json``
names the newest complete one.  Each checkpoint holds

* the weights, the EMA and the optimiser: a single process writes ``model.safetensors``,
  ``ema.safetensors`` (fp32) and ``optimizer.pt``; an FSDP run writes one
  ``torch.distributed.checkpoint`` folder, :data:`SHARDED_DIR`, each rank its own shards (nothing is
  gathered; :mod:`.export` assembles them in one process);
* ``state.json``: the global step, the world size and format, and whatever the loop needs to go on
  (its stage, data-stream position, plan name, LoRA settings);
* the model's configs and tokenizer, so that ``unimedvl export`` needs nothing else.

Atomicity: everything is written into ``.step-NNNNNNN.partial`` and renamed when complete, and
``latest.json`` is replaced (atomically) only after the rename, so a run killed at any moment
resumes from the last complete checkpoint; :func:`remove_partial_checkpoints` clears what a killed
run left half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..formats.atomic import write_json
from .distributed import DistContext

SHARDED_DIR = "sharded"  # torch.distributed.checkpoint folder of an FSDP run's checkpoint
CHECKPOINTS_DIR = "checkpoints"  # RUN/checkpoints


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``RUN/checkpoints/latest.json`` names, if it is complete (has ``state.json``)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / "latest.json"
    if not pointer.is_file():
        return None
    path = root / json.loads(pointer.read_text())["checkpoint"]
    return path if (path / "state.json").is_file() else None


def remove_partial_checkpoints(run_dir: str | Path) -> None:
    """Delete the ``.step-*.partial`` folders of checkpoints a killed run did not finish (call on one rank)."""
    for stale in (Path(run_dir) / CHECKPOINTS_DIR).glob(".step-*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def _sharded_state(model: torch.nn.Module, ema: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> dict:
    """What an FSDP checkpoint holds: the sharded (DTensor) model state, the EMA, the optimiser state."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return {"model": model.state_dict(), "ema": ema, "optim": get_optimizer_state_dict(model, optimizer)}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    ema: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    tokenizer,
    dist: DistContext,
    meta: dict,
) -> Path:
    """Write ``RUN/checkpoints/step-<step>`` atomically and point ``latest.json`` at it; every rank
    calls it (FSDP ranks each write their shards).  ``meta``: the loop's own state, stored in
    ``state.json`` beside ``global_step``, ``world`` and ``format``."""
    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    final = ckpt_root / checkpoint_name(step)
    tmp = ckpt_root / f".{checkpoint_name(step)}.partial"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    if dist.enabled:  # every rank writes its own shards; nothing is gathered
        import torch.distributed.checkpoint as dcp

        dcp.save(_sharded_state(model, ema, optimizer), checkpoint_id=str(tmp / SHARDED_DIR))
    if dist.is_main:
        if not dist.enabled:
            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
            save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        from ..formats.checkpoint import write_config

        write_config(model.config, tmp, (tokenizer.special.bos, tokenizer.special.eos))
        tokenizer.save(tmp)  # the checkpoint is self-describing: unimedvl export needs nothing else
        write_json(tmp / "state.json", {"global_step": step, **meta, "world": dist.world,
                                        "format": "sharded" if dist.enabled else "safetensors"})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_json(ckpt_root / "latest.json", {"checkpoint": final.name, "global_step": step})
    dist.barrier()
    return final


def read_state(path: str | Path, dist: DistContext) -> dict:
    """A checkpoint's ``state.json``, checked against this run's number of processes."""
    state = json.loads((Path(path) / "state.json").read_text())
    if state.get("world", 1) != dist.world:
        raise ValueError(f"{path} was written by {state.get('world', 1)} processes; resume with the same number "
                         "(the global batch and each rank's data stream depend on it)")
    return state


def _like(template: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``template`` (sharded the same way when it is a DTensor)."""
    if hasattr(template, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(template.dtype), template.device_mesh, template.placements)
    return full.to(template.dtype)


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    ema: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    dist: DistContext,
) -> dict[str, torch.Tensor]:
    """Load a checkpoint's weights into ``model`` and, unless ``optimizer`` is ``None`` (a stage-end
    checkpoint resumes into a fresh stage, whose optimiser starts anew), its optimiser state into
    ``optimizer``.  Returns the EMA, laid out like ``ema`` (loaded in place under FSDP)."""
    path = Path(path)
    if dist.enabled:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        target = _sharded_state(model, ema, optimizer) if optimizer is not None else {"model": model.state_dict(), "ema": ema}
        dcp.load(target, checkpoint_id=str(path / SHARDED_DIR))
        model.load_state_dict(target["model"])
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, target["optim"])
        return ema
    full = load_file(str(path / "model.safetensors"))
    current = model.state_dict()
    model.load_state_dict({k: _like(current[k], full[k]) for k in current})
    saved_ema = load_file(str(path / "ema.safetensors"))
    ema = {k: _like(ema[k], saved_ema[k]) for k in ema}
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return ema
