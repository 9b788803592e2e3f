"""The ``unimedvl`` command line: a thin layer over the Python API."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="UniMedVL: understand and generate medical images.")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command()
def info(
    preset: str = typer.Option("tiny", help="Preset to describe (tiny, small, unimedvl-14b)."),
    model: Optional[Path] = typer.Option(None, "--model", help="A checkpoint directory instead of a preset (configs only are read)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Parameter counts per component of a preset or a checkpoint directory."""
    from .formats.checkpoint import CheckpointError, read_config
    from .config import ConfigError, UniMedVLConfig
    from .model.parameters import parameter_counts

    try:
        config = read_config(model) if model is not None else UniMedVLConfig.from_preset(preset)
    except (CheckpointError, ConfigError) as e:
        _fail(str(e))
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


@app.command()
def manifest(preset: str = typer.Option("unimedvl-14b", help="Preset whose official checkpoint keys to list.")) -> None:
    """Every state-dict key of the official files (ema.safetensors, ae.safetensors) with its shape, as JSON."""
    from .formats.checkpoint import official_manifest
    from .config import ConfigError, UniMedVLConfig

    try:
        config = UniMedVLConfig.from_preset(preset)
    except ConfigError as e:
        _fail(str(e))
    typer.echo(json.dumps(official_manifest(config), indent=1))


@app.command()
def parity(
    fixture_dir: Path = typer.Argument(..., help="A fixture directory in the format of fixtures/FORMAT.md."),
    policy: list[str] = typer.Option(None, "--policy", help="Precision policies to replay (default: all recorded)."),
) -> None:
    """Replay a reference fixture and compare every recorded output; exit 0 only if all are within tolerance."""
    from .formats.checkpoint import CheckpointError
    from .evaluation.parity import replay

    try:
        rows = replay(fixture_dir, policies=policy or None, on_row=lambda r: typer.echo(r.format()))
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        _fail(str(e))
    passed = sum(r.ok for r in rows)
    typer.echo(f"parity: {passed}/{len(rows)} within tolerance")
    if passed != len(rows) or not rows:
        raise typer.Exit(1)


# ---- inference ---------------------------------------------------------------------------------

ModelOpt = typer.Option(None, "--model", "-m", help="Checkpoint directory in the official layout (weights, configs, tokenizer); "
                        "default: $UNIMEDVL_MODEL, else the model `unimedvl demo` trained.")
DeviceOpt = typer.Option("cpu", "--device", help="torch device, e.g. cpu, cuda, cuda:1.")
DtypeOpt = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA as the official scripts, fp32 on CPUs), bf16 or fp32.")
WindowOpt = typer.Option(None, "--window", help="DICOM window: a preset (lung, mediastinum, bone, brain, abdomen) or CENTER,WIDTH; default: the file's own.")
FrameOpt = typer.Option(0, "--frame", help="DICOM multi-frame: frame index.")
AxisOpt = typer.Option("axial", "--axis", help="NIfTI: slicing axis (sagittal, coronal, axial).")
SliceOpt = typer.Option(None, "--slice", help="NIfTI: slice index along --axis (default: the middle slice).")
SeedOpt = typer.Option(42, "--seed", help="Seed of every random draw; the same seed gives the same output.")


def _read_options(window: Optional[str], frame: int, axis: str, slice_index: Optional[int]):
    from .inference import ImageReadOptions

    parsed = window
    if window and "," in window:
        try:
            center, width = (float(v) for v in window.split(","))
        except ValueError:
            _fail(f"--window {window!r}: expected a preset name or CENTER,WIDTH (two numbers)")
        parsed = (center, width)
    return ImageReadOptions(window=parsed, frame=frame, axis=axis, slice_index=slice_index)


def _user_errors():
    from .formats.checkpoint import CheckpointError
    from .config import ConfigError
    from .formats.medical_io import MedicalImageError
    from .tokenizer import TokenizerError

    return (CheckpointError, ConfigError, MedicalImageError, TokenizerError, ValueError, RuntimeError, FileNotFoundError)


