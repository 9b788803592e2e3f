"""The files of a built dataset - the one place that knows their names.

::

    DATASET/
      build.json                 the build's config fingerprint and sources; written first by
                                 ``unimedvl data build`` (a later build with another config refuses
                                 the folder)
      shards/
        00000.parquet            shard 0's records                          (builder)
        00000.rejections.jsonl   shard 0's rejected work items               (builder)
        00000.done.json          shard 0's counts, written last: the shard is complete
        .*.partial               an interrupted atomic write; deleted when a build restarts
      duplicates.jsonl           exclusions, stage qc1: exact/perceptual duplicates  (finalize)
      leakage.jsonl              exclusions, stage qc2: train images also held out   (finalize)
      scores.jsonl               exclusions, stage qc2: below the kept score fraction (curation)
      record_scores.jsonl        every scored record's score                  (curation)
      review.jsonl               exclusions, stage review: expert rejections  (curation)
      manifest.json              shards with checksums, counts, ``excluded`` ids; written when
                                 every shard is complete (finalize) and recomputed by curation:
                                 its presence marks a complete dataset
      README.md                  the dataset card                             (card)
      card/*.png                 the card's charts and contact sheets         (card)

Shards are never rewritten after their ``.done.json``; exclusion files and the manifest are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

EXCLUSIONS = ("duplicates", "leakage", "scores", "review")  # the exclusion files' names, in the order they are applied


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSON-lines file; ``[]`` if it does not exist."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class ShardFiles(NamedTuple):
    parquet: Path  # the records
    rejections: Path  # the rejected work items
    done: Path  # the counts, written last: marks the shard complete


@dataclass(frozen=True)
class DatasetLayout:
    """The paths of the built dataset in ``root``, and reading its manifest and kept records."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    def shard(self, index: int) -> ShardFiles:
        stem = self.shards_dir / f"{index:05d}"
        return ShardFiles(Path(f"{stem}.parquet"), Path(f"{stem}.rejections.jsonl"), Path(f"{stem}.done.json"))

    def stale_partials(self) -> list[Path]:
        """Temporary files of interrupted shard writes (never visible under a final name)."""
        return list(self.shards_dir.glob(".*.partial"))

    @property
    def build_info(self) -> Path:
        return self.root / "build.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def exclusion(self, name: str) -> Path:
        """The exclusion file ``name`` (one of :data:`EXCLUSIONS`)."""
        if name not in EXCLUSIONS:
            raise ValueError(f"unknown exclusion file {name!r}; expected one of {EXCLUSIONS}")
        return self.root / f"{name}.jsonl"

    def exclusions(self) -> list[Path]:
        """Every exclusion file, in :data:`EXCLUSIONS` order (some may not exist)."""
        return [self.exclusion(name) for name in EXCLUSIONS]

    @property
    def record_scores(self) -> Path:
        return self.root / "record_scores.jsonl"

    @property
    def card_dir(self) -> Path:
        return self.root / "card"

    def card_figure(self, name: str) -> Path:
        """A figure of the card (``records_per_family``, ``samples_CT``, ...)."""
        return self.card_dir / f"{name}.png"

    @property
    def card_readme(self) -> Path:
        return self.root / "README.md"

    def relative(self, path: Path) -> str:
        """``path`` as the dataset's files name each other (relative to the root, ``/``-separated)."""
        return Path(path).relative_to(self.root).as_posix()

    def read_manifest(self) -> dict:
        if not self.manifest.is_file():
            raise FileNotFoundError(
                f"{self.root}: no manifest.json - not a built dataset, or its build is not complete (unimedvl data build)")
        return json.loads(self.manifest.read_text())

    def shard_files(self, manifest: dict | None = None) -> list[Path]:
        """The Parquet shards the manifest lists, in order."""
        manifest = self.read_manifest() if manifest is None else manifest
        return [self.root / s["file"] for s in manifest["shards"]]

    def kept_by_shard(self, columns: list[str] | None = None, manifest: dict | None = None) -> Iterator[Iterator[dict]]:
        """Per shard, in order, an iterator over its kept rows (those not in the manifest's
        ``excluded``); ``manifest`` where the caller already holds it."""
        manifest = self.read_manifest() if manifest is None else manifest
        excluded = set(manifest["excluded"])
        for path in self.shard_files(manifest):
            yield _kept_rows(path, columns, excluded)

    def iter_kept(self, columns: list[str] | None = None, manifest: dict | None = None) -> Iterator[dict]:
        """Kept rows of the dataset (only ``columns`` where given), shard by shard (constant memory)."""
        for rows in self.kept_by_shard(columns, manifest):
            yield from rows


def _kept_rows(path: Path, columns: list[str] | None, excluded: set[str]) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=64, columns=columns):
        for row in batch.to_pylist():
            if row["id"] not in excluded:
                yield row
