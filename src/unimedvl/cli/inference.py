"""Inference commands: ``ask``, ``report``, ``generate``, ``edit``, ``chat`` and ``presets`` (the
sampler presets that ``generate``/``edit --preset`` name)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NoReturn, Optional

import typer

from .common import (
    AxisOpt,
    CfgImgScaleOpt,
    CfgIntervalOpt,
    CfgRenormMinOpt,
    CfgRenormTypeOpt,
    CfgTextScaleOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    MaxMemoryOpt,
    QuantizeOpt,
    FrameOpt,
    MaxNewTokensOpt,
    ModelOpt,
    PresetOpt,
    SeedOpt,
    SliceOpt,
    StepsOpt,
    TimestepShiftOpt,
    CacheOpt,
    CacheIntervalOpt,
    CacheOrderOpt,
    CacheWarmupOpt,
    CacheFinalOpt,
    CompileOpt,
    WindowOpt,
    fail,
    load_pipeline,
    progress_bar,
    read_options,
    sampler_options,
    user_errors,
)

# how an argument is named on the command line when its value is refused (default: --field-name)
_OPTION_NAMES = {"prompt": "PROMPT", "out": "--out"}


def _refuse(error) -> NoReturn:
    """Exit 2 with a :class:`~unimedvl.inference.presets.SettingError`, naming the option as typed."""
    fail(f"{_OPTION_NAMES.get(error.field, error.option)} {error.reason}")


def _check_decoding(temperature: float, top_p: float = 1.0, max_new_tokens: int = 1) -> None:
    """--temperature (finite, >= 0), --top-p (in (0, 1]) and --max-new-tokens (>= 1), before the model is loaded."""
    from ..inference.presets import SettingError, check_finite, check_whole

    try:
        check_finite("temperature", temperature, minimum=0)
        check_finite("top_p", top_p, above=0, maximum=1)
        check_whole("max_new_tokens", max_new_tokens, minimum=1)
    except SettingError as e:
        _refuse(e)


def _check_text(text: str, what: str) -> None:
    """The question/prompt/instruction is non-empty, valid UTF-8 text (argv bytes that were not
    UTF-8 arrive as lone surrogates), before the model is loaded."""
    from ..inference.pipeline import check_text
    from ..inference.presets import SettingError

    try:
        check_text(text, what)
    except SettingError as e:
        _refuse(e)
    except ValueError as e:  # empty
        fail(f"{_OPTION_NAMES.get(what, '--' + what)}: {e}")


def ask(
    images: list[Path] = typer.Argument(None, help="Images (PNG/JPEG/TIFF, DICOM, NIfTI), shown to the model in order."),
    question: str = typer.Option(..., "--question", "-q", help="The question."),
    model: Optional[Path] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    quantize: Optional[str] = QuantizeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    think: bool = typer.Option(False, "--think", help="Reason in <think> tags first; the reasoning is printed separately."),
    max_new_tokens: int = MaxNewTokensOpt,
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
    _check_text(question, "question")
    _check_decoding(temperature, top_p, max_new_tokens)
    pipe = load_pipeline(model, device, dtype, read_options(window, frame, axis, slice_index), visual_gen=False, quantize=quantize,
                         device_map=device_map, max_memory=max_memory)
    stream = stream and not as_json
    try:
        result = pipe.ask(images or [], question, think=think, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, seed=seed, stream=stream)
        if stream:
            for piece in result:
                typer.echo(piece, nl=False)
            typer.echo()
            return
    except user_errors() as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps({"answer": result.text, "thinking": result.thinking, "finished": result.finished}, indent=1))
        return
    if result.thinking:
        typer.secho(result.thinking, dim=True)
    typer.echo(result.text)


def report(
    image: Path = typer.Argument(..., help="The image to report on."),
    model: Optional[Path] = ModelOpt,
    modality: Optional[str] = typer.Option(None, "--modality", help='e.g. "chest X-ray"; default: the DICOM/NIfTI modality if any.'),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    quantize: Optional[str] = QuantizeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    max_new_tokens: int = MaxNewTokensOpt,
    temperature: float = typer.Option(0.1, "--temperature"),
    seed: int = SeedOpt,
    as_json: bool = typer.Option(False, "--json"),
    window: Optional[str] = WindowOpt,
    frame: int = FrameOpt,
    axis: str = AxisOpt,
    slice_index: Optional[int] = SliceOpt,
) -> None:
    """Write a findings / impression report for one image."""
    _check_decoding(temperature, max_new_tokens=max_new_tokens)
    pipe = load_pipeline(model, device, dtype, read_options(window, frame, axis, slice_index), visual_gen=False, quantize=quantize,
                         device_map=device_map, max_memory=max_memory)
    try:
        rep = pipe.report(image, modality, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    except user_errors() as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps({"modality": rep.modality, "findings": rep.findings, "impression": rep.impression, "text": rep.text}, indent=1))
    else:
        typer.echo(f"Findings: {rep.findings}\nImpression: {rep.impression}")


def _check_output(out: Path, overwrite: bool) -> None:
    """Refuse a bad --out before any model work: not .png/.dcm, a folder, a path under a file, an
    existing file without --overwrite, a folder that cannot be made or written to."""
    from ..inference.pipeline import check_output_path
    from ..inference.presets import SettingError

    if out.suffix.lower() not in (".png", ".dcm", ".dicom"):
        fail(f"--out {out}: use a .png or .dcm file name (both are marked synthetic)")
    try:
        check_output_path(out, overwrite=overwrite)
    except SettingError as e:
        _refuse(e)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--out {out}: cannot create the folder {parent} ({e.strerror or e})")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(f"--out {out}: the folder {parent} is not writable")


def _check_sampling(task: str, height: Optional[int], width: Optional[int], options: dict) -> None:
    """The sampler options (preset and overrides) and the sides given, before the model is loaded;
    the model's own size rule (multiples of its stride, its largest side) is checked once it is."""
    from ..inference.presets import SettingError, check_whole, sampler_settings

    try:
        for name, side in (("height", height), ("width", width)):
            if side is not None:
                check_whole(name, side, minimum=1)
        sampler_settings(task, **options)
    except SettingError as e:
        _refuse(e)
    except ValueError as e:  # an unknown preset
        fail(str(e))


