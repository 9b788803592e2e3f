"""Scoring generated outputs on disk: image pairs (PSNR/SSIM per task) and report texts.

* :func:`evaluate_pixels` pairs ``GENERATED/<name>`` with ``REFERENCE/<name>`` (same file name;
  PNG/JPEG/TIFF, DICOM or NIfTI through the project's reader), scores each pair under the task's
  convention (:mod:`.image_metrics`) and writes ``results.json`` (means, n, missing),
  ``scored.jsonl`` and ``results.md`` beside the paper's row;
* :func:`evaluate_reports` reads a JSONL of ``{"id", "prediction", "reference"}`` lines and
  writes the text metrics (:mod:`.text_metrics`) the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..formats.atomic import write_json, write_text
from .image_metrics import TASK_MODES, pixel_scores
from .paper import PIXEL, REPORT

def image_files(folder: Path) -> dict[str, Path]:
    from ..formats.medical_io import IMAGE_SUFFIXES

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)}


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def evaluate_pixels(generated: str | Path, reference: str | Path, task: str, out: str | Path) -> dict:
    from ..formats.medical_io import read_medical_image

    if task not in TASK_MODES:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASK_MODES)}")
    gen, ref = image_files(Path(generated)), image_files(Path(reference))
    if not ref:
        raise FileNotFoundError(f"{reference}: no reference images")
    rows = []
    for name, ref_path in ref.items():
        if name not in gen:
            rows.append({"name": name, "missing": True})
            continue
        scores = pixel_scores(read_medical_image(gen[name]).pixels, read_medical_image(ref_path).pixels, task)
        rows.append({"name": name, "missing": False, **scores})
    scored = [r for r in rows if not r["missing"]]
    results = {
        "task": task, "mode": TASK_MODES[task], "n": len(scored), "missing": len(rows) - len(scored),
        "missing_names": [r["name"] for r in rows if r["missing"]][:100],
        "unmatched_generated": sorted(set(gen) - set(ref))[:100],
        "psnr": _mean([r["psnr"] for r in scored]), "ssim": _mean([r["ssim"] for r in scored]),
        "identical_images": sum(1 for r in scored if math.isinf(r["psnr"])),  # left out of the PSNR mean
        "conventions": "reference resolution (bicubic resize), 8-bit, data_range 255, full image; "
                       + ("luma channel" if TASK_MODES[task] == "gray" else "RGB; SSIM per channel, averaged"),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    write_text(out / "scored.jsonl", "".join(json.dumps({k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in r.items()}) + "\n"
                                             for r in rows))
    lines = [f"# {task}: {results['n']} pairs ({results['missing']} references without a generated image)", "",
             "| | PSNR (dB) | SSIM |", "|---|---|---|",
             f"| **this run** | {_fmt(results['psnr'])} | {_fmt(results['ssim'], 3)} |"]
    lines += [f"| {model} (paper) | {p:.2f} | {s:.3f} |" for model, (p, s) in PIXEL.get(task, {}).items()]
    write_text(out / "results.md", "\n".join(lines) + "\n")
    return results


def _fmt(v, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def read_report_pairs(path: str | Path) -> tuple[list[str], list[str]]:
    """Predictions and references of a JSONL/CSV of ``{"id", "prediction", "reference"}`` rows."""
    from ..formats.tables import TableError, read_rows

    path = Path(path)
    rows = read_rows(path)
    for line, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("prediction"), str) or not isinstance(row.get("reference"), str):
            raise TableError(path, line, "expected an object with string 'prediction' and 'reference'")
    if not rows:
        raise TableError(path, None, "no rows")
    return [r["prediction"] for _, r in rows], [r["reference"] for _, r in rows]


def evaluate_reports(predictions: str | Path, out: str | Path) -> dict:
    """Text metrics of report pairs; ``results.md`` puts this run beside the paper's Table 20.  The
    METEOR column holds METEOR 1.5 only (the paper's METEOR); where it cannot run here the column
    says so and NLTK's METEOR (``meteor_nltk``, not comparable) is printed apart from the table."""
    from .text_metrics import meteor15_unavailable, report_metrics

    preds, refs = read_report_pairs(predictions)
    results = {"n": len(preds), **report_metrics(preds, refs)}
    results["meteor_implementation"] = "METEOR 1.5 (pycocoevalcap jar)" if "meteor" in results else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    keys = ("meteor", "bleu4", "rouge1", "rougeL")
    lines = [f"# report generation: {len(preds)} reports", "", "| | METEOR 1.5 | bleu4 | rouge1 | rougeL |", "|---" * (len(keys) + 1) + "|",
             "| **this run** | " + " | ".join(_fmt(results.get(k), 4) for k in keys) + " |"]
    lines += ["| " + model + " (paper Table 20) | " + " | ".join(f"{row[k]:.4f}" for k in keys) + " |" for model, row in REPORT.items()]
    if "meteor" not in results:
        lines += ["", f"METEOR 1.5 was not computed ({meteor15_unavailable()}); NLTK's METEOR without WordNet, "
                  f"meteor_nltk = {results['meteor_nltk']:.4f}, scores much higher and is not comparable with the paper's METEOR."]
    write_text(out / "results.md", "\n".join(lines) + "\n")
    return results
