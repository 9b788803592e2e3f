"""Model commands: ``info`` (parameter counts), ``manifest`` (official checkpoint keys), ``parity``
(replay a reference fixture), ``quantize`` (write a pre-quantised checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..model.quantized import schemes_help  # the scheme table, for --scheme's help
from .common import DtypeOpt, MaxMemoryOpt, QuantizeOpt, fail


def info(
    preset: str = typer.Option("tiny", help="Preset to describe (tiny, small, unimedvl-14b)."),
    model: Optional[Path] = typer.Option(None, "--model", help="A checkpoint directory instead of a preset (configs only are read)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="Also print the placement plan that --device-map "
                                             "auto (or this JSON plan file) gives: units per device and GiB. Nothing is loaded."),
    max_memory: Optional[str] = MaxMemoryOpt,
    dtype: str = DtypeOpt,
    quantize: Optional[str] = QuantizeOpt,
    understanding_only: bool = typer.Option(False, "--understanding-only", help="Plan the understanding-only model that ask, "
                                            "report, chat and eval vqa load (no generation expert, adapters or autoencoder)."),
) -> None:
    """Parameter counts per component of a preset or a checkpoint directory (and, with --device-map, its placement plan)."""
    from ..config import ConfigError, UniMedVLConfig
    from ..formats.checkpoint import CheckpointError, read_config
    from ..model.parameters import parameter_counts

    try:
        config = read_config(model) if model is not None else UniMedVLConfig.from_preset(preset)
    except (CheckpointError, ConfigError) as e:
        fail(str(e))
    counts = parameter_counts(config)
    source = str(model) if model is not None else f"preset {preset}"
    plan = None
    if device_map is not None or max_memory is not None:
        plan, weights = _placement_plan(config, model, device_map, max_memory, dtype, quantize, understanding_only)
    if as_json:
        out = {"source": source, "parameters": counts}
        if plan is not None:
            out["placement"] = {"weights": weights, **plan.to_json()}
        typer.echo(json.dumps(out, indent=1))
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
    if plan is not None:
        typer.echo(f"placement plan ({weights} weights):\n{plan.describe()}")


def _placement_plan(config, model: Optional[Path], device_map: Optional[str], max_memory: Optional[str], dtype: str,
                    quantize: Optional[str], understanding_only: bool):
    """The plan ``--device-map``/``--max-memory`` would give this model, computed on the meta device."""
    import dataclasses

    from ..formats.checkpoint import CheckpointError, find_weights, read_header
    from ..inference.placement import Planner, meta_model
    from ..precision import dtype_name, resolve_dtype

    try:
        if quantize is None and model is not None:  # a pre-quantised checkpoint loads quantised
            try:
                quantize = read_header(find_weights(model)).scheme
            except CheckpointError:
                pass  # configs only: plan the unquantised layout
        planner = Planner(device_map if device_map is not None else "auto", max_memory)
        planner.dtype = resolve_dtype(dtype, planner.first_device)
        planner(meta_model(dataclasses.replace(config, visual_gen=not understanding_only), quantize))
    except ValueError as e:  # PlacementError, a bad dtype or quantisation scheme
        fail(str(e))
    what = [dtype_name(planner.dtype)] + ([quantize] if quantize else []) + (["understanding only"] if understanding_only else [])
    return planner.plan, ", ".join(what)


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
    """Replay a reference fixture and compare every recorded output; exit 0 only if all are within tolerance.

    The recorded inputs and resize rules are replayed whatever the model's own inference transforms
    (a note says when they differ); a model that does not fit the recording is named in one line."""
    from ..evaluation.parity import replay
    from ..formats.checkpoint import CheckpointError

    try:
        rows = replay(fixture_dir, policies=policy or None, on_row=lambda r: typer.echo(r.format()),
                      on_note=lambda note: typer.echo(f"note: {note}"))
    except (FileNotFoundError, CheckpointError, ValueError) as e:  # FixtureMismatch is a ValueError
        fail(str(e))
    passed = sum(r.ok for r in rows)
    typer.echo(f"parity: {passed}/{len(rows)} within tolerance")
    if passed != len(rows) or not rows:
        raise typer.Exit(1)


def quantize(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint directory in the official layout (unquantised)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: the pre-quantised checkpoint (configs, tokenizer and ae copied)."),
    scheme: str = typer.Option("int8", "--scheme", help=f"Weight-only scheme: {schemes_help()}. Any scheme can be "
                               "written on any machine; loading checks the device."),
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