def _save(result, out: Path, overwrite: bool) -> Path:
    """Write the image; --out is checked again (it may have appeared while the image was drawn)."""
    _check_output(out, overwrite)
    try:
        return result.save(out)
    except (*user_errors(), OSError) as e:
        fail(f"--out {out}: {e}")


def _wrote(path: Path, image, seed: int) -> None:
    typer.echo(f"wrote {path} ({image.size[0]}x{image.size[1]}, synthetic, seed {seed})")


def generate(
    prompt: str = typer.Argument(..., help="What to draw, e.g. 'Axial T2-weighted brain MRI, normal study.'"),
    out: Path = typer.Option(..., "--out", "-o", help="Output file: .png (metadata marks it synthetic) or .dcm (DICOM Secondary Capture)."),
    model: Optional[Path] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    quantize: Optional[str] = QuantizeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    compile: bool = CompileOpt,
    height: Optional[int] = typer.Option(None, "--height", help="Default: the model's image size (1024 for the official weights)."),
    width: Optional[int] = typer.Option(None, "--width", help="Default: the model's image size."),
    preset: Optional[str] = PresetOpt,
    steps: Optional[int] = StepsOpt,
    cfg_text_scale: Optional[float] = CfgTextScaleOpt,
    cfg_img_scale: Optional[float] = CfgImgScaleOpt,
    cfg_interval: Optional[tuple[float, float]] = CfgIntervalOpt,
    cfg_renorm_type: Optional[str] = CfgRenormTypeOpt,
    cfg_renorm_min: Optional[float] = CfgRenormMinOpt,
    timestep_shift: Optional[float] = TimestepShiftOpt,
    cache: Optional[str] = CacheOpt,
    cache_interval: Optional[int] = CacheIntervalOpt,
    cache_order: Optional[int] = CacheOrderOpt,
    cache_warmup: Optional[int] = CacheWarmupOpt,
    cache_final: Optional[int] = CacheFinalOpt,
    seed: int = SeedOpt,
    think: bool = typer.Option(False, "--think", help="Write a plan first and condition the image on it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists (without it an existing file is refused before any work)."),
) -> None:
    """Generate a medical image from text."""
    from ..inference.presets import SettingError

    _check_text(prompt, "prompt")
    _check_output(out, overwrite)
    options = sampler_options(preset, steps, cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min, timestep_shift,
                              cache, cache_interval, cache_order, cache_warmup, cache_final)
    _check_sampling("text-to-image", height, width, options)
    pipe = load_pipeline(model, device, dtype, read_options(), quantize=quantize,
                         device_map=device_map, max_memory=max_memory, compile=compile)
    try:
        result = pipe.generate_image(prompt, height=height, width=width, seed=seed, think=think, progress=progress_bar("denoising"), **options)
    except SettingError as e:
        _refuse(e)
    except user_errors() as e:
        fail(str(e))
    path = _save(result, out, overwrite)
    if result.thinking:
        typer.secho(result.thinking, dim=True)
    _wrote(path, result.image, seed)