def _resolve_model(model: Optional[Path]) -> Path:
    """``--model``, else the default model, announced on stderr so nobody mistakes it for real weights."""
    if model is not None:
        return model
    from .inference.default_model import resolve_default_model

    found = resolve_default_model()
    if found is None:
        _fail("no --model given and no default model: pass --model DIR (the official UniMedVL weights), "
              "or run `unimedvl demo` to train the tiny demo model")
    directory, why = found
    typer.secho(f"no --model given: using {directory} ({why}); pass --model DIR for the official weights",
                fg=typer.colors.CYAN, err=True)
    return directory


def _load_pipeline(model: Optional[Path], device: str, dtype: str, read_options, visual_gen: bool = True):
    from .inference import UniMedVLPipeline

    model = _resolve_model(model)
    try:
        with _status(f"loading {model}"):
            return UniMedVLPipeline.from_pretrained(model, device=device, dtype=dtype, visual_gen=visual_gen, read_options=read_options)
    except _user_errors() as e:
        _fail(str(e))


def _status(message: str):
    from rich.console import Console

    return Console(stderr=True).status(message)


def _denoise_progress(desc: str):
    """A tqdm bar fed by the pipeline's ``progress(step, total)`` callback."""
    from tqdm import tqdm

    state: dict = {}

    def update(step: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=desc, unit="step", leave=False)
        state["bar"].update(step - state["bar"].n)
        if step == total:
            state["bar"].close()

    return update


@app.command()
def ask(
    images: list[Path] = typer.Argument(None, help="Images (PNG/JPEG/TIFF, DICOM, NIfTI), shown to the model in order."),
    question: str = typer.Option(..., "--question", "-q", help="The question."),
    model: Optional[Path] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    think: bool = typer.Option(False, "--think", help="Reason in <think> tags first; the reasoning is printed separately."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    temperature: float = typer.Option(0.1, "--temperature", help="0 decodes greedily."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = SeedOpt,
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print the answer as it is decoded."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (implies --no-stream)."),
    window: Optional[str] = WindowOpt,
    frame: int = FrameOpt,
    axis: str = AxisOpt,
    slice_index: Optional[int] = SliceOpt,
) -> None:
    """Answer a question about medical images."""
    pipe = _load_pipeline(model, device, dtype, _read_options(window, frame, axis, slice_index), visual_gen=False)
    try:
        result = pipe.ask(images or [], question, think=think, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, seed=seed, stream=stream and not as_json)
        if stream and not as_json:
            for piece in result:
                typer.echo(piece, nl=False)
            typer.echo()
            result = result.answer
    except _user_errors() as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps({"answer": result.text, "thinking": result.thinking, "finished": result.finished}, indent=1))
    elif not stream:
        if result.thinking:
            typer.secho(result.thinking, dim=True)
        typer.echo(result.text)


@app.command()
def report(
    image: Path = typer.Argument(..., help="The image to report on."),
    model: Optional[Path] = ModelOpt,
    modality: Optional[str] = typer.Option(None, "--modality", help='e.g. "chest X-ray"; default: the DICOM/NIfTI modality if any.'),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    temperature: float = typer.Option(0.1, "--temperature"),
    seed: int = SeedOpt,
    as_json: bool = typer.Option(False, "--json"),
    window: Optional[str] = WindowOpt,
    frame: int = FrameOpt,
    axis: str = AxisOpt,
    slice_index: Optional[int] = SliceOpt,
) -> None:
    """Write a findings / impression report for one image."""
    pipe = _load_pipeline(model, device, dtype, _read_options(window, frame, axis, slice_index), visual_gen=False)
    try:
        rep = pipe.report(image, modality, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    except _user_errors() as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps({"modality": rep.modality, "findings": rep.findings, "impression": rep.impression, "text": rep.text}, indent=1))
    else:
        typer.echo(f"Findings: {rep.findings}\nImpression: {rep.impression}")


def _sampler_options(steps, cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min, timestep_shift) -> dict:
    out = dict(steps=steps, cfg_text_scale=cfg_text_scale, cfg_img_scale=cfg_img_scale, cfg_renorm_type=cfg_renorm_type,
               cfg_renorm_min=cfg_renorm_min, timestep_shift=timestep_shift)
    if cfg_interval is not None:
        out["cfg_interval"] = tuple(cfg_interval)
    return {k: v for k, v in out.items() if v is not None}


