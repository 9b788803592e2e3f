"""Replay a reference fixture (``fixtures/FORMAT.md``) and compare every recorded output.

A fixture is a tiny model in the official layout plus ``golden/reference_outputs.{safetensors,json}``
recorded from the reference implementation under two precision policies (``fp32``, ``bf16``).
Everything - dimensions, prompts, image sizes, guidance settings, seeds - is read from the
fixture; the recorded random draws are reused, never redrawn.

Experiments: ``vqa`` (ViT, connector, teacher-forced logits, greedy ids), ``flow_step`` (one
velocity with and without guidance), ``t2i`` and ``edit`` (multi-step guided sampling and decode),
``vae`` (encode / decode).  Inputs are checked too: our tokenizer must reproduce the recorded ids
and our transforms the recorded resized images.

Tolerances are those recommended in FORMAT.md section 6, with one reading made explicit: FORMAT
states the logits' ``max_abs <= 3e-2`` (fp32 policy) beside ``rel_l2 <= 5e-3`` as measured on
fixture A, whose reference logits have an RMS of 1.0033.  An absolute bound on logits only means
something relative to their scale (an independent float32 implementation's error grows with the
logits, as FORMAT's relative metrics do), so the bound applied is
``max_abs <= 3e-2 * max(1, rms(reference logits) / 1.0034)``: identical to FORMAT's number on logits
of A's scale or smaller, proportionally larger on a trained model whose logits are larger.  The
scale used is printed in the row's note; every other tolerance is FORMAT's as written.

Inputs always come from the recording: a fixture that is an exported model with its own inference
transforms (``unimedvl_config.json``, e.g. a model trained at 64 pixels) is replayed with the
resize rules the fixture recorded (``recipe``: FORMAT.md section 3), not the model's, and the
replay says so in a note.  A model that cannot replay a fixture at all (other hidden size,
vocabulary, latent channels, ...) raises :class:`FixtureMismatch` naming what differs, before any
experiment runs; a shape error inside an experiment is reported the same way, never as a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from ..config import InferenceTransforms
from ..flow import combine_guidance
from ..formats.checkpoint import load_pretrained
from ..precision import DTYPES
from ..image_transforms import ImageTransform, normalize_u8, to_uint8_image
from ..inference import UniMedVLPipeline
from ..inference.sampling import velocities
from ..model.layers import grid_position_ids
from ..model.patching import patchify

POLICY_DTYPES = {name: DTYPES[name] for name in ("fp32", "bf16")}  # the fixtures' precision policies


@dataclass(frozen=True)
class Tolerance:
    rel_l2: float | None = None  # ||ours - ref|| / ||ref||
    cos: float | None = None  # minimum cosine similarity over all elements
    max_abs: float | None = None
    mean_levels: float | None = None  # images: mean |difference| in uint8 levels
    max_levels: float | None = None  # images: max |difference| in uint8 levels
    exact: bool = False  # integers: identical

    def describe(self) -> str:
        parts = []
        if self.exact:
            parts.append("exact")
        for name, label in (("rel_l2", "rel_l2<="), ("max_abs", "max_abs<="), ("mean_levels", "mean<="), ("max_levels", "max<=")):
            v = getattr(self, name)
            if v is not None:
                parts.append(f"{label}{v:g}")
        if self.cos is not None:
            parts.append(f"cos>={self.cos:g}")
        return " ".join(parts)


# FORMAT.md section 6, "recommended" columns.  Keyed by output name, then policy.
TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "vit": {"fp32": Tolerance(rel_l2=3e-3, cos=0.99999), "bf16": Tolerance(rel_l2=2.5e-2)},
    "logits": {"fp32": Tolerance(rel_l2=5e-3, max_abs=3e-2), "bf16": Tolerance(rel_l2=2.5e-2)},
    "velocity": {"fp32": Tolerance(rel_l2=1e-2, cos=0.9999), "bf16": Tolerance(rel_l2=2.5e-2)},
    "velocity_cfg": {"fp32": Tolerance(rel_l2=5e-2, cos=0.999), "bf16": Tolerance(rel_l2=1e-1)},
    "velocity_step": {"fp32": Tolerance(rel_l2=6e-2), "bf16": Tolerance(rel_l2=1e-1)},
    "final_latent": {"fp32": Tolerance(rel_l2=4e-2, cos=0.9995), "bf16": Tolerance(rel_l2=6e-2)},
    "image": {"fp32": Tolerance(mean_levels=1.5, max_levels=16), "bf16": Tolerance(mean_levels=2.5, max_levels=32)},
    "vae": {"fp32": Tolerance(rel_l2=1e-4), "bf16": Tolerance(rel_l2=1e-1)},
    "vae_u8": {"fp32": Tolerance(max_levels=1), "bf16": Tolerance(mean_levels=2.5)},
}
# RMS of fixture A's reference logits (1.0033 fp32, 1.0030 bf16, rounded up), the scale at which FORMAT measured max_abs
FORMAT_LOGIT_RMS = 1.0034
GREEDY_MARGIN = {"fp32": 0.03, "bf16": 0.1}  # steps whose golden top-1 margin is below may flip
EXACT = Tolerance(exact=True)
RESIZE = Tolerance(max_levels=1)  # resized inputs: identical up to a PIL rounding difference


@dataclass
class ParityRow:
    name: str
    ok: bool
    tolerance: str
    max_abs: float = float("nan")
    rel_l2: float = float("nan")
    cos: float = float("nan")
    note: str = ""

    def format(self) -> str:
        def f(x: float) -> str:
            return "-" if math.isnan(x) else f"{x:.3g}"

        return (
            f"{'ok  ' if self.ok else 'FAIL'} {self.name:<40} max_abs={f(self.max_abs):<9} rel={f(self.rel_l2):<9} "
            f"cos={f(self.cos):<9} tol: {self.tolerance}{'  ' + self.note if self.note else ''}"
        )


def compare(name: str, ours: torch.Tensor, ref: torch.Tensor, tol: Tolerance, note: str = "") -> ParityRow:
    """Compare two tensors of the same shape under ``tol``."""
    if tuple(ours.shape) != tuple(ref.shape):
        return ParityRow(name, False, tol.describe(), note=f"shape {list(ours.shape)} != reference {list(ref.shape)}")
    a, b = ours.detach().to(torch.float64).cpu().flatten(), ref.detach().to(torch.float64).cpu().flatten()
    diff = a - b
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    mean_abs = float(diff.abs().mean()) if diff.numel() else 0.0
    ref_norm = float(b.norm())
    rel = float(diff.norm()) / ref_norm if ref_norm > 0 else float(diff.norm())
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0)) if ref_norm > 0 and float(a.norm()) > 0 else float("nan")
    ok = True
    if tol.exact:
        ok &= max_abs == 0
    if tol.rel_l2 is not None:
        ok &= rel <= tol.rel_l2
    if tol.cos is not None:
        ok &= cos >= tol.cos
    if tol.max_abs is not None:
        ok &= max_abs <= tol.max_abs
    if tol.mean_levels is not None:
        ok &= mean_abs <= tol.mean_levels
        note = (note + " " if note else "") + f"mean={mean_abs:.3g}"
    if tol.max_levels is not None:
        ok &= max_abs <= tol.max_levels
    return ParityRow(name, bool(ok), tol.describe(), max_abs, rel, cos, note)


class FixtureMismatch(ValueError):
    """A fixture's recording cannot be replayed on a model (dimensions differ)."""