def edit(
    images: list[Path] = typer.Argument(..., help="Input image(s): PNG/JPEG/TIFF, DICOM or NIfTI."),
    instruction: str = typer.Option(..., "--instruction", "-i", help="e.g. 'Translate this T2 slice to FLAIR.'"),
    out: Path = typer.Option(..., "--out", "-o", help="Output .png or .dcm (marked synthetic)."),
    model: Optional[Path] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    quantize: Optional[str] = QuantizeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    compile: bool = CompileOpt,
    height: Optional[int] = typer.Option(None, "--height", help="Default: the input's size after the generation resize rule."),
    width: Optional[int] = typer.Option(None, "--width"),
    preset: Optional[str] = PresetOpt,
    steps: Optional[int] = StepsOpt,
    cfg_text_scale: Optional[float] = CfgTextScaleOpt,
    cfg_img_scale: Optional[float] = CfgImgScaleOpt,
    cfg_interval: Optional[tuple[float, float]] = CfgIntervalOpt,
    cfg_renorm_type: Optional[str] = CfgRenormTypeOpt,
    cfg_renorm_min: Optional[float] = CfgRenormMinOpt,
    timestep_shift: Optional[float] = TimestepShiftOpt,
    cache: Optional[str] = CacheOpt,
    cache_interval: Optional[int] = CacheIntervalOpt,
    cache_order: Optional[int] = CacheOrderOpt,
    cache_warmup: Optional[int] = CacheWarmupOpt,
    cache_final: Optional[int] = CacheFinalOpt,
    seed: int = SeedOpt,
    analyze: bool = typer.Option(True, "--analyze/--no-analyze", help="The official understanding pre-pass appended to the instruction."),
    think: bool = typer.Option(False, "--think"),
    explain: bool = typer.Option(False, "--explain", help="Also print the model's text about the generated image."),
    window: Optional[str] = WindowOpt,
    frame: int = FrameOpt,
    axis: str = AxisOpt,
    slice_index: Optional[int] = SliceOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists (without it an existing file is refused before any work)."),
) -> None:
    """Image-to-image: virtual staining, super-resolution, contrast translation, counterfactuals."""
    from ..inference.presets import SettingError

    _check_text(instruction, "instruction")
    _check_output(out, overwrite)
    options = sampler_options(preset, steps, cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min, timestep_shift,
                              cache, cache_interval, cache_order, cache_warmup, cache_final)
    _check_sampling("image-to-image", height, width, options)
    pipe = load_pipeline(model, device, dtype, read_options(window, frame, axis, slice_index), quantize=quantize,
                         device_map=device_map, max_memory=max_memory, compile=compile)
    try:
        result = pipe.edit(images, instruction, height=height, width=width, seed=seed, analyze=analyze, think=think, explain=explain,
                           progress=progress_bar("denoising"), **options)
    except SettingError as e:
        _refuse(e)
    except user_errors() as e:
        fail(str(e))
    path = _save(result, out, overwrite)
    if result.analysis:
        typer.secho(f"analysis: {result.analysis}", dim=True)
    if result.explanation:
        typer.echo(f"explanation: {result.explanation}")
    _wrote(path, result.image, seed)


