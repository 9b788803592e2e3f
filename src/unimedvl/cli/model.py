"""Model commands: ``info`` (parameter counts), ``manifest`` (official checkpoint keys), ``parity``
(replay a reference fixture), ``quantize`` (write a pre-quantised checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import fail


def info(
    preset: str = typer.Option("tiny", help="Preset to describe (tiny, small, unimedvl-14b)."),
    model: Optional[Path] = typer.Option(None, "--model", help="A checkpoint directory instead of a preset (configs only are read)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Parameter counts per component of a preset or a checkpoint directory."""
    from ..config import ConfigError, UniMedVLConfig
    from ..formats.checkpoint import CheckpointError, read_config
    from ..model.parameters import parameter_counts

    try:
        config = read_config(model) if model is not None else UniMedVLConfig.from_preset(preset)
    except (CheckpointError, ConfigError) as e:
        fail(str(e))
    counts = parameter_counts(config)
    source = str(model) if model is not None else f"preset {preset}"
    if as_json:
        typer.echo(json.dumps({"source": source, "parameters": counts}, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"UniMedVL parameters ({source})")
    table.add_column("component")
    table.add_column("parameters", justify="right")
    table.add_column("", justify="right")
    for name, n in counts.items():
        table.add_row(name, f"{n:,}", f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M")
    Console().print(table)
    llm, vit, ae = config.llm, config.vit, config.ae
    typer.echo(
        f"LLM hidden {llm.hidden_size} x {llm.num_layers} layers ({llm.num_heads} q / {llm.num_kv_heads} kv heads), "
        f"vocab {llm.vocab_size}; ViT {vit.hidden_size} x {vit.num_layers}; autoencoder ch {ae.ch}, z {ae.z_channels}"
    )


def manifest(preset: str = typer.Option("unimedvl-14b", help="Preset whose official checkpoint keys to list.")) -> None:
    """Every state-dict key of the official files (ema.safetensors, ae.safetensors) with its shape, as JSON."""
    from ..config import ConfigError, UniMedVLConfig
    from ..formats.checkpoint import official_manifest

    try:
        config = UniMedVLConfig.from_preset(preset)
    except ConfigError as e:
        fail(str(e))
    typer.echo(json.dumps(official_manifest(config), indent=1))


def parity(
    fixture_dir: Path = typer.Argument(..., help="A fixture directory in the format of fixtures/FORMAT.md."),
    policy: list[str] = typer.Option(None, "--policy", help="Precision policies to replay (default: all recorded)."),
) -> None:
    """Replay a reference fixture and compare every recorded output; exit 0 only if all are within tolerance."""
    from ..evaluation.parity import replay
    from ..formats.checkpoint import CheckpointError

    try:
        rows = replay(fixture_dir, policies=policy or None, on_row=lambda r: typer.echo(r.format()))
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        fail(str(e))
    passed = sum(r.ok for r in rows)
    typer.echo(f"parity: {passed}/{len(rows)} within tolerance")
    if passed != len(rows) or not rows:
        raise typer.Exit(1)


def quantize(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint directory in the official layout (unquantised)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: the pre-quantised checkpoint (configs, tokenizer and ae copied)."),
    scheme: str = typer.Option("int8", "--scheme", help="Weight-only scheme: int8."),
    weights: str = typer.Option("ema", "--weights", help="ema (default) or model (the raw weights)."),
) -> None:
    """Write a pre-quantised checkpoint that loads without re-quantising (``--model OUT`` on any command)."""
    from ..formats.checkpoint import CheckpointError
    from ..formats.quantized_checkpoint import quantize_checkpoint
    from .common import progress_bar

    try:
        path = quantize_checkpoint(model, out, scheme, weights=weights, progress=progress_bar("quantising", unit="tensor"))
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    typer.echo(f"wrote {path} ({scheme}, {weights} weights); load it with --model {path}")
