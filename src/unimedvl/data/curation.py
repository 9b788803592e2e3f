"""Curation after a build: model-based scoring (quality control stage 2) and expert review
(stage 3).  Both only add exclusion files and recompute the manifest; shards stay untouched.

Scoring (DATA.md 2.6): any local image-text scorer - a function ``(PIL image, text) -> float``,
named as ``package.module:function`` or ``/path/file.py:function`` - scores every kept record;
per modality (default, so small modalities are not wiped out) the top ``keep_fraction`` is kept,
as the paper keeps the top 50%.

Review: :func:`export_review` writes a self-contained HTML sheet with a stratified sample
(proportional to each modality's share, at least one per modality); reviewers mark each sample
accept/reject and download their verdicts as JSON from the page; :func:`import_review` applies
the rejections.
"""

from __future__ import annotations

import base64
import html
import importlib
import importlib.util
import io
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Callable

from PIL import Image

from ..formats.atomic import write_bytes, write_jsonl
from .finalize import write_manifest
from .layout import DatasetLayout, read_jsonl
from .schema import Record

Scorer = Callable[[Image.Image, str], float]
VERDICTS = ("accept", "reject")


def load_scorer(spec: str) -> Scorer:
    """``package.module:function`` or ``/path/to/file.py:function``."""
    if ":" not in spec:
        raise ValueError(f"scorer {spec!r}: expected module:function or file.py:function")
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"scorer file {path} not found")
        module_spec = importlib.util.spec_from_file_location(f"unimedvl_scorer_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"scorer {spec!r}: {name} is not a function of {target}")
    return fn


def record_text(record: Record) -> str:
    if record.family == "generation":
        return record.captions.get("caption") or next(iter(record.captions.values()), "")
    if record.family == "understanding":
        return " ".join(m["value"] for m in record.messages if m["from"] == "gpt")
    return record.instruction


def score_dataset(out: str | Path, scorer: Scorer, keep_fraction: float = 0.5, per_modality: bool = True) -> dict:
    """Score every kept record; exclude all but the top ``keep_fraction`` (per modality)."""
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    out = Path(out)
    layout = DatasetLayout(out)
    scores = []
    for row in layout.iter_kept():
        record = Record.from_row(row)
        images = record.output_images or record.input_images
        if not images:
            continue
        with Image.open(io.BytesIO(images[0])) as im:
            value = float(scorer(im.convert("RGB"), record_text(record)))
        scores.append({"id": record.id, "source": record.source, "modality": record.modality, "score": value})
    groups: dict[str, list[dict]] = defaultdict(list)
    for s in scores:
        groups[s["modality"] if per_modality else "all"].append(s)
    excluded = []
    for items in groups.values():
        items.sort(key=lambda s: (-s["score"], s["id"]))
        keep = max(1, round(len(items) * keep_fraction))
        for s in items[keep:]:
            excluded.append({"id": s["id"], "source": s["source"], "stage": "qc2", "reason": "low_score",
                             "detail": f"score {s['score']:.4g} below the kept {keep_fraction:.0%} of {s['modality'] if per_modality else 'all'}"})
    write_jsonl(layout.record_scores, scores)
    write_jsonl(layout.exclusion("scores"), excluded)
    manifest = write_manifest(out, len(layout.read_manifest()["shards"]))
    return {"scored": len(scores), "excluded": len(excluded), "kept": manifest["num_kept"]}


def stratified_sample(out: Path, n: int, seed: int = 0) -> list[dict]:
    layout = DatasetLayout(out)
    by_modality: dict[str, list[str]] = defaultdict(list)
    for row in layout.iter_kept(columns=["id", "modality"]):
        by_modality[row["modality"]].append(row["id"])
    total = sum(len(v) for v in by_modality.values())
    rng = random.Random(seed)
    chosen = set()
    for modality, ids in sorted(by_modality.items()):
        k = min(len(ids), max(1, round(n * len(ids) / max(total, 1))))
        chosen.update(rng.sample(sorted(ids), k))
    return [row for row in layout.iter_kept() if row["id"] in chosen]


def _img_tag(data: bytes) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(data).decode()}" style="max-width:256px;max-height:256px">'


