"""What the command modules share: the error exit, the shared options, model resolution and
pipeline loading, progress display.  Heavy modules are imported inside the functions, so that
``unimedvl --help`` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn, Optional

import typer


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` in red on stderr and exit with ``code`` (2: a usage or input error)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def echo_results(out: Path) -> None:
    """Print the results table an evaluation wrote to ``out/results.md``."""
    typer.echo((out / "results.md").read_text())


# ---- shared options --------------------------------------------------------------------------

ModelOpt = typer.Option(None, "--model", "-m", help="Checkpoint directory in the official layout (weights, configs, tokenizer); "
                        "default: $UNIMEDVL_MODEL, else the model `unimedvl demo` trained.")
DeviceOpt = typer.Option("cpu", "--device", help="torch device, e.g. cpu, cuda, cuda:1.")
DtypeOpt = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA as the official scripts, fp32 on CPUs), bf16 or fp32.")


def _quantize_help() -> str:
    from ..model.quantized import schemes_help  # the scheme table (torch is loaded with the package anyway)

    return (f"Weight-only quantisation of the decoder, ViT and connector linear layers while loading: {schemes_help()}. "
            "A scheme the device cannot run is refused, naming what to use instead.")


QuantizeOpt = typer.Option(None, "--quantize", help=_quantize_help())
CompileOpt = typer.Option(
    False, "--compile",
    help="Run the denoising steps compiled (torch.compile fuses the element-wise work around the matrix products). "
         "Needs a C++ compiler on CPUs; the first image of each size waits for the compilation (about half a minute on a small CPU).",
)
DeviceMapOpt = typer.Option(None, "--device-map", help="Place the model over several devices instead of --device: auto "
                            "(whole decoder layers in order over the --max-memory budgets, or the free memory of each GPU then "
                            "the CPU) or a JSON plan file {module prefix: device} (unimedvl info --device-map ... --json writes one).")
MaxMemoryOpt = typer.Option(None, "--max-memory", help="Budgets of --device-map auto, in placement order, e.g. "
                            "cuda:0=20GiB,cpu=64GiB (implies --device-map auto).")
WindowOpt = typer.Option(None, "--window", help="DICOM window: a preset (lung, mediastinum, bone, brain, abdomen) or CENTER,WIDTH; default: the file's own.")
FrameOpt = typer.Option(0, "--frame", help="DICOM multi-frame: frame index.")
AxisOpt = typer.Option("axial", "--axis", help="NIfTI: slicing axis: sagittal, coronal, axial, or 0/1/2 (RAS voxel axes: 0 sagittal, 1 coronal, 2 axial).")
SliceOpt = typer.Option(None, "--slice", help="NIfTI: slice index along --axis (default: the middle slice).")
SeedOpt = typer.Option(42, "--seed", help="Seed of every random draw; the same seed gives the same output.")
MaxNewTokensOpt = typer.Option(512, "--max-new-tokens")

# image sampling: a preset, and single fields overriding it (None: the preset's value)
PresetOpt = typer.Option(None, "--preset", help="Sampler preset: driver, bagel-t2i, unimedvl-edit or evaluation "
                         "(default: driver for text-to-image, unimedvl-edit for editing; see unimedvl presets).")
StepsOpt = typer.Option(None, "--steps", help="Number of timesteps, steps - 1 model evaluations (default: the preset's, 50).")
CfgTextScaleOpt = typer.Option(None, "--cfg-text-scale", help="Text guidance scale (default: the preset's).")
CfgImgScaleOpt = typer.Option(None, "--cfg-img-scale", help="Image guidance scale (default: the preset's).")
CfgIntervalOpt = typer.Option(None, "--cfg-interval", help="Guidance is on for t in (LO, HI] (default: the preset's).")
CfgRenormTypeOpt = typer.Option(None, "--cfg-renorm-type", help="global, channel or text_channel (default: the preset's).")
CfgRenormMinOpt = typer.Option(None, "--cfg-renorm-min")
TimestepShiftOpt = typer.Option(None, "--timestep-shift")
# step caching: a cache name and single fields overriding it
CacheOpt = typer.Option(None, "--cache", help="Step caching: none, taylorseer, taylorseer-fast or taylorseer-safe "
                        "(forecast skipped steps' velocities, every guidance branch on its own; default: none; see unimedvl presets).")
CacheIntervalOpt = typer.Option(None, "--cache-interval", help="One full forward every N steps (default: the cache's).")
CacheOrderOpt = typer.Option(None, "--cache-order", help="Forecast order, 0-3 (default: the cache's, 1).")
CacheWarmupOpt = typer.Option(None, "--cache-warmup", help="First steps always computed (default: the cache's).")
CacheFinalOpt = typer.Option(None, "--cache-final", help="Last steps always computed (default: the cache's).")


def sampler_options(preset, steps, cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min, timestep_shift,
                    cache=None, cache_interval=None, cache_order=None, cache_warmup=None, cache_final=None) -> dict:
    """The preset name plus the overrides given on the command line (``None``: the preset's value),
    as keyword arguments of ``generate_image`` / ``edit``.  ``--cache-*`` fields override ``--cache``
    (without it: the default cache of :func:`~unimedvl.inference.step_cache.step_cache`)."""
    fields = {k: v for k, v in dict(interval=cache_interval, order=cache_order, warmup=cache_warmup, final=cache_final).items() if v is not None}
    if fields:
        cache = {**({"preset": cache} if cache else {}), **fields}
    return dict(preset=preset, steps=steps, cfg_text_scale=cfg_text_scale, cfg_img_scale=cfg_img_scale,
                cfg_interval=tuple(cfg_interval) if cfg_interval is not None else None, cfg_renorm_type=cfg_renorm_type,
                cfg_renorm_min=cfg_renorm_min, timestep_shift=timestep_shift, cache=cache)


# ---- inputs ----------------------------------------------------------------------------------


def read_options(window: Optional[str] = None, frame: int = 0, axis: str = "axial", slice_index: Optional[int] = None):
    """The image read options of ``--window/--frame/--axis/--slice`` (``--window`` a preset name or CENTER,WIDTH)."""
    import math

    from ..formats.medical_io import AXIS_CHOICES, WINDOW_PRESETS
    from ..inference import ImageReadOptions

    parsed = window
    if window and "," in window:
        try:
            center, width = (float(v) for v in window.split(","))
        except ValueError:
            fail(f"--window {window!r}: expected a preset name or CENTER,WIDTH (two numbers)")
        if not (math.isfinite(center) and math.isfinite(width)) or width < 1:
            fail(f"--window {window!r}: CENTER must be a finite number and WIDTH a finite number >= 1")
        parsed = (center, width)
    elif window is not None and window.lower() not in WINDOW_PRESETS:
        fail(f"--window {window!r}: expected a preset ({', '.join(WINDOW_PRESETS)}) or CENTER,WIDTH")
    if frame < 0:
        fail(f"--frame {frame}: expected a frame index >= 0")
    if slice_index is not None and slice_index < 0:
        fail(f"--slice {slice_index}: expected a slice index >= 0")
    if axis.strip().lower() not in AXIS_CHOICES:
        fail(f"--axis {axis!r}: expected sagittal, coronal, axial or 0, 1, 2")
    return ImageReadOptions(window=parsed, frame=frame, axis=axis.strip().lower(), slice_index=slice_index)


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input (model folder, config, image, tokenizer, values): reported, not traced."""
    from ..config import ConfigError
    from ..formats.checkpoint import CheckpointError
    from ..formats.medical_io import MedicalImageError
    from ..tokenizer import TokenizerError

    return (CheckpointError, ConfigError, MedicalImageError, TokenizerError, ValueError, RuntimeError, FileNotFoundError)


# ---- the model -------------------------------------------------------------------------------


def resolve_model(model: Optional[Path]) -> Path:
    """``--model``, else the default model, announced on stderr so nobody mistakes it for real weights."""
    if model is not None:
        return model
    from ..inference.default_model import resolve_default_model

    found = resolve_default_model()
    if found is None:
        fail("no --model given and no default model: pass --model DIR (the official UniMedVL weights), "
             "or run `unimedvl demo` to train the tiny demo model")
    directory, why = found
    typer.secho(f"no --model given: using {directory} ({why}); pass --model DIR for the official weights",
                fg=typer.colors.CYAN, err=True)
    return directory


def load_pipeline(model: Optional[Path], device: str, dtype: str, read_options, visual_gen: bool = True,
                  quantize: Optional[str] = None, device_map: Optional[str] = None, max_memory: Optional[str] = None,
                  compile: bool = False):
    """The pipeline of ``--model`` (or the default model), loaded under a status spinner; user errors exit 2.
    ``--device-map``/``--max-memory`` place it over several devices (the plan is printed on stderr)."""
    from ..inference import UniMedVLPipeline

    model = resolve_model(model)
    try:
        with status(f"loading {model}"):
            pipe = UniMedVLPipeline.from_pretrained(model, device=device, dtype=dtype, visual_gen=visual_gen, quantize=quantize,
                                                    read_options=read_options, device_map=device_map, max_memory=max_memory,
                                                    compile=compile)
    except user_errors() as e:
        fail(str(e))
    if pipe.placement is not None:
        typer.secho(pipe.placement.plan.describe(), fg=typer.colors.CYAN, err=True)
    return pipe


# ---- progress --------------------------------------------------------------------------------


def status(message: str):
    """A spinner with ``message`` on stderr, as a context manager."""
    from rich.console import Console

    return Console(stderr=True).status(message)


def progress_bar(desc: str, unit: str = "step"):
    """A tqdm bar fed by ``progress(step, total)`` callbacks (the pipeline's denoising progress):
    opened at the first call, closed when ``step == total``."""
    from tqdm import tqdm

    state: dict = {}

    def update(step: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc=desc, unit=unit, leave=False)
        state["bar"].update(step - state["bar"].n)
        if step == total:
            state["bar"].close()

    return update