def _check_output(out: Path) -> None:
    if out.suffix.lower() not in (".png", ".dcm", ".dicom"):
        _fail(f"--out {out}: use a .png or .dcm file name (both are marked synthetic)")
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="What to draw, e.g. 'Axial T2-weighted brain MRI, normal study.'"),
    out: Path = typer.Option(..., "--out", "-o", help="Output file: .png (metadata marks it synthetic) or .dcm (DICOM Secondary Capture)."),
    model: Optional[Path] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    height: Optional[int] = typer.Option(None, "--height", help="Default: the model's image size (1024 for the official weights)."),
    width: Optional[int] = typer.Option(None, "--width", help="Default: the model's image size."),
    steps: int = typer.Option(50, "--steps", help="Number of timesteps (steps - 1 model evaluations)."),
    cfg_text_scale: float = typer.Option(3.0, "--cfg-text-scale"),
    cfg_img_scale: float = typer.Option(1.5, "--cfg-img-scale"),
    cfg_interval: Optional[tuple[float, float]] = typer.Option(None, "--cfg-interval", help="Guidance is on for t in (LO, HI]; default 0.4 1.0."),
    cfg_renorm_type: str = typer.Option("global", "--cfg-renorm-type", help="global, channel or text_channel."),
    cfg_renorm_min: float = typer.Option(0.0, "--cfg-renorm-min"),
    timestep_shift: float = typer.Option(3.0, "--timestep-shift"),
    seed: int = SeedOpt,
    think: bool = typer.Option(False, "--think", help="Write a plan first and condition the image on it."),
) -> None:
    """Generate a medical image from text."""
    _check_output(out)
    pipe = _load_pipeline(model, device, dtype, _read_options(None, 0, "axial", None))
    try:
        result = pipe.generate_image(
            prompt, height=height, width=width, seed=seed, think=think, progress=_denoise_progress("denoising"),
            **_sampler_options(steps, cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min, timestep_shift),
        )
        path = result.save(out)
    except _user_errors() as e:
        _fail(str(e))
    if result.thinking:
        typer.secho(result.thinking, dim=True)
    typer.echo(f"wrote {path} ({result.image.size[0]}x{result.image.size[1]}, synthetic, seed {seed})")


@app.command()
def edit(
    images: list[Path] = typer.Argument(..., help="Input image(s): PNG/JPEG/TIFF, DICOM or NIfTI."),
    instruction: str = typer.Option(..., "--instruction", "-i", help="e.g. 'Translate this T2 slice to FLAIR.'"),
    out: Path = typer.Option(..., "--out", "-o", help="Output .png or .dcm (marked synthetic)."),
    model: Optional[Path] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    height: Optional[int] = typer.Option(None, "--height", help="Default: the input's size after the generation resize rule."),
    width: Optional[int] = typer.Option(None, "--width"),
    steps: int = typer.Option(50, "--steps"),
    cfg_text_scale: float = typer.Option(4.0, "--cfg-text-scale"),
    cfg_img_scale: float = typer.Option(2.0, "--cfg-img-scale"),
    cfg_interval: Optional[tuple[float, float]] = typer.Option(None, "--cfg-interval", help="Default 0.0 1.0."),
    cfg_renorm_type: str = typer.Option("text_channel", "--cfg-renorm-type"),
    cfg_renorm_min: float = typer.Option(0.0, "--cfg-renorm-min"),
    timestep_shift: float = typer.Option(3.0, "--timestep-shift"),
    seed: int = SeedOpt,
    analyze: bool = typer.Option(True, "--analyze/--no-analyze", help="The official understanding pre-pass appended to the instruction."),
    think: bool = typer.Option(False, "--think"),
    explain: bool = typer.Option(False, "--explain", help="Also print the model's text about the generated image."),
    window: Optional[str] = WindowOpt,
    frame: int = FrameOpt,
    axis: str = AxisOpt,
    slice_index: Optional[int] = SliceOpt,
) -> None:
    """Image-to-image: virtual staining, super-resolution, contrast translation, counterfactuals."""
    _check_output(out)
    pipe = _load_pipeline(model, device, dtype, _read_options(window, frame, axis, slice_index))
    try:
        result = pipe.edit(
            images, instruction, height=height, width=width, seed=seed, analyze=analyze, think=think, explain=explain,
            progress=_denoise_progress("denoising"),
            **_sampler_options(steps, cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min, timestep_shift),
        )
        path = result.save(out)
    except _user_errors() as e:
        _fail(str(e))
    if result.analysis:
        typer.secho(f"analysis: {result.analysis}", dim=True)
    if result.explanation:
        typer.echo(f"explanation: {result.explanation}")
    typer.echo(f"wrote {path} ({result.image.size[0]}x{result.image.size[1]}, synthetic, seed {seed})")


