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
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..formats.atomic import write_json
from .distributed import DistContext

SHARDED_DIR = "sharded"  # torch.distributed.checkpoint folder of an FSDP run's checkpoint
CHECKPOINTS_DIR = "checkpoints"  # RUN/checkpoints
_CHECKPOINT_NAME = re.compile(r"step-\d{7,}")


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


class CheckpointWarning(UserWarning):
    """A run's checkpoint pointer was damaged or stale and another checkpoint is used instead."""


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints (``step-N`` folders with a ``state.json``), oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    found = [p for p in root.glob("step-*") if _CHECKPOINT_NAME.fullmatch(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``RUN/checkpoints/latest.json`` names, if it is complete (has ``state.json``).

    A pointer that is malformed, or that names a checkpoint that is gone or incomplete, falls back
    to the newest complete checkpoint with a :class:`CheckpointWarning` (never to a silent restart
    from step 1); with no complete checkpoint left, it is a :class:`CheckpointError`.  No
    ``latest.json`` at all with complete checkpoints present also falls back, with a warning."""
    from ..formats.checkpoint import CheckpointError

    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / "latest.json"
    complete = complete_checkpoints(run_dir)
    if not pointer.is_file():
        if complete:
            warnings.warn(f"{pointer} is missing; using the newest complete checkpoint {complete[-1].name}", CheckpointWarning, stacklevel=2)
            return complete[-1]
        return None
    try:
        doc = json.loads(pointer.read_text())
        name = doc["checkpoint"]
        if not isinstance(name, str) or not _CHECKPOINT_NAME.fullmatch(name):
            raise TypeError(f"field 'checkpoint' must name a step-NNNNNNN folder, got {name!r}")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        problem = f"{pointer} is malformed ({type(e).__name__}: {e}; expected {{\"checkpoint\": \"step-NNNNNNN\", \"global_step\": N}})"
    else:
        path = root / name
        if (path / "state.json").is_file():
            return path
        problem = f"{pointer} names {name}, which is missing or incomplete"
    if complete:
        warnings.warn(f"{problem}; using the newest complete checkpoint {complete[-1].name}", CheckpointWarning, stacklevel=2)
        return complete[-1]
    raise CheckpointError(f"{problem}, and no complete checkpoint is left in {root}")


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
    """A checkpoint's ``state.json``, checked (its fields, and against this run's number of processes)."""
    state = read_state_file(path)
    if state.get("world", 1) != dist.world:
        raise ValueError(f"{path} was written by {state.get('world', 1)} processes; resume with the same number "
                         "(the global batch and each rank's data stream depend on it)")
    return state


def read_state_file(path: str | Path) -> dict:
    """``path/state.json``, with the fields a resume needs checked; :class:`CheckpointError` naming
    the file and the field otherwise."""
    from ..formats.checkpoint import CheckpointError

    file = Path(path) / "state.json"
    try:
        state = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: {path} is not a complete training checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(state).__name__}")
    checks = {"global_step": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
              "stage_index": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "stream": lambda v: isinstance(v, dict) and isinstance(v.get("sampler"), dict) and isinstance(v.get("stats"), dict)}
    expected = {"global_step": "a non-negative integer", "stage_index": "an integer",
                "stream": "an object with sampler and stats"}
    for key, ok in checks.items():
        if key not in state:
            raise CheckpointError(f"{file}: field {key!r} is missing (expected {expected[key]})")
        if not ok(state[key]):
            raise CheckpointError(f"{file}: field {key!r} must be {expected[key]}, got {state[key]!r:.80}")
    return state


def load_weights_file(file: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file; :class:`CheckpointError` naming it when it is missing or damaged."""
    from ..formats.checkpoint import CheckpointError

    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint is incomplete")
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error type for truncated or garbage files
        raise CheckpointError(f"{file}: cannot read the weights ({type(e).__name__}: {str(e)[:160]}); the file is damaged or truncated") from None


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
    from ..formats.checkpoint import CheckpointError

    full = load_weights_file(path / "model.safetensors")
    current = model.state_dict()
    _check_tensors(path / "model.safetensors", full, current)
    model.load_state_dict({k: _like(current[k], full[k]) for k in current})
    saved_ema = load_weights_file(path / "ema.safetensors")
    _check_tensors(path / "ema.safetensors", saved_ema, ema)
    ema = {k: _like(ema[k], saved_ema[k]) for k in ema}
    if optimizer is not None:
        file = path / "optimizer.pt"
        try:
            optimizer.load_state_dict(torch.load(file, weights_only=True))
        except FileNotFoundError:
            raise CheckpointError(f"{file} is missing: the checkpoint is incomplete") from None
        except Exception as e:  # unpickling garbage raises many types
            raise CheckpointError(f"{file}: cannot restore the optimiser state ({type(e).__name__}: {str(e)[:160]})") from None
    return ema


def _check_tensors(file: Path, found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    from ..formats.checkpoint import CheckpointError

    missing = [k for k in expected if k not in found]
    if missing:
        raise CheckpointError(f"{file}: {len(missing)} tensor(s) missing, e.g. {missing[:3]}")
    for k, v in expected.items():
        if tuple(found[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{file}: tensor {k!r} has shape {list(found[k].shape)}, the model expects {list(v.shape)}")
        if v.is_floating_point() and not found[k].is_floating_point():
            raise CheckpointError(f"{file}: tensor {k!r} is {str(found[k].dtype).removeprefix('torch.')}; "
                                  "expected a floating-point dtype (float32, float16 or bfloat16)")
