"""After every shard is written: duplicates, leakage, the manifest and the dataset card.

Shards are never rewritten (they stay byte-identical across resumed builds).  Records removed
after the build are listed, with stage and reason, in exclusion files next to the shards
(:data:`.layout.EXCLUSIONS`), and the manifest's ``excluded`` list (which the training loader
skips) is recomputed from all of them:

* ``duplicates.jsonl`` (stage qc1) - a record of the same family and task whose primary image has
  the same pixels (exact) or the same 256-bit difference hash (perceptual) as one from an
  *earlier work item* (one item legitimately yields several records from one image, and one image
  may serve different tasks);
* ``leakage.jsonl`` (stage qc2) - a train record whose primary image (perceptual hash) also
  appears in the val or test split, under another patient group;
* ``scores.jsonl`` (stage qc2, :mod:`unimedvl.data.curation`) - below the kept fraction of a
  model-based image-text score;
* ``review.jsonl`` (stage review) - rejected by an expert reviewer.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from ..formats.hashing import file_sha256
from ..formats.atomic import write_json, write_jsonl
from .layout import DatasetLayout, read_jsonl
from .schema import SCHEMA_VERSION

INDEX_COLUMNS = ["id", "family", "task", "modality", "source", "split", "patient_group", "item_hash", "image_sha256", "image_phash"]


def read_index(out: Path, num_shards: int) -> list:
    """The small index columns of every shard, one Arrow table per shard in shard order (read
    from disk once, kept columnar: far smaller than the rows as Python dicts)."""
    import pyarrow.parquet as pq

    layout = DatasetLayout(out)
    return [pq.read_table(layout.shard(k).parquet, columns=INDEX_COLUMNS) for k in range(num_shards)]


def _rows(index: list):
    """Every row of :func:`read_index`'s tables as a dict, shard after shard."""
    for table in index:
        yield from table.to_pylist()


def find_duplicates(index: list) -> list[dict]:
    first_by_sha: dict[str, str] = {}
    first_by_phash: dict[str, str] = {}
    found = []
    for row in _rows(index):
        task = f"{row['family']}/{row['task']}/"
        reason = None
        if row["image_sha256"] and first_by_sha.setdefault(task + row["image_sha256"], row["item_hash"]) != row["item_hash"]:
            reason = "exact_duplicate"
        elif row["image_phash"] and first_by_phash.setdefault(task + row["image_phash"], row["item_hash"]) != row["item_hash"]:
            reason = "perceptual_duplicate"
        if reason:
            found.append({"id": row["id"], "source": row["source"], "stage": "qc1", "reason": reason})
    return found


def find_leakage(index: list, excluded: set[str]) -> list[dict]:
    held_out: dict[str, set[str]] = defaultdict(set)  # phash -> patient groups in val/test
    for row in _rows(index):
        if row["id"] not in excluded and row["split"] != "train" and row["image_phash"]:
            held_out[row["image_phash"]].add(row["patient_group"])
    found = []
    for row in _rows(index):
        groups = held_out.get(row["image_phash"], ())
        if row["id"] not in excluded and row["split"] == "train" and groups and row["patient_group"] not in groups:
            found.append({"id": row["id"], "source": row["source"], "stage": "qc2", "reason": "leakage",
                          "detail": "the same image is in the val/test split under another patient group"})
    return found


def write_manifest(out: Path, num_shards: int, index: list | None = None) -> dict:
    """Recompute ``manifest.json`` and the card from the shards and every exclusion file;
    ``index`` is :func:`read_index` of the shards where the caller has already read it."""
    layout = DatasetLayout(out)
    if index is None:
        index = read_index(out, num_shards)
    build_info = json.loads(layout.build_info.read_text())
    reasons: dict[str, tuple[str, str]] = {}
    for path in layout.exclusions():
        for r in read_jsonl(path):
            reasons.setdefault(r["id"], (r["stage"], r["reason"]))
    kept, splits, rejections = Counter(), Counter(), Counter()
    shards = []
    for k, table in enumerate(index):
        path = layout.shard(k)
        shards.append({"file": layout.relative(path.parquet), "rows": table.num_rows, "sha256": file_sha256(path.parquet)})
        for row in table.to_pylist():
            if row["id"] in reasons:
                continue
            kept[(row["family"], row["modality"], row["source"])] += 1
            splits[(row["family"], row["split"])] += 1
        for r in read_jsonl(path.rejections):
            rejections[(r["stage"], r["reason"])] += 1
    for stage_reason in reasons.values():
        rejections[stage_reason] += 1
    counts: dict = defaultdict(lambda: defaultdict(dict))
    for (family, modality, source), n in sorted(kept.items()):
        counts[family][modality][source] = n
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": build_info["fingerprint"],
        "num_records": sum(s["rows"] for s in shards),
        "num_kept": sum(kept.values()),
        "shards": shards,
        "excluded": sorted(reasons),
        "counts": json.loads(json.dumps(counts)),
        "splits": {f"{f}/{s}": n for (f, s), n in sorted(splits.items())},
        "rejections": {f"{stage}/{reason}": n for (stage, reason), n in sorted(rejections.items())},
        "sources": build_info.get("sources", []),
    }
    write_json(layout.manifest, manifest, indent=1)
    from .card import write_card

    write_card(out, manifest)
    return manifest


def finalize(out: Path, num_shards: int) -> dict:
    layout = DatasetLayout(out)
    index = read_index(out, num_shards)
    duplicates = find_duplicates(index)
    write_jsonl(layout.exclusion("duplicates"), duplicates)
    leakage = find_leakage(index, {d["id"] for d in duplicates})
    write_jsonl(layout.exclusion("leakage"), leakage)
    return write_manifest(out, num_shards, index)