def export_review(out: str | Path, sheet: str | Path, n: int = 200, seed: int = 0) -> int:
    """Write a self-contained HTML review sheet of ``n`` stratified samples; returns the count."""
    out = Path(out)
    rows = stratified_sample(out, n, seed)
    cards = []
    for row in rows:
        r = Record.from_row(row)
        images = "".join(_img_tag(b) for b in r.input_images) + (" &rarr; " if r.input_images and r.output_images else "") + "".join(
            _img_tag(b) for b in r.output_images)
        if r.family == "understanding":
            text = "".join(f"<p><b>{html.escape(m['from'])}:</b> {html.escape(m['value'])}</p>" for m in r.messages)
        elif r.family == "generation":
            text = "".join(f"<p><b>{html.escape(k)}:</b> {html.escape(v)}</p>" for k, v in r.captions.items())
        else:
            text = f"<p><b>instruction:</b> {html.escape(r.instruction)}</p><p><b>response:</b> {html.escape(r.response)}</p>"
        rid = html.escape(r.id)
        cards.append(
            f'<div class="card" data-id="{rid}"><div class="meta">{html.escape(r.family)} / {html.escape(r.task)} / '
            f"{html.escape(r.modality)} / {html.escape(r.source)} / <code>{rid}</code></div>{images}{text}"
            f'<label><input type="radio" name="v-{rid}" value="accept" checked> accept</label> '
            f'<label><input type="radio" name="v-{rid}" value="reject"> reject</label> '
            f'<input type="text" class="comment" placeholder="comment (reason for rejection)" size="50"></div>'
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>UniMedVL dataset review</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}.card{{border:1px solid #ccc;margin:12px 0;padding:8px}}
.meta{{color:#555;font-size:90%}}img{{margin:4px;vertical-align:middle}}</style></head><body>
<h1>Dataset review ({len(rows)} samples)</h1>
<p>Mark each sample and write a reason for every rejection, then download the verdicts and send the file back
(<code>unimedvl data review-import DATASET verdicts.json</code>).</p>
<p>Reviewer: <input id="reviewer" size="30"></p>
{''.join(cards)}
<button id="download">Download verdicts</button>
<script>
document.getElementById('download').onclick = function() {{
  var verdicts = [];
  document.querySelectorAll('.card').forEach(function(card) {{
    var id = card.dataset.id;
    var checked = card.querySelector('input[name="v-' + id + '"]:checked');
    verdicts.push({{id: id, verdict: checked ? checked.value : 'accept', comment: card.querySelector('.comment').value}});
  }});
  var blob = new Blob([JSON.stringify({{reviewer: document.getElementById('reviewer').value, verdicts: verdicts}}, null, 1)],
                      {{type: 'application/json'}});
  var a = document.createElement('a');
  a.href = URL.createObjectURL(blob); a.download = 'verdicts.json'; a.click();
}};
</script></body></html>"""
    write_bytes(Path(sheet), page.encode())
    return len(rows)


def import_review(out: str | Path, verdicts_file: str | Path) -> dict:
    """Apply a reviewer's verdicts: rejected records are excluded with the reviewer's comment."""
    out = Path(out)
    layout = DatasetLayout(out)
    doc = json.loads(Path(verdicts_file).read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("verdicts"), list):
        raise ValueError(f"{verdicts_file}: expected an object with a 'verdicts' list")
    known = {row["id"]: row["source"] for row in layout.iter_kept(columns=["id", "source"])}
    previous = {r["id"]: r for r in read_jsonl(layout.exclusion("review"))}
    for i, v in enumerate(doc["verdicts"]):
        if v.get("verdict") not in VERDICTS:
            raise ValueError(f"{verdicts_file}: verdicts[{i}].verdict must be one of {VERDICTS}, got {v.get('verdict')!r}")
        if v.get("id") not in known and v.get("id") not in previous:
            raise ValueError(f"{verdicts_file}: verdicts[{i}].id {v.get('id')!r} is not a kept record of {out}")
        if v["verdict"] == "reject":
            previous[v["id"]] = {"id": v["id"], "source": known.get(v["id"], previous.get(v["id"], {}).get("source", "")),
                                 "stage": "review", "reason": "expert_reject",
                                 "detail": f"{doc.get('reviewer') or 'reviewer'}: {v.get('comment', '')}".strip()}
        else:
            previous.pop(v["id"], None)
    write_jsonl(layout.exclusion("review"), sorted(previous.values(), key=lambda r: r["id"]))
    manifest = write_manifest(out, len(layout.read_manifest()["shards"]))
    return {"reviewed": len(doc["verdicts"]), "rejected": len(previous), "kept": manifest["num_kept"]}
