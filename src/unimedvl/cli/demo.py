"""``unimedvl demo``: the embedded default - build the demo corpus, train the tiny model, evaluate it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import fail


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run folder: dataset/, train/, model/, metrics.json, report.html."),
    preset: str = typer.Option("default", "--preset", help="default (about ten minutes on a 2-core CPU) or smoke (the path, in a minute or two)."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Dataset-build processes (default: the preset's)."),
    register_default: Optional[bool] = typer.Option(None, "--register-default/--no-register-default",
                                                    help="Make the trained model the default of ask/generate/serve (default: the preset's)."),
) -> None:
    """The main job: build the demo corpus, train the tiny model through the curriculum, evaluate it on held-out data."""
    from ..demo import demo_preset, run_demo

    overrides = {k: v for k, v in (("workers", workers), ("register_default", register_default)) if v is not None}
    try:
        config = demo_preset(preset, **overrides)
        m = run_demo(out, config, echo=typer.echo)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        fail(str(e))

    f = _num
    typer.echo(f"modality questions: {f(m['modality_accuracy'])} accuracy (untrained {f(m['untrained_modality_accuracy'])}, "
               f"chance {f(m['chance_modality_accuracy'])}, n={m['modality_questions']})")
    typer.echo(f"4x super-resolution: PSNR {f(m['sr_psnr'], 2)} dB / SSIM {f(m['sr_ssim'])} (untrained {f(m['untrained_sr_psnr'], 2)} dB, "
               f"bicubic {f(m['bicubic_sr_psnr'], 2)} dB, n={m['sr_pairs']})")
    typer.echo(f"text-to-image modality agreement: {f(m['t2i_agreement'])} (untrained {f(m['untrained_t2i_agreement'])}, "
               f"chance {f(m['chance_t2i_agreement'])})")
    typer.echo(f"report: {out / 'report.html'}; metrics: {out / 'metrics.json'}; wall time {m['wall_time_s']:.0f} s")
    if m.get("default_model_pointer"):
        typer.secho(f"unimedvl ask / generate / edit / chat / serve now use {out / 'model'} when no --model is given "
                    f"(a tiny demo model; pass --model DIR for the official weights)", fg=typer.colors.GREEN)