CHAT_HELP = "commands: /image PATH (attach to the next question), /reset (new conversation), /quit"


@app.command()
def chat(
    model: Optional[Path] = ModelOpt,
    image: list[Path] = typer.Option(None, "--image", help="Image(s) attached to the first question."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    think: bool = typer.Option(False, "--think"),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    temperature: float = typer.Option(0.1, "--temperature"),
    seed: int = SeedOpt,
    window: Optional[str] = WindowOpt,
    frame: int = FrameOpt,
    axis: str = AxisOpt,
    slice_index: Optional[int] = SliceOpt,
) -> None:
    """An interactive multi-turn conversation about images; earlier turns are never recomputed."""
    pipe = _load_pipeline(model, device, dtype, _read_options(window, frame, axis, slice_index), visual_gen=False)
    conversation = pipe.chat(think=think)
    pending: list = list(image or [])
    typer.echo(CHAT_HELP)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            conversation, pending = pipe.chat(think=think), []
            typer.echo("(new conversation)")
            continue
        if line.startswith("/image"):
            path = Path(line[len("/image"):].strip())
            if not path.is_file():
                typer.secho(f"error: {path}: no such image file", fg=typer.colors.RED, err=True)
            else:
                pending.append(path)
                typer.echo(f"(attached {path.name} to the next question)")
            continue
        if line.startswith("/"):
            typer.echo(CHAT_HELP)
            continue
        try:
            stream = conversation.ask(line, pending, stream=True, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
            typer.echo("model> ", nl=False)
            for piece in stream:
                typer.echo(piece, nl=False)
            typer.echo()
            pending = []
        except _user_errors() as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)


# ---- training --------------------------------------------------------------------------------


@app.command()
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
                                                            help="Recompute decoder layers in backward (default: the plan's)."),
    tensorboard: bool = typer.Option(True, "--tensorboard/--no-tensorboard", help="Also log to RUN/tensorboard (when tensorboard is installed)."),
    device: str = DeviceOpt,
) -> None:
    """Train through a curriculum plan: one process, or N under torchrun (FSDP2; gloo on CPUs)."""
    from .formats.checkpoint import CheckpointError
    from .config import ConfigError
    from .tokenizer import TokenizerError
    from .training.distributed import init_from_env
    from .training.plan import PlanError, load_plan, with_overrides
    from .training.start import TrainingProgress, initial_model
    from .training.trainer import Trainer

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
        _fail(str(e))
    if dist_ctx.is_main:
        typer.echo(f"trained to step {result.global_step}; last checkpoint {result.checkpoint}; metrics {result.metrics}")
    if dist_ctx.enabled:
        import torch.distributed as dist

        dist.destroy_process_group()


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A training checkpoint folder, or a run folder (its latest checkpoint)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder in the official layout."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16 or fp32 for the stored tensors (default: as trained)."),
) -> None:
    """Export a training checkpoint to the official layout (ema/model/ae safetensors, configs, tokenizer)."""
    from .formats.checkpoint import CheckpointError
    from .precision import DTYPES
    from .training.export import export_checkpoint

    if dtype is not None and dtype not in DTYPES:
        _fail(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    try:
        path = export_checkpoint(checkpoint, out, dtype=DTYPES[dtype] if dtype else None)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"exported to {path}")


# ---- data ----------------------------------------------------------------------------------

data_app = typer.Typer(no_args_is_help=True, help="Build training data from medical archives.")
app.add_typer(data_app, name="data")


