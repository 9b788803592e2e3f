"""Text-to-image evaluation (EVALUATION.md 4.1-4.2): per-modality gFID and KID against the real
images of the same prompts, and the BioMedCLIP score of each generated image with its prompt.

Prompt set: a ``.parquet``, ``.jsonl``, ``.json`` or ``.csv`` table with one row per prompt:

* ``prompt`` (or ``caption`` / ``text``), ``modality`` (the eight of Table 2, common aliases such
  as "fundus" or "X-ray" accepted; other values are scored under their own name but left out of
  the Average);
* ``image`` (or ``reference`` / ``image_path``): the real image - Parquet bytes (also the
  ``{"bytes": ...}`` struct of Hugging Face datasets), base64 text, or a path relative to the
  table's folder;
* ``id``: optional; the 0-based row index when absent.

Generated images are ``GENERATED/<id>.png`` (characters outside ``[A-Za-z0-9._-]`` in the id
become ``_``).  :func:`generate_missing` fills that folder from a pipeline, resumably.  Features
and embeddings are cached per image under ``OUT/feature_cache``.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..formats.atomic import write_json, write_text
from ..formats.tables import TableError, read_rows
from ..inference.presets import EVALUATION_PRESET
from .biomedclip import clip_score
from .features import FeatureCache, ImageSource
from .paper import BIOMEDCLIP, GFID, GFID_MEAN, MODALITIES

log = logging.getLogger(__name__)

MODALITY_ALIASES = {
    "cfp": "CFP", "fundus": "CFP", "color fundus": "CFP", "colour fundus": "CFP", "retina": "CFP",
    "cxr": "CXR", "x-ray": "CXR", "xray": "CXR", "chest x-ray": "CXR", "radiograph": "CXR",
    "ct": "CT", "computed tomography": "CT",
    "his": "HIS", "histopathology": "HIS", "pathology": "HIS", "histology": "HIS",
    "mri": "MRI", "mr": "MRI", "magnetic resonance": "MRI",
    "oct": "OCT", "optical coherence tomography": "OCT",
    "ultrasound": "Ultrasound", "us": "Ultrasound", "ultra.": "Ultrasound", "sonography": "Ultrasound",
    "endoscopy": "Endoscopy", "endo.": "Endoscopy", "endo": "Endoscopy", "colonoscopy": "Endoscopy",
}


class PromptFileError(TableError):
    pass


def canonical_modality(value: str) -> str:
    text = str(value).strip()
    return MODALITY_ALIASES.get(text.lower(), text)


def image_file_name(prompt_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", prompt_id) + ".png"


@dataclass
class T2IPrompt:
    id: str
    prompt: str
    modality: str
    reference: ImageSource


def _reference(value, table: Path, where: str) -> ImageSource:
    if isinstance(value, dict) and value.get("bytes"):
        data = bytes(value["bytes"])
        return ImageSource.from_bytes(data, f"{table}, {where}")
    if isinstance(value, dict) and value.get("path"):
        value = value["path"]
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
        return ImageSource.from_bytes(data, f"{table}, {where}")
    if isinstance(value, str) and value:
        path = Path(value) if Path(value).is_absolute() else table.parent / value
        if path.is_file():
            return ImageSource.from_path(path)
        if len(value) > 256:
            try:
                data = base64.b64decode(value, validate=True)
            except ValueError:
                raise PromptFileError(table, where, "image is neither a file nor base64 data") from None
            return ImageSource.from_bytes(data, f"{table}, {where}")
        raise PromptFileError(table, where, f"reference image {path} not found")
    raise PromptFileError(table, where, "no reference image (expected bytes, base64 text or a path in 'image')")


def _first(row: dict, keys: tuple[str, ...]):
    return next((row[k] for k in keys if row.get(k) not in (None, "")), None)


def load_prompts(path: str | Path) -> list[T2IPrompt]:
    """Read a prompt set; errors name the file and the line (or Parquet row)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        if not path.is_file():
            raise FileNotFoundError(f"{path}: prompt file not found")
        try:
            rows = [(f"row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise PromptFileError(path, None, f"not a readable Parquet file ({e})") from None
    else:
        rows = read_rows(path)
    prompts, seen = [], set()
    for index, (where, row) in enumerate(rows):
        if not isinstance(row, dict):
            raise PromptFileError(path, where, "expected an object per row")
        text = _first(row, ("prompt", "caption", "text"))
        modality = _first(row, ("modality",))
        if text is None or modality is None:
            raise PromptFileError(path, where, "expected non-empty 'prompt' (or 'caption') and 'modality'")
        pid = str(row["id"]) if row.get("id") not in (None, "") else str(index)
        if pid in seen:
            raise PromptFileError(path, where, f"duplicate id {pid!r}")
        seen.add(pid)
        ref = _reference(_first(row, ("image", "reference", "image_path")), path, str(where) if isinstance(where, str) else f"line {where}")
        prompts.append(T2IPrompt(pid, str(text), canonical_modality(modality), ref))
    if not prompts:
        raise PromptFileError(path, None, "no prompts")
    return prompts


def generate_missing(pipeline, prompts: list[T2IPrompt], generated: str | Path, *, height: int | None = None, width: int | None = None,
                     preset: str = EVALUATION_PRESET, seed: int = 42, progress: bool = True, **overrides) -> dict:
    """Generate ``GENERATED/<id>.png`` for every prompt without one, with the sampler ``preset``
    (default ``evaluation``: the protocol of EVALUATION.md 5, seed 42) and any field ``overrides``.
    Files are written atomically, so an interrupted run resumes where it stopped."""
    from tqdm.auto import tqdm

    generated = Path(generated)
    generated.mkdir(parents=True, exist_ok=True)
    todo = [p for p in prompts if not (generated / image_file_name(p.id)).is_file()]
    failed = {}
    for p in tqdm(todo, desc="generating", unit="image", disable=not progress):
        try:
            result = pipeline.generate_image(p.prompt, preset=preset, height=height, width=width, seed=seed, **overrides)
        except ValueError as e:  # e.g. a prompt over the context limit: recorded, the run goes on
            failed[p.id] = str(e)
            log.warning("prompt %s not generated: %s", p.id, e)
            continue
        result.save(generated / image_file_name(p.id))
    return {"generated_now": len(todo) - len(failed), "already_present": len(prompts) - len(todo), "failed": failed}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def evaluate_t2i(
    prompts: str | Path | list[T2IPrompt],
    generated: str | Path,
    out: str | Path,
    *,
    feature_extractor=None,
    biomedclip=None,
    batch_size: int = 32,
    kid_subset_size: int = 1000,
    progress: bool = True,
) -> dict:
    """Score the images in ``generated`` against the prompt set; writes ``results.json``,
    ``scored.jsonl``, ``results.md`` and per-modality charts into ``out``.  ``feature_extractor``
    (for FID/KID) and ``biomedclip`` (:class:`.biomedclip.BiomedCLIP`) are each optional, but one is
    needed."""
    from tqdm.auto import tqdm

    from .fid import fid_from_features, kernel_inception_distance

    if feature_extractor is None and biomedclip is None:
        raise ValueError("nothing to compute: give a feature extractor (FID/KID) and/or a BiomedCLIP checkpoint")
    prompt_list = load_prompts(prompts) if not isinstance(prompts, list) else prompts
    generated, out = Path(generated), Path(out)
    if not generated.is_dir():
        raise FileNotFoundError(f"{generated}: folder of generated images not found")
    out.mkdir(parents=True, exist_ok=True)
    paths = {p.id: generated / image_file_name(p.id) for p in prompt_list}
    have = {pid: path for pid, path in paths.items() if path.is_file()}
    missing = [p.id for p in prompt_list if p.id not in have]
    modalities = sorted({p.modality for p in prompt_list}, key=lambda m: (MODALITIES.index(m) if m in MODALITIES else 99, m))
    gen_sources = {pid: ImageSource.from_path(path) for pid, path in have.items()}
    total = (len(prompt_list) + len(have)) * (feature_extractor is not None) + len(have) * (biomedclip is not None)
    bar = tqdm(total=total, desc="features", unit="image", disable=not progress)
    feature_cache = FeatureCache(out / "feature_cache", feature_extractor) if feature_extractor is not None else None
    clip_cache = FeatureCache(out / "feature_cache", biomedclip) if biomedclip is not None else None
    per_modality: dict[str, dict] = {}
    cosine: dict[str, float] = {}
    for m in modalities:
        group = [p for p in prompt_list if p.modality == m]
        done = [p for p in group if p.id in have]
        row = {"n_prompts": len(group), "n_generated": len(done), "n_reference": len(group), "fid": None, "kid": None,
               "kid_std": None, "biomedclip_cosine": None, "biomedclip_clipscore": None}
        if feature_cache is not None:
            real = feature_cache.features([p.reference for p in group], batch_size, bar.update)
            fake = feature_cache.features([gen_sources[p.id] for p in done], batch_size, bar.update)
            if len(done) >= 2 and len(group) >= 2:
                row["fid"] = fid_from_features(fake, real)
                row["kid"], row["kid_std"] = kernel_inception_distance(fake, real, subset_size=kid_subset_size)
        if clip_cache is not None and done:
            emb = clip_cache.features([gen_sources[p.id] for p in done], batch_size, bar.update)
            cos = biomedclip.cosine(emb, [p.prompt for p in done])
            cosine.update({p.id: float(c) for p, c in zip(done, cos)})
            row["biomedclip_cosine"] = float(np.mean(cos))
            row["biomedclip_clipscore"] = float(np.mean(clip_score(cos)))
        per_modality[m] = row
    bar.close()
    canonical = [m for m in MODALITIES if m in per_modality]
    results = {
        "n_prompts": len(prompt_list), "n_generated": len(have), "missing": len(missing), "missing_ids": missing[:100],
        "feature_extractor": getattr(feature_extractor, "name", None),
        "biomedclip": biomedclip is not None,
        "modalities": per_modality,
        "average": {
            "over": canonical,
            "fid": _mean([per_modality[m]["fid"] for m in canonical]),
            "biomedclip_cosine": _mean([per_modality[m]["biomedclip_cosine"] for m in canonical]),
            "biomedclip_clipscore": _mean([per_modality[m]["biomedclip_clipscore"] for m in canonical]),
        },
        "conventions": "FID per modality between generated images and the real images of the same prompts (features: "
                       f"{getattr(feature_extractor, 'name', 'none')}); KID: unbiased polynomial-kernel MMD^2 over subsets "
                       f"of min({kid_subset_size}, n); BioMedCLIP: cosine of L2-normalised image and prompt embeddings "
                       "(prompts truncated to the text context) and 2.5*max(cos, 0); Average: unweighted mean over Table 2 "
                       "modalities present. FID from ~1K samples is biased upward: compare only at equal sample counts.",
    }
    write_json(out / "results.json", results)
    write_text(out / "scored.jsonl", "".join(json.dumps({"id": p.id, "modality": p.modality, "generated": p.id in have,
                                                         "biomedclip_cosine": cosine.get(p.id)}) + "\n" for p in prompt_list))
    write_text(out / "results.md", markdown_table(results))
    _charts(results, out)
    return results


def _cell(v, digits: int) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def markdown_table(results: dict) -> str:
    mods = list(results["modalities"])
    cols = mods + ["Avg"]
    pm, avg = results["modalities"], results["average"]

    def row(label, values, digits):
        return f"| {label} | " + " | ".join(_cell(v, digits) for v in values) + " |"

    lines = [f"# text-to-image: {results['n_generated']} of {results['n_prompts']} prompts generated", "",
             "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
             "| n (generated / real) | " + " | ".join(f"{pm[m]['n_generated']} / {pm[m]['n_reference']}" for m in mods) + " | |"]
    if results["feature_extractor"]:
        lines.append(row("**gFID, this run**", [pm[m]["fid"] for m in mods] + [avg["fid"]], 2))
        lines.append(row("KID, this run", [pm[m]["kid"] for m in mods] + [None], 4))
        for model, values in GFID.items():
            lines.append(row(f"gFID {model} (paper)", [values.get(m) for m in mods] + [GFID_MEAN[model]], 2))
    if results["biomedclip"]:
        lines.append(row("**BioMedCLIP cos, this run**", [pm[m]["biomedclip_cosine"] for m in mods] + [avg["biomedclip_cosine"]], 3))
        lines.append(row("BioMedCLIP 2.5·max(cos,0), this run", [pm[m]["biomedclip_clipscore"] for m in mods] + [avg["biomedclip_clipscore"]], 3))
        for model, values in BIOMEDCLIP.items():
            lines.append(row(f"BioMedCLIP {model} (paper)", [values.get(m) for m in mods] + [_mean(values.values())], 3))
    lines += ["", "Paper values come from 1 image per prompt over the held-out UniMed-5M prompts (≈965 per modality); "
                  "FID depends strongly on the sample count, so compare only at equal n."]
    return "\n".join(lines) + "\n"


def _charts(results: dict, out: Path) -> None:
    from ..formats.charts import bar_chart, save_chart

    pm = results["modalities"]
    charts = [("feature_extractor", "fid", GFID, "fid.png", "gFID per modality (lower is better; paper = UniMedVL, Table 2)", "{:.1f}"),
              ("biomedclip", "biomedclip_cosine", BIOMEDCLIP, "biomedclip.png",
               "BioMedCLIP cosine per modality (higher is better; paper = UniMedVL)", "{:.3f}")]
    for enabled, key, paper, name, title, fmt in charts:
        if not results[enabled]:
            continue
        values = {}
        for m in pm:
            values[f"{m} this run"] = pm[m][key]
            if m in paper["UniMedVL"]:
                values[f"{m} paper"] = paper["UniMedVL"][m]
        save_chart(bar_chart(values, title, value_format=fmt), out / name)