def chat(
    model: Optional[Path] = ModelOpt,
    image: list[Path] = typer.Option(None, "--image", help="Image(s) attached to the first question."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    quantize: Optional[str] = QuantizeOpt,
    device_map: Optional[str] = DeviceMapOpt,
    max_memory: Optional[str] = MaxMemoryOpt,
    think: bool = typer.Option(False, "--think"),
    max_new_tokens: int = MaxNewTokensOpt,
    temperature: float = typer.Option(0.1, "--temperature"),
    seed: int = SeedOpt,
    window: Optional[str] = WindowOpt,
    frame: int = FrameOpt,
    axis: str = AxisOpt,
    slice_index: Optional[int] = SliceOpt,
) -> None:
    """An interactive multi-turn conversation about images; earlier turns are never recomputed."""
    from ..inference.chat_repl import read_terminal_line, run_chat

    _check_decoding(temperature, max_new_tokens=max_new_tokens)
    pipe = load_pipeline(model, device, dtype, read_options(window, frame, axis, slice_index), visual_gen=False, quantize=quantize,
                         device_map=device_map, max_memory=max_memory)
    run_chat(pipe, read_line=read_terminal_line, write=typer.echo, error=lambda message: typer.secho(message, fg=typer.colors.RED, err=True),
             images=image or [], think=think, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
             recoverable=user_errors())


def presets(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """The sampler presets of generate/edit --preset and the step caches of --cache: their settings, the task each
    preset is the default of, and their sources."""
    import dataclasses

    from ..inference.presets import DEFAULT_PRESET, EVALUATION_PRESET, PRESET_SOURCES, SAMPLER_PRESETS, SamplerSettings
    from ..inference.step_cache import STEP_CACHE_PRESETS, STEP_CACHE_SOURCES, StepCache

    # as the --flags name them; the step cache has its own table (every preset leaves it off)
    settings_fields = [f.name for f in dataclasses.fields(SamplerSettings) if f.name not in ("name", "cache")]
    cache_fields = [f.name for f in dataclasses.fields(StepCache) if f.name not in ("name", "method")]
    caches = {name: {"method": c.method, **{f: getattr(c, f) for f in cache_fields}, "full_forwards_at_50_steps": c.full_steps(49),
                     "source": STEP_CACHE_SOURCES[name]} for name, c in STEP_CACHE_PRESETS.items()}
    rows = {}
    for name, settings in SAMPLER_PRESETS.items():
        fields = {field: getattr(settings, field) for field in settings_fields}
        fields["cfg_interval"] = list(fields["cfg_interval"])
        rows[name] = {**fields, "default_for": [task for task, preset in DEFAULT_PRESET.items() if preset == name],
                      "source": PRESET_SOURCES[name]}
    if as_json:
        typer.echo(json.dumps({"presets": rows, "defaults": DEFAULT_PRESET, "evaluation": EVALUATION_PRESET,
                               "step_caches": caches, "default_step_cache": "none"}, indent=1))
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # one column per preset, one row per setting, named by the flag that overrides it: fits 80 columns
    table = Table(title="Sampler presets (unimedvl generate / edit --preset NAME)", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("")
    for name in rows:
        table.add_column(name, justify="right", no_wrap=True)
    table.add_row("default for", *(", ".join(row["default_for"]) or "-" for row in rows.values()))
    for field in settings_fields:
        table.add_row("--" + field.replace("_", "-"), *(_setting(row[field]) for row in rows.values()))
    Console().print(table)
    typer.echo(f"unimedvl eval t2i uses {EVALUATION_PRESET} unless --preset is given. Sources:")
    for name, row in rows.items():
        typer.echo(f"  {name}: {row['source']}")
    table = Table(title="Step caches (generate / edit --cache NAME; default none)", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("")
    for name in caches:
        table.add_column(name, justify="right", no_wrap=True)
    for field in cache_fields:
        table.add_row("--cache-" + field, *(str(row[field]) for row in caches.values()))
    table.add_row("forwards of 49", *(str(row["full_forwards_at_50_steps"]) for row in caches.values()))
    Console().print(table)


def _setting(value) -> str:
    if isinstance(value, list):  # cfg_interval: guidance is on for t in (lo, hi]
        return f"({value[0]:g}, {value[1]:g}]"
    return f"{value:g}" if isinstance(value, float) else str(value)