@data_app.command("build")
def data_build(
    config: Path = typer.Argument(..., help="YAML build config (sources, splits, QC settings)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: shards/, manifest.json, README.md (the dataset card)."),
    workers: int = typer.Option(1, "--workers", "-w", help="Parallel worker processes."),
    num_partitions: int = typer.Option(1, "--num-partitions", help="Split the shards over this many machines/jobs."),
    partition: int = typer.Option(0, "--partition", help="Which partition this job builds (0-based)."),
) -> None:
    """Build (or resume) a dataset; a killed build restarted with the same command continues."""
    from tqdm import tqdm

    from .data.build_config import BuildConfigError, load_build_config
    from .data.builder import build

    try:
        cfg = load_build_config(config)
        bar: dict = {}

        def progress(counts: dict, done: int, total: int) -> None:
            if "bar" not in bar:
                bar["bar"] = tqdm(total=total, desc="shards", unit="shard")
            bar["bar"].update(1)
            bar["bar"].set_postfix(records=counts["records"], rejected=counts["rejections"])

        summary = build(cfg, out, workers=workers, num_partitions=num_partitions, partition=partition, progress=progress)
        if "bar" in bar:
            bar["bar"].close()
    except (BuildConfigError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    typer.echo(
        f"{summary['shards_built']} shards built, {summary['shards_skipped']} already complete, of {summary['shards_total']}"
        + ("; manifest and dataset card written" if summary["finalized"] else "; other partitions still to run")
    )


@data_app.command("demo")
def data_demo(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the staged sources, build.yaml and dataset/."),
    workers: int = typer.Option(1, "--workers", "-w"),
    per_label: int = typer.Option(12, "--per-label", help="Procedural images per label and modality."),
    max_side: int = typer.Option(64, "--max-side", help="Longest image side stored (the demo model works at 64 pixels)."),
) -> None:
    """Build the embedded demo corpus offline from packaged sample files and procedural images."""
    from .data.demo import build_demo_dataset

    try:
        summary = build_demo_dataset(out, per_label=per_label, max_side=max_side, workers=workers)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if summary["missing"]:
        typer.secho(f"skipped sources whose package is not installed: {', '.join(summary['missing'])}", fg=typer.colors.YELLOW, err=True)
    if summary["rebuilt"]:
        typer.echo(f"{out / 'dataset'} was built by another version of the demo: rebuilt it")
    manifest = summary["manifest"]
    families = {f: sum(n for m in mods.values() for n in m.values()) for f, mods in manifest["counts"].items()}
    typer.echo(f"demo dataset: {manifest['num_kept']} records {families} in {out / 'dataset'} "
               f"({summary['shards_built']} shards built, {summary['shards_skipped']} reused); card: {out / 'dataset' / 'README.md'}")


@data_app.command("score")
def data_score(
    dataset: Path = typer.Argument(..., help="A built dataset folder (with manifest.json)."),
    scorer: str = typer.Option(..., "--scorer", help="An image-text scorer: package.module:function or file.py:function, (image, text) -> float."),
    keep_fraction: float = typer.Option(0.5, "--keep-fraction", help="Share of records kept (the paper keeps the top 50%)."),
    per_modality: bool = typer.Option(True, "--per-modality/--global", help="Rank within each modality (default) or over all."),
) -> None:
    """Quality control stage 2: score image-text pairs with a local model and keep the top fraction."""
    from .data.curation import load_scorer, score_dataset

    try:
        result = score_dataset(dataset, load_scorer(scorer), keep_fraction, per_modality)
    except (FileNotFoundError, ValueError, ImportError) as e:
        _fail(str(e))
    typer.echo(f"scored {result['scored']} records, excluded {result['excluded']}; {result['kept']} kept")


@data_app.command("review-export")
def data_review_export(
    dataset: Path = typer.Argument(..., help="A built dataset folder."),
    out: Path = typer.Option(..., "--out", "-o", help="The HTML review sheet to write."),
    n: int = typer.Option(200, "--n", help="Samples, stratified by modality (the paper audits 200)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Quality control stage 3: export a self-contained HTML review sheet for expert reviewers."""
    from .data.curation import export_review

    try:
        count = export_review(dataset, out, n, seed)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"wrote {out} with {count} samples; reviewers download verdicts.json from the page")


@data_app.command("review-import")
def data_review_import(
    dataset: Path = typer.Argument(..., help="A built dataset folder."),
    verdicts: Path = typer.Argument(..., help="verdicts.json downloaded from a review sheet."),
) -> None:
    """Apply expert verdicts: rejected samples are excluded, with the reviewer's comment as reason."""
    from .data.curation import import_review

    try:
        result = import_review(dataset, verdicts)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as e:
        _fail(str(e))
    typer.echo(f"applied {result['reviewed']} verdicts: {result['rejected']} rejected in total, {result['kept']} kept")


@data_app.command("locate")
def data_locate(
    config: Path = typer.Argument(..., help="The build config the dataset was built from."),
    items: list[str] = typer.Argument(..., help="Item labels from the rejection logs (source/hash)."),
) -> None:
    """Map hashed item labels of the rejection logs back to files (on the machine with the sources)."""
    from .data.adapters import make_adapter
    from .data.adapters.base import item_label
    from .data.build_config import BuildConfigError, load_build_config

    try:
        cfg = load_build_config(config)
        wanted = set(items)
        for source in cfg.sources:
            if not any(w.startswith(source.name + "/") for w in wanted):
                continue
            for item in make_adapter(source, cfg.context).items():
                label = item_label(cfg.context, source, item)
                if label in wanted:
                    typer.echo(f"{label}\t{source.path / item.split('#')[0]}")
                    wanted.discard(label)
    except (BuildConfigError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    for label in sorted(wanted):
        typer.secho(f"{label}\tnot found among the current items of the sources", fg=typer.colors.YELLOW, err=True)


# ---- the embedded default ------------------------------------------------------------------


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run folder: dataset/, train/, model/, metrics.json, report.html."),
    preset: str = typer.Option("default", "--preset", help="default (about ten minutes on a 2-core CPU) or smoke (the path, in a minute or two)."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Dataset-build processes (default: the preset's)."),
    register_default: Optional[bool] = typer.Option(None, "--register-default/--no-register-default",
                                                    help="Make the trained model the default of ask/generate/serve (default: the preset's)."),
) -> None:
    """The main job: build the demo corpus, train the tiny model through the curriculum, evaluate it on held-out data."""
    from .demo import demo_preset, run_demo

    overrides = {k: v for k, v in (("workers", workers), ("register_default", register_default)) if v is not None}
    try:
        config = demo_preset(preset, **overrides)
        metrics = run_demo(out, config, echo=typer.echo)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))

    def f(v, digits=3):
        return "n/a" if v is None else f"{v:.{digits}f}"

    m = metrics
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


# ---- serving ---------------------------------------------------------------------------------


@app.command()
def serve(
    model: Optional[Path] = ModelOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Listen address; anything but loopback requires --api-key."),
    port: int = typer.Option(8000, "--port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="UNIMEDVL_API_KEY", help="Bearer key required on /v1, /metrics and /ui."),
    max_concurrency: int = typer.Option(1, "--max-concurrency", help="Requests running on the model at once."),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests waiting beyond those; more are refused with 429."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds a request may queue and run before it is cancelled (504)."),
    allow_files: list[Path] = typer.Option([], "--allow-files", help="Folder whose files image_url may name (repeatable); none by default."),
    max_image_side: int = typer.Option(1024, "--max-image-side", help="Largest generated width/height."),
    no_ui: bool = typer.Option(False, "--no-ui", help="Serve the API only."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
) -> None:
    """Serve the model: OpenAI-compatible HTTP API (/v1/...) and the web UI (/ui)."""
    import uvicorn

    from .serving import ServeConfig, create_app

    try:
        config = ServeConfig(host=host, port=port, api_key=api_key, max_concurrency=max_concurrency, max_queue=max_queue,
                             request_timeout_s=timeout, allowed_file_roots=tuple(allow_files), max_image_side=max_image_side, ui=not no_ui)
    except ValueError as e:
        _fail(str(e))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    pipe = _load_pipeline(model, device, dtype, _read_options(None, 0, "axial", None))
    application = create_app(pipe, config)
    typer.echo(f"serving {pipe.name} on http://{host}:{port}  (API: /v1, UI: /ui, docs: /docs)" + ("" if api_key else "  [no API key: loopback only]"))
    uvicorn.run(application, host=host, port=port, log_level="info", access_log=False)  # access lines could carry query strings


# ---- evaluation ------------------------------------------------------------------------------

eval_app = typer.Typer(no_args_is_help=True, help="Reproduce the paper's benchmarks and metrics, offline.")
app.add_typer(eval_app, name="eval")


@eval_app.command("vqa")
def eval_vqa(
    benchmark: str = typer.Option(..., "--benchmark", "-b", help="vqa-rad, slake, pathvqa, omnimedvqa or gmai-mmbench."),
    data: Path = typer.Option(..., "--data", help="The benchmark's local directory, as distributed."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: predictions.jsonl, results.json, scored.jsonl, results.md."),
    model: Optional[Path] = typer.Option(None, "--model", help="Run this checkpoint (resumable: answered ids are skipped)."),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help='Score this JSONL of {"id": ..., "prediction": ...} lines instead.'),
    batch_size: int = typer.Option(8, "--batch-size", help="Questions decoded together."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N questions (smoke runs)."),
    legacy_closed_quirk: bool = typer.Option(False, "--legacy-closed-quirk",
                                             help="LLaVA-Med closed accuracy with the original script's denominator quirk."),
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="OpenAI-compatible endpoint of a local judge, e.g. http://127.0.0.1:8001/v1."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="The judge model's name (required with --judge-url)."),
    judge_api_key: Optional[str] = typer.Option(None, "--judge-api-key", envvar="UNIMEDVL_JUDGE_API_KEY", help="Bearer key of the judge endpoint."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
) -> None:
    """Score or run one understanding benchmark; prints the results table."""
    from .evaluation import BENCHMARKS, evaluate_vqa
    from .evaluation.predictions import PredictionFileError

    if benchmark not in BENCHMARKS:
        _fail(f"--benchmark must be one of {list(BENCHMARKS)}, got {benchmark!r}")
    if (model is None) == (predictions is None):
        _fail("give exactly one of --model DIR or --predictions FILE")
    if (judge_url is None) != (judge_model is None):
        _fail("a judge needs both --judge-url and --judge-model (the report names the judge)")
    judge = None
    if judge_url is not None:
        from .evaluation.judge import ChatJudge

        judge = ChatJudge(judge_url, judge_model, api_key=judge_api_key)
    from .inference.inputs import ImageReadOptions

    pipe = _load_pipeline(model, device, dtype, ImageReadOptions(), visual_gen=False) if model is not None else None
    try:
        results = evaluate_vqa(benchmark, data, out, pipeline=pipe, predictions=predictions, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, limit=limit, legacy_closed=legacy_closed_quirk, judge=judge)
    except (PredictionFileError, *_user_errors()) as e:
        _fail(str(e))
    typer.echo((out / "results.md").read_text())
    if results["missing"]:
        typer.secho(f"{results['missing']} question(s) had no prediction and count as wrong (see results.json missing_ids)",
                    fg=typer.colors.YELLOW, err=True)


@eval_app.command("pixels")
def eval_pixels(
    generated: Path = typer.Option(..., "--generated", help="Folder of generated images."),
    reference: Path = typer.Option(..., "--reference", help="Folder of ground-truth images with the same file names."),
    task: str = typer.Option(..., "--task", help="staining (RGB), sr4x, t2_to_flair or flair_to_t2 (grayscale)."),
    out: Path = typer.Option(..., "--out", "-o"),
) -> None:
    """PSNR and SSIM of generated images against their references (interleaved tasks)."""
    from .evaluation.tasks import evaluate_pixels
    from .formats.medical_io import MedicalImageError

    try:
        evaluate_pixels(generated, reference, task, out)
    except (MedicalImageError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo((out / "results.md").read_text())


@eval_app.command("t2i")
def eval_t2i(
    prompts: Path = typer.Option(..., "--prompts", help="Prompt set: .parquet/.jsonl/.json/.csv with prompt, modality, image (the real one), id."),
    generated: Path = typer.Option(..., "--generated", help="Folder of generated images, <id>.png (filled first when --model is given)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: results.json, scored.jsonl, results.md, fid.png, biomedclip.png."),
    model: Optional[Path] = typer.Option(None, "--model", help="Generate the missing images with this checkpoint first (resumable)."),
    feature_weights: Optional[Path] = typer.Option(None, "--feature-weights", "--inception",
                                                   help="Local weights of the FID feature extractor, e.g. pt_inception-2015-12-05-6726825d.pth."),
    extractor: str = typer.Option("inception-v3-fid", "--extractor", help="Registered feature extractor for FID/KID."),
    biomedclip: Optional[Path] = typer.Option(None, "--biomedclip", help="Local BiomedCLIP folder (open_clip_pytorch_model.bin + open_clip_config.json)."),
    biomedclip_tokenizer: Optional[Path] = typer.Option(None, "--biomedclip-tokenizer", help="Folder with BiomedBERT's vocab.txt, if not in --biomedclip."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N prompts (smoke runs)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per feature-extraction batch."),
    height: Optional[int] = typer.Option(None, "--height", help="Default: the model's image size (1024 for the official weights)."),
    width: Optional[int] = typer.Option(None, "--width", help="Default: the model's image size."),
    steps: int = typer.Option(50, "--steps"),
    seed: int = SeedOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
) -> None:
    """Per-modality gFID/KID and BioMedCLIP score of text-to-image outputs, beside the paper's Table 2."""
    from .evaluation.features import FeatureWeightsError, load_feature_extractor
    from .evaluation.t2i import evaluate_t2i, generate_missing, load_prompts

    if feature_weights is None and biomedclip is None:
        _fail("give --feature-weights (FID/KID) and/or --biomedclip (BioMedCLIP score); nothing is downloaded")
    try:
        prompt_set = load_prompts(prompts)[:limit]  # limit None keeps all
        feats = load_feature_extractor(extractor, feature_weights, device) if feature_weights is not None else None
        clip = None
        if biomedclip is not None:
            from .evaluation.biomedclip import load_biomedclip

            clip = load_biomedclip(biomedclip, biomedclip_tokenizer, device)
    except (FeatureWeightsError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if model is not None:
        pipe = _load_pipeline(model, device, dtype, _read_options(None, 0, "axial", None))
        try:
            report = generate_missing(pipe, prompt_set, generated, height=height, width=width, steps=steps, seed=seed)
        except _user_errors() as e:
            _fail(str(e))
        typer.echo(f"generated {report['generated_now']} image(s), {report['already_present']} already present")
        if report["failed"]:
            typer.secho(f"{len(report['failed'])} prompt(s) could not be generated; they count as missing", fg=typer.colors.YELLOW, err=True)
    try:
        results = evaluate_t2i(prompt_set, generated, out, feature_extractor=feats, biomedclip=clip, batch_size=batch_size)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo((out / "results.md").read_text())
    if results["missing"]:
        typer.secho(f"{results['missing']} prompt(s) have no generated image (see results.json missing_ids)", fg=typer.colors.YELLOW, err=True)


@eval_app.command("counterfactual")
def eval_counterfactual(
    out: Path = typer.Option(..., "--out", "-o"),
    scores: Optional[Path] = typer.Option(None, "--scores", help="Classifier scores on generated images: rows of id, finding, score, label (0/1)."),
    explanations: Optional[Path] = typer.Option(None, "--explanations", help='JSONL of {"id", "prediction", "reference"} explanation texts.'),
    generated: Optional[Path] = typer.Option(None, "--generated", help="Folder of generated counterfactual images (for gFID)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Folder of real follow-up images (for gFID)."),
    feature_weights: Optional[Path] = typer.Option(None, "--feature-weights", "--inception", help="Local weights of the FID feature extractor."),
    extractor: str = typer.Option("inception-v3-fid", "--extractor"),
    threshold: float = typer.Option(0.5, "--threshold", help="Score at or above which a finding counts as present (F1)."),
    device: str = DeviceOpt,
) -> None:
    """Counterfactual check (AUROC/F1 of a classifier's scores), explanation text metrics and gFID, beside Table 7."""
    from .evaluation.counterfactual import evaluate_counterfactual
    from .evaluation.features import FeatureWeightsError, load_feature_extractor

    try:
        feats = load_feature_extractor(extractor, feature_weights, device) if feature_weights is not None else None
        evaluate_counterfactual(out, scores=scores, explanations=explanations, generated=generated, reference=reference,
                                feature_extractor=feats, threshold=threshold)
    except (FeatureWeightsError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo((out / "results.md").read_text())


@eval_app.command("reports")
def eval_reports(
    predictions: Path = typer.Option(..., "--predictions", help='JSONL of {"id", "prediction", "reference"} lines.'),
    out: Path = typer.Option(..., "--out", "-o"),
) -> None:
    """BLEU-1..4, METEOR, ROUGE-1 and ROUGE-L of generated reports or explanations."""
    from .evaluation.tasks import evaluate_reports

    try:
        evaluate_reports(predictions, out)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo((out / "results.md").read_text())


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
