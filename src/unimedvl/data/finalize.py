"""After every shard is written: the duplicate pass, the manifest and the dataset card.

Shards are never rewritten (they stay byte-identical across resumed builds); records found to be
duplicates are listed in ``manifest.json["excluded"]`` and ``duplicates.jsonl`` with their reason,
and the training loader skips them.

* exact duplicate: a record of the same family and task whose primary image has the same pixels,
  from an *earlier work item* (one item legitimately yields several records from one image, and
  one image may serve different tasks, e.g. as a caption sample and as a staining target);
* perceptual duplicate: likewise with the same 256-bit difference hash.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

from .build_config import BuildConfig
from .builder import _atomic_write_bytes, shard_paths
from .schema import SCHEMA_VERSION

INDEX_COLUMNS = ["id", "family", "task", "modality", "source", "split", "item_hash", "image_sha256", "image_phash"]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def finalize(config: BuildConfig, out: Path, num_shards: int) -> dict:
    import pyarrow.parquet as pq

    first_item_by_sha: dict[str, str] = {}
    first_item_by_phash: dict[str, str] = {}
    excluded: list[str] = []
    duplicates: list[dict] = []
    kept = Counter()
    splits = Counter()
    rejections = Counter()
    shards = []
    for k in range(num_shards):
        paths = shard_paths(out, k)
        table = pq.read_table(paths["parquet"], columns=INDEX_COLUMNS)
        rows = table.to_pylist()
        shards.append({"file": f"shards/{paths['parquet'].name}", "rows": len(rows), "sha256": _file_sha256(paths["parquet"])})
        for row in rows:
            reason = None
            task = f"{row['family']}/{row['task']}/"
            if row["image_sha256"]:
                first = first_item_by_sha.setdefault(task + row["image_sha256"], row["item_hash"])
                if first != row["item_hash"]:
                    reason = "exact_duplicate"
            if reason is None and row["image_phash"]:
                first = first_item_by_phash.setdefault(task + row["image_phash"], row["item_hash"])
                if first != row["item_hash"]:
                    reason = "perceptual_duplicate"
            if reason:
                excluded.append(row["id"])
                duplicates.append({"id": row["id"], "source": row["source"], "stage": "qc1", "reason": reason})
                rejections[("qc1", reason)] += 1
                continue
            kept[(row["family"], row["modality"], row["source"])] += 1
            splits[(row["family"], row["split"])] += 1
        for line in paths["rejections"].read_text().splitlines():
            r = json.loads(line)
            rejections[(r["stage"], r["reason"])] += 1
    _atomic_write_bytes(out / "duplicates.jsonl", "".join(json.dumps(d, sort_keys=True) + "\n" for d in duplicates).encode())
    counts: dict = defaultdict(lambda: defaultdict(dict))
    for (family, modality, source), n in sorted(kept.items()):
        counts[family][modality][source] = n
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": config.fingerprint(),
        "num_records": sum(s["rows"] for s in shards),
        "num_kept": sum(kept.values()),
        "shards": shards,
        "excluded": excluded,
        "counts": json.loads(json.dumps(counts)),
        "splits": {f"{f}/{s}": n for (f, s), n in sorted(splits.items())},
        "rejections": {f"{stage}/{reason}": n for (stage, reason), n in sorted(rejections.items())},
        "sources": [{"name": s.name, "kind": s.kind, "modality": s.modality, "license": s.license} for s in config.sources],
    }
    _atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
    from .card import write_card

    write_card(out, manifest)
    return manifest