class Fixture:
    """A fixture directory: model files + ``golden/reference_outputs.{safetensors,json}``."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        golden = self.dir / "golden"
        for name in ("reference_outputs.safetensors", "reference_outputs.json"):
            if not (golden / name).is_file():
                raise FileNotFoundError(f"{self.dir}: not a fixture, golden/{name} is missing")
        self.meta = json.loads((golden / "reference_outputs.json").read_text())
        self.tensors = load_file(str(golden / "reference_outputs.safetensors"))
        self.aliases: dict[str, str] = self.meta.get("aliases", {})

    @property
    def policies(self) -> list[str]:
        return [p for p in self.meta.get("policies", {}) if p in POLICY_DTYPES]

    def has(self, key: str) -> bool:
        return key in self.tensors or key in self.aliases

    def get(self, key: str) -> torch.Tensor:
        if key in self.tensors:
            return self.tensors[key]
        if key in self.aliases:
            return torch.from_numpy(self.image_u8(self.aliases[key]))
        raise KeyError(f"{self.dir}: no recorded tensor {key!r}")

    def image_u8(self, filename: str) -> np.ndarray:
        return np.array(self.image(filename).convert("RGB"))

    def image(self, filename: str = "test_image.png") -> Image.Image:
        with Image.open(self.dir / filename) as im:
            im.load()
            return im.copy()

    def info(self, policy: str, experiment: str) -> dict:
        return self.meta.get(f"{policy}.{experiment}.info", {})

    def experiments(self, policy: str) -> list[str]:
        prefix = f"{policy}."
        names = {k[len(prefix):].split(".")[0] for k in self.tensors if k.startswith(prefix)}
        return [e for e in ("vqa", "flow_step", "t2i", "edit", "vae") if e in names]


def _transform(spec) -> ImageTransform:
    if isinstance(spec, dict):
        return ImageTransform(spec["max_image_size"], spec["min_image_size"], spec["image_stride"], spec.get("max_pixels", ImageTransform(1, 1, 1).max_pixels))
    return ImageTransform(*spec)


def _u8(t: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.asarray(t)) if not isinstance(t, torch.Tensor) else t


# ---- experiments -----------------------------------------------------------------------------


def check_inputs(fx: Fixture, tokenizer) -> Iterator[ParityRow]:
    """Our tokenizer and transforms reproduce the recorded replay inputs."""
    prompts = fx.meta.get("prompts", {})
    for exp, key in (("vqa", "inputs.vqa_text_ids"), ("t2i", "inputs.t2i_text_ids"), ("edit", "inputs.edit_text_ids")):
        if exp in prompts and fx.has(key) and tokenizer is not None:
            ours = torch.tensor(tokenizer.encode_segment(prompts[exp]))
            ref = fx.get(key)
            yield compare(f"{key} (tokenizer)", ours, ref, EXACT) if ours.shape == ref.shape else ParityRow(
                f"{key} (tokenizer)", False, "exact", note=f"{len(ours)} ids vs {len(ref)} recorded"
            )
    recipe = fx.meta.get("recipe", {})
    image = fx.image()
    if fx.has("inputs.vqa_vit_input_u8") and "vqa_transform" in recipe:
        ours = np.asarray(_transform(recipe["vqa_transform"]).resize(image))
        yield compare("inputs.vqa_vit_input_u8 (transform)", torch.from_numpy(ours.copy()), fx.get("inputs.vqa_vit_input_u8"), RESIZE)
    if "gen_vae_transform" in recipe:
        vae_image = _transform(recipe["gen_vae_transform"]).resize(image)
        for key in ("inputs.vae_input_u8", "inputs.edit_vae_input_u8_0"):
            if fx.has(key):
                yield compare(f"{key} (transform)", torch.from_numpy(np.array(vae_image)), fx.get(key), RESIZE)
        if fx.has("inputs.edit_vit_input_u8_0") and "gen_vit_transform" in recipe:
            ours = np.asarray(_transform(recipe["gen_vit_transform"]).resize(vae_image))
            yield compare("inputs.edit_vit_input_u8_0 (transform)", torch.from_numpy(ours.copy()), fx.get("inputs.edit_vit_input_u8_0"), RESIZE)


def logits_tolerance(policy: str, ref_logits: torch.Tensor) -> tuple[Tolerance, str]:
    """FORMAT's logits tolerance with its ``max_abs`` taken relative to the logits' scale (module
    docstring): unchanged up to A's scale, multiplied by ``rms / FORMAT_LOGIT_RMS`` above it."""
    tol = TOLERANCES["logits"][policy]
    if tol.max_abs is None:
        return tol, ""
    rms = float(ref_logits.double().pow(2).mean().sqrt())
    factor = max(1.0, rms / FORMAT_LOGIT_RMS)
    if factor == 1.0:
        return tol, ""
    return dataclasses.replace(tol, max_abs=tol.max_abs * factor), f"; max_abs scaled x{factor:.3g} (logits rms {rms:.3g})"


