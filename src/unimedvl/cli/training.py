"""Training commands: ``train`` (a curriculum plan, one process or under torchrun) and ``export``
(a training checkpoint to the official layout).  ``python -m unimedvl.train`` is ``train``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import DeviceOpt, fail


def train(
    plan: str = typer.Argument(..., help="A curriculum plan YAML, or a shipped plan name: unimedvl, demo."),
    data: Path = typer.Option(..., "--data", help="A built dataset (unimedvl data build / data demo)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: metrics.jsonl, checkpoints/."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from a checkpoint directory (official layout) instead of the plan's preset."),
    tokenizer_dir: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer files for a preset without a bundled one."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many global steps."),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="Train LoRA adapters of this rank instead of the full model (0: off; default: the plan's lora.rank)."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="LoRA scale numerator (default: the plan's, else 32)."),
    lora_target: list[str] = typer.Option(None, "--lora-target", help="Regex of linear layers to adapt (repeatable); default: the generation expert's attention."),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto (bf16 on GPUs, fp32 on CPUs), bf16 or fp32 (default: the plan's)."),
    activation_checkpointing: Optional[bool] = typer.Option(None, "--activation-checkpointing/--no-activation-checkpointing",
                                                            help="Recompute decoder and ViT layers in backward (default: the plan's)."),
    tensorboard: bool = typer.Option(True, "--tensorboard/--no-tensorboard", help="Also log to RUN/tensorboard (when tensorboard is installed)."),
    device: str = DeviceOpt,
) -> None:
    """Train through a curriculum plan: one process, or N under torchrun (FSDP2; gloo on CPUs)."""
    from ..config import ConfigError
    from ..formats.checkpoint import CheckpointError
    from ..tokenizer import TokenizerError
    from ..training.distributed import init_from_env
    from ..training.plan import PlanError, load_plan, with_overrides
    from ..training.start import TrainingProgress, initial_model
    from ..training.trainer import Trainer

    dist_ctx = init_from_env()

    try:
        p = with_overrides(load_plan(plan), precision=precision, activation_checkpointing=activation_checkpointing,
                           lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=tuple(lora_target or ()))
        model, tok = initial_model(p, init_from=init_from, tokenizer_dir=tokenizer_dir, device=device)
        progress = TrainingProgress(p, max_steps, enabled=dist_ctx.is_main)
        trainer = Trainer(p, data, out, model=model, tokenizer=tok, device=device, on_log=progress.on_log, dist_ctx=dist_ctx,
                          tensorboard=tensorboard, on_autoencoder_log=progress.on_autoencoder_log)
        result = trainer.run(resume=resume, max_steps=max_steps)
        progress.close(result.global_step)
    except (PlanError, ConfigError, CheckpointError, TokenizerError, FileNotFoundError, FileExistsError, ValueError) as e:
        fail(str(e))
    if dist_ctx.is_main:
        typer.echo(f"trained to step {result.global_step}; last checkpoint {result.checkpoint}; metrics {result.metrics}")
    if dist_ctx.enabled:
        import torch.distributed as dist

        dist.destroy_process_group()


def export(
    checkpoint: Path = typer.Argument(..., help="A training checkpoint folder, or a run folder (its latest checkpoint)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder in the official layout."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16 or fp32 for the stored tensors (default: as trained)."),
) -> None:
    """Export a training checkpoint to the official layout (ema/model/ae safetensors, configs, tokenizer)."""
    from ..formats.checkpoint import CheckpointError
    from ..precision import DTYPES
    from ..training.export import export_checkpoint

    if dtype is not None and dtype not in DTYPES:
        fail(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    try:
        path = export_checkpoint(checkpoint, out, dtype=DTYPES[dtype] if dtype else None)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        fail(str(e))
    typer.echo(f"exported to {path}")
