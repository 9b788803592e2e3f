"""Counterfactual CXR generation (EVALUATION.md 4.4, paper Table 7), from files the user provides.

* **Counterfactual check** - a table (``.jsonl``/``.csv``/``.json``) of a chest-X-ray classifier's
  scores on the generated images, one row per (image, finding): ``id``, ``finding``, ``score``
  (probability the finding is present) and ``label`` (1 if the counterfactual hypothesised the
  finding, else 0).  The classifier and its label set are the user's (ProgEmu's are unverified);
  AUROC and F1 (``score >= threshold``) are reported per finding, pooled over all rows ("micro")
  and averaged over the findings that have both classes ("macro", the headline).
* **Explanations** - a JSONL of ``{"id", "prediction", "reference"}``: BLEU-1..4 (BLEU-3 in the
  table), METEOR and ROUGE-L (:mod:`.text_metrics`).
* **gFID** - optional, between a folder of generated counterfactuals and a folder of real
  follow-up images, with a registered feature extractor (:mod:`.features`).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..formats.atomic import write_json, write_text
from ..formats.tables import TableError, read_rows
from .classification import auroc, f1
from .paper import COUNTERFACTUAL


def read_classifier_scores(path: str | Path) -> list[dict]:
    path = Path(path)
    rows = []
    for line, row in read_rows(path):
        if not isinstance(row, dict) or any(row.get(k) in (None, "") for k in ("id", "finding", "score", "label")):
            raise TableError(path, line, "expected 'id', 'finding', 'score' and 'label' in every row")
        try:
            score = float(row["score"])
        except (TypeError, ValueError):
            raise TableError(path, line, f"score {row['score']!r} is not a number") from None
        if not math.isfinite(score):
            raise TableError(path, line, f"score {row['score']!r} is not finite")
        label = str(row["label"]).strip().lower()
        if label not in ("0", "1", "true", "false", "0.0", "1.0"):
            raise TableError(path, line, f"label {row['label']!r} is not 0/1")
        rows.append({"id": str(row["id"]), "finding": str(row["finding"]), "score": score, "label": label in ("1", "true", "1.0")})
    if not rows:
        raise TableError(path, None, "no rows")
    return rows


def counterfactual_check(rows: list[dict], threshold: float = 0.5) -> dict:
    per_finding = {}
    for finding in sorted({r["finding"] for r in rows}):
        group = [r for r in rows if r["finding"] == finding]
        scores, labels = [r["score"] for r in group], [r["label"] for r in group]
        both = any(labels) and not all(labels)
        per_finding[finding] = {"n": len(group), "positives": sum(labels),
                                "auroc": auroc(scores, labels) if both else None, "f1": f1(scores, labels, threshold)}
    scored = [v for v in per_finding.values() if v["auroc"] is not None]
    labels = [r["label"] for r in rows]
    return {
        "threshold": threshold,
        "auroc": sum(v["auroc"] for v in scored) / len(scored) if scored else None,
        "f1": sum(v["f1"] for v in scored) / len(scored) if scored else None,
        "auroc_micro": auroc([r["score"] for r in rows], labels) if any(labels) and not all(labels) else None,
        "f1_micro": f1([r["score"] for r in rows], labels, threshold),
        "findings_without_both_classes": [k for k, v in per_finding.items() if v["auroc"] is None],
        "per_finding": per_finding,
    }


def evaluate_counterfactual(out: str | Path, *, scores: str | Path | None = None, explanations: str | Path | None = None,
                            generated: str | Path | None = None, reference: str | Path | None = None,
                            feature_extractor=None, threshold: float = 0.5) -> dict:
    """Whatever of the three parts is given; writes ``results.json`` and ``results.md`` beside Table 7."""
    if scores is None and explanations is None and generated is None:
        raise ValueError("nothing to score: give classifier scores, explanations and/or generated images")
    results: dict = {"n_scores": None, "n_explanations": None, "gfid": None}
    if scores is not None:
        rows = read_classifier_scores(scores)
        results["n_scores"] = len(rows)
        results["check"] = counterfactual_check(rows, threshold)
    if explanations is not None:
        from .tasks import read_report_pairs
        from .text_metrics import report_metrics

        preds, refs = read_report_pairs(explanations)
        results["n_explanations"] = len(preds)
        results["text"] = report_metrics(preds, refs)
    if generated is not None:
        if reference is None or feature_extractor is None:
            raise ValueError("gFID needs the generated folder, a reference folder and a feature extractor")
        results.update(folder_fid(generated, reference, feature_extractor, Path(out) / "feature_cache"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    write_text(out / "results.md", markdown_table(results))
    return results


def folder_fid(generated: str | Path, reference: str | Path, feature_extractor, cache_root: Path) -> dict:
    from .features import FeatureCache, ImageSource
    from .fid import fid_from_features
    from .tasks import image_files

    gen, ref = image_files(Path(generated)), image_files(Path(reference))
    if len(gen) < 2 or len(ref) < 2:
        raise ValueError(f"gFID needs at least 2 images in each folder ({generated}: {len(gen)}, {reference}: {len(ref)})")
    cache = FeatureCache(cache_root, feature_extractor)
    f_gen = cache.features([ImageSource.from_path(p) for p in gen.values()])
    f_ref = cache.features([ImageSource.from_path(p) for p in ref.values()])
    return {"gfid": fid_from_features(f_gen, f_ref), "n_generated": len(gen), "n_reference": len(ref),
            "feature_extractor": feature_extractor.name}


def markdown_table(results: dict) -> str:
    check, text = results.get("check", {}), results.get("text", {})
    cols = [("gFID ↓", results.get("gfid"), 2), ("AUROC ↑", check.get("auroc"), 4), ("F1 ↑", check.get("f1"), 4),
            ("BLEU-3 ↑", text.get("bleu3"), 4), ("METEOR 1.5 ↑", text.get("meteor"), 4), ("ROUGE-L ↑", text.get("rougeL"), 4)]
    lines = ["# counterfactual generation", "", "| | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|",
             "| **this run** | " + " | ".join("–" if v is None else f"{v:.{d}f}" for _, v, d in cols) + " |"]
    keys = ("gfid", "auroc", "f1", "bleu3", "meteor", "rougeL")
    for model, row in COUNTERFACTUAL.items():
        lines.append(f"| {model} (paper Table 7) | " + " | ".join("–" if row.get(k) is None else f"{row[k]:.4g}" for k in keys) + " |")
    if text and "meteor" not in text:
        lines += ["", f"METEOR 1.5 was not computed here; NLTK's METEOR (meteor_nltk = {text['meteor_nltk']:.4f}) is not "
                  "comparable with the paper's METEOR and is left out of the table."]
    if check.get("findings_without_both_classes"):
        lines += ["", "Findings left out of the AUROC/F1 means (one class only): " + ", ".join(check["findings_without_both_classes"])]
    return "\n".join(lines) + "\n"