def run_vqa(fx: Fixture, policy: str, pipe: UniMedVLPipeline) -> Iterator[ParityRow]:
    engine = pipe.engine
    model, p = engine.model, f"{policy}.vqa."
    info = fx.info(policy, "vqa")
    pixels = normalize_u8(_u8(fx.get("inputs.vqa_vit_input_u8")).numpy())
    ps = model.config.vit.patch_size
    patches = patchify(pixels, ps)
    pos = grid_position_ids(pixels.shape[1] // ps, pixels.shape[2] // ps, model.config.vit_grid)
    with torch.no_grad():
        vit_out = model.vit_features(patches.to(model.device), pos.to(model.device), [patches.shape[0]])
        conn_out = model.connector(vit_out)
    yield compare(p + "vit_output", vit_out, fx.get(p + "vit_output"), TOLERANCES["vit"][policy])
    yield compare(p + "connector_output", conn_out, fx.get(p + "connector_output"), TOLERANCES["vit"][policy])

    ctx = engine.new_context()
    engine.add_vit_image(ctx, pixels)
    engine.add_token_ids(ctx, fx.get("inputs.vqa_text_ids").tolist())
    layout_ok = True
    note = f"kv_len={ctx.length} rope={ctx.rope}"
    if "kv_len_after_prefill" in info:
        layout_ok &= ctx.length == info["kv_len_after_prefill"][0]
    if "start_token_position_id" in info:
        layout_ok &= ctx.rope == info["start_token_position_id"]
    yield ParityRow(p + "sequence_layout", layout_ok, "exact", note=note)

    golden_ids = fx.get(p + "greedy_ids").tolist()
    gen = engine.generate_text(ctx, len(golden_ids), forced_ids=golden_ids)
    ref_logits = fx.get(p + "logits").float()
    tol, scale_note = logits_tolerance(policy, ref_logits)
    rows = [compare("", gen.logits[i], ref_logits[i], tol) for i in range(len(golden_ids))]
    worst = max(rows, key=lambda r: r.rel_l2)
    yield ParityRow(
        p + "logits (teacher-forced, worst row)", all(r.ok for r in rows), tol.describe(),
        max(r.max_abs for r in rows), worst.rel_l2, min(r.cos for r in rows), note=f"{len(rows)} rows" + scale_note,
    )
    if fx.has(p + "logits_step0"):
        yield compare(p + "logits_step0", gen.logits[0], fx.get(p + "logits_step0"), tol, note=scale_note.lstrip("; "))
    margins = info.get("top1_minus_top2_logit_margin", [float("inf")] * len(golden_ids))
    ours = gen.logits.argmax(dim=-1).tolist()
    decisive = [i for i, m in enumerate(margins) if m >= GREEDY_MARGIN[policy]]
    wrong = [i for i in decisive if ours[i] != golden_ids[i]]
    flipped = [i for i in range(len(golden_ids)) if ours[i] != golden_ids[i] and i not in decisive]
    yield ParityRow(
        p + "greedy_ids", not wrong, f"identical where margin>={GREEDY_MARGIN[policy]}",
        note=f"{len(decisive) - len(wrong)}/{len(decisive)} decisive steps equal"
        + (f"; low-margin flips at {flipped}" if flipped else "") + (f"; differ at {wrong}" if wrong else ""),
    )


def _grid(engine, hw) -> tuple[int, int]:
    return engine.latent_grid(int(hw[0]), int(hw[1]))


def _text_context(engine, ids: list[int]):
    ctx = engine.new_context()
    engine.add_token_ids(ctx, ids)
    return ctx


def run_flow_step(fx: Fixture, policy: str, pipe: UniMedVLPipeline) -> Iterator[ParityRow]:
    engine = pipe.engine
    p, info = f"{policy}.flow_step.", fx.info(policy, "flow_step")
    defaults = fx.meta.get("recipe", {}).get("defaults", {}).get("flow_step", {})
    grid = _grid(engine, info.get("image_hw", fx.meta["recipe"]["t2i_hw"]))
    t = torch.tensor(float(info.get("t", defaults.get("t"))), dtype=torch.float32)
    scale = float(info.get("cfg_text_scale", defaults.get("cfg_text_scale", 4.0)))
    renorm_min = float(info.get("cfg_renorm_min", 0.0))
    ctx = _text_context(engine, fx.get("inputs.t2i_text_ids").tolist())
    v_c, v_u = velocities(engine, [ctx, engine.new_context()], fx.get("inputs.flow_step_x_t"), t, grid)
    yield compare(p + "v_cond", v_c, fx.get(p + "v_cond"), TOLERANCES["velocity"][policy])
    yield compare(p + "v_uncond_text", v_u, fx.get(p + "v_uncond_text"), TOLERANCES["velocity"][policy])
    for renorm in ("global", "text_channel"):
        key = p + f"v_cfg_{renorm}"
        if fx.has(key):
            v = combine_guidance(v_c, v_u, None, scale, 1.0, renorm, renorm_min)
            yield compare(key, v, fx.get(key), TOLERANCES["velocity_cfg"][policy])


def _sampler_kwargs(hyper: dict) -> dict:
    """The recorded sampler settings as keyword arguments of ``generate_image`` / ``edit`` (which validate them)."""
    return dict(
        steps=int(hyper["num_timesteps"]), timestep_shift=float(hyper["timestep_shift"]),
        cfg_text_scale=float(hyper["cfg_text_scale"]), cfg_img_scale=float(hyper.get("cfg_img_scale", 1.0)),
        cfg_interval=tuple(hyper.get("cfg_interval", (0.0, 1.0))), cfg_renorm_type=hyper.get("cfg_renorm_type", "global"),
        cfg_renorm_min=float(hyper.get("cfg_renorm_min", 0.0)),
    )


def _image_rows(fx: Fixture, policy: str, exp: str, result) -> Iterator[ParityRow]:
    p = f"{policy}.{exp}."
    if fx.has(p + "v_per_step"):
        ref = fx.get(p + "v_per_step")
        for k in range(ref.shape[0]):
            ours = result.velocities[k] if k < len(result.velocities) else torch.zeros_like(ref[k])
            yield compare(f"{p}v_per_step[{k}]", ours, ref[k], TOLERANCES["velocity_step"][policy])
    yield compare(p + "final_latent", result.latents, fx.get(p + "final_latent"), TOLERANCES["final_latent"][policy])
    image = torch.from_numpy(np.array(result.image))
    yield compare(p + "image_u8", image, fx.get(p + "image_u8"), TOLERANCES["image"][policy])


def run_t2i(fx: Fixture, policy: str, pipe: UniMedVLPipeline) -> Iterator[ParityRow]:
    """Text-to-image through the public API, with the recorded initial noise."""
    info = fx.info(policy, "t2i")
    h, w = (int(v) for v in info.get("image_hw", fx.meta["recipe"]["t2i_hw"]))
    result = pipe.generate_image(
        fx.meta["prompts"]["t2i"], height=h, width=w, noise=fx.get(f"{policy}.t2i.noise0"), **_sampler_kwargs(fx.meta["recipe"]["t2i"])
    )
    yield from _image_rows(fx, policy, "t2i", result)


def run_edit(fx: Fixture, policy: str, pipe: UniMedVLPipeline) -> Iterator[ParityRow]:
    """Editing through the public API (no understanding pre-pass, as recorded), with the recorded
    posterior sample of the input's encoding and initial noise."""
    info = fx.info(policy, "edit")
    h, w = (int(v) for v in info.get("image_hw", fx.meta["recipe"]["edit_hw"]))
    posterior = fx.get(f"{policy}.edit.noise0")
    result = pipe.edit(
        [fx.image()], fx.meta["prompts"]["edit"], height=h, width=w, analyze=False,
        posterior_noise=[posterior.reshape(posterior.shape[-3:])], noise=fx.get(f"{policy}.edit.noise1"),
        **_sampler_kwargs(fx.meta["recipe"]["edit"]),
    )
    yield from _image_rows(fx, policy, "edit", result)


def run_vae(fx: Fixture, policy: str, pipe: UniMedVLPipeline) -> Iterator[ParityRow]:
    p, vae = f"{policy}.vae.", pipe.model.vae_model
    pixels = normalize_u8(_u8(fx.get("inputs.vae_input_u8")).numpy())[None].to(pipe.model.device)
    tol = TOLERANCES["vae"][policy]
    with torch.no_grad():
        mean, logvar = vae.moments(pixels)
        yield compare(p + "encoder_moments", torch.cat([mean, logvar], dim=1), fx.get(p + "encoder_moments"), tol)
        z = vae.encode(pixels, fx.get(p + "posterior_noise"))
        yield compare(p + "z", z, fx.get(p + "z"), tol)
        decoded = vae.decode(z)
    yield compare(p + "decoded", decoded, fx.get(p + "decoded"), tol)
    yield compare(p + "decoded_u8", torch.from_numpy(to_uint8_image(decoded[0])), fx.get(p + "decoded_u8"), TOLERANCES["vae_u8"][policy])


EXPERIMENTS: dict[str, Callable[[Fixture, str, UniMedVLPipeline], Iterator[ParityRow]]] = {
    "vqa": run_vqa,
    "flow_step": run_flow_step,
    "t2i": run_t2i,
    "edit": run_edit,
    "vae": run_vae,
}


def recorded_transforms(fx: Fixture, current: InferenceTransforms) -> InferenceTransforms:
    """The resize rules the fixture was recorded with (its ``recipe``; FORMAT.md section 3 gives the
    official ones, which apply where the recipe is silent), keeping ``current``'s default size."""
    recipe, official = fx.meta.get("recipe", {}), InferenceTransforms()

    def rule(key: str, default: tuple[int, ...]) -> tuple[int, ...]:
        spec = recipe.get(key)
        if spec is None:
            return tuple(default)
        if isinstance(spec, dict):
            t = _transform(spec)
            return (t.max_size, t.min_size, t.stride, t.max_pixels)
        return tuple(int(v) for v in spec)

    return dataclasses.replace(
        current, understanding_vit=rule("vqa_transform", official.understanding_vit),
        generation_vit=rule("gen_vit_transform", official.generation_vit), generation_vae=rule("gen_vae_transform", official.generation_vae),
    )


def check_fit(fx: Fixture, policy: str, config, source: str) -> None:
    """Raise :class:`FixtureMismatch` when the recorded tensors cannot come from a model of ``config``."""
    problems = []

    def expect(key: str, axis: int, value: int, what: str) -> None:
        if fx.has(key):
            got = int(fx.get(key).shape[axis])
            if got != value:
                problems.append(f"{what} {value} (the fixture's {key} has {got})")

    p = f"{policy}."
    expect(p + "vqa.vit_output", -1, config.vit.hidden_size, "ViT hidden size")
    expect(p + "vqa.connector_output", -1, config.llm.hidden_size, "LLM hidden size")
    expect(p + "vqa.logits", -1, config.llm.vocab_size, "vocabulary size")
    latent_dim = config.latent_patch_size ** 2 * config.ae.z_channels
    expect(p + "flow_step.v_cond", -1, latent_dim, "latent token size")
    expect(p + "vae.z", 1, config.ae.z_channels, "autoencoder latent channels")
    if fx.has("inputs.vqa_vit_input_u8"):
        h, w = (int(v) for v in fx.get("inputs.vqa_vit_input_u8").shape[:2])
        ps, grid = config.vit.patch_size, config.vit_grid
        if h % ps or w % ps or h // ps > grid or w // ps > grid:
            problems.append(f"ViT patch {ps} / position grid {grid} (the recorded {h}x{w} understanding input does not fit)")
    if problems:
        raise FixtureMismatch(f"{fx.dir}: the model of {source} cannot replay this fixture: " + "; ".join(problems))


def replay(
    fixture_dir: str | Path,
    policies: list[str] | None = None,
    on_row: Callable[[ParityRow], None] | None = None,
    *,
    model_dir: str | Path | None = None,
    on_note: Callable[[str], None] | None = None,
) -> list[ParityRow]:
    """Replay every experiment of every policy of a fixture; returns one row per compared output.

    ``model_dir`` replays the fixture's recording on another model directory (default: the
    fixture's own model).  The recorded inputs and resize rules are used whatever the model's own
    inference transforms; ``on_note`` hears about such overrides.  Raises :class:`FixtureMismatch`
    when model and fixture do not fit."""
    fx = Fixture(fixture_dir)
    source = Path(model_dir) if model_dir is not None else fx.dir
    rows: list[ParityRow] = []

    def emit(row: ParityRow) -> None:
        rows.append(row)
        if on_row:
            on_row(row)

    policies = policies or fx.policies
    noted = False
    for policy in policies:
        if policy not in POLICY_DTYPES:
            raise ValueError(f"unknown precision policy {policy!r}; known: {sorted(POLICY_DTYPES)}")
        try:
            model, tokenizer = load_pretrained(source, dtype=POLICY_DTYPES[policy])
        except RuntimeError as e:  # a weight shape the config does not predict
            raise FixtureMismatch(f"{source}: the model cannot be loaded: {str(e).splitlines()[0]}") from e
        check_fit(fx, policy, model.config, str(source))
        recorded = recorded_transforms(fx, model.config.transforms)
        if recorded != model.config.transforms:
            if on_note and not noted:
                on_note(f"the model's own inference transforms {model.config.transforms.to_json()} are replaced by the fixture's "
                        f"recorded ones {recorded.to_json()} for the replay")
            noted = True
            model.config.transforms = recorded
        if policy == policies[0]:
            for row in check_inputs(fx, tokenizer):
                emit(row)
        pipe = UniMedVLPipeline(model, tokenizer, name=fx.dir.name)
        for exp in fx.experiments(policy):
            try:
                for row in EXPERIMENTS[exp](fx, policy, pipe):
                    emit(row)
            except (RuntimeError, ValueError) as e:
                if isinstance(e, FixtureMismatch):
                    raise
                raise FixtureMismatch(f"{fx.dir}: {policy}.{exp} cannot be replayed on the model of {source}: "
                                      f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        del pipe, model
    return rows
