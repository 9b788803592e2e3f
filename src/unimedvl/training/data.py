"""The training data path: a built dataset's train split, mixed by the stage's ratios and packed
into token-budgeted batches - deterministic for a seed and resumable from a small state.

* :class:`DatasetIndex` lists the kept train records of a dataset (the manifest's exclusions
  skipped) by task family and source, without loading any image.
* :class:`MixtureSampler` draws records: a family with the stage's probability (renormalised over
  the families the dataset has - missing ones are reported), a source within it by
  ``source_weights`` (default: proportional to its size), then the next record of that source's
  seeded permutation (a new permutation each pass).  Its whole state is a dict of integers.
* :func:`pack` fills a micro-batch up to ``tokens_per_batch`` tokens, skipping (and counting)
  samples above ``max_tokens_per_sample``.
* With the stage's ``augment``, understanding samples read a seeded random variant of their
  images (:mod:`.augment`).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.layout import DatasetLayout
from ..image_transforms import ImageTransform
from .augment import augment_understanding
from .plan import StageConfig
from .sequence import PlanItem

log = logging.getLogger(__name__)


class DatasetIndex:
    def __init__(self, dataset: str | Path, split: str = "train"):
        import pyarrow.parquet as pq

        layout = DatasetLayout(dataset)
        self.dir = layout.root
        manifest = layout.read_manifest()
        excluded = set(manifest["excluded"])
        self.shards = layout.shard_files(manifest)
        self.groups: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for k, path in enumerate(self.shards):
            table = pq.read_table(path, columns=["id", "family", "source", "split"]).to_pylist()
            for row_index, row in enumerate(table):
                if row["split"] == split and row["id"] not in excluded:
                    self.groups.setdefault((row["family"], row["source"]), []).append((k, row_index))
        if not self.groups:
            raise ValueError(f"{self.dir}: no kept records in the {split} split")
        self._cache: OrderedDict[int, list[dict]] = OrderedDict()

    def families(self) -> set[str]:
        return {f for f, _ in self.groups}

    def read(self, shard: int, row: int) -> dict:
        """One full record row (messages/captions/meta parsed), with a small shard cache."""
        import pyarrow.parquet as pq

        if shard not in self._cache:
            self._cache[shard] = pq.read_table(self.shards[shard]).to_pylist()
            if len(self._cache) > 2:
                self._cache.popitem(last=False)
        self._cache.move_to_end(shard)
        row_data = dict(self._cache[shard][row])
        for key in ("messages", "captions", "meta"):
            row_data[key] = json.loads(row_data[key])
        return row_data


class MixtureSampler:
    """Seeded draws of (shard, row) by family mixture and source weights; resumable."""

    def __init__(self, index: DatasetIndex, stage: StageConfig, seed: int):
        self.index, self.stage, self.seed = index, stage, seed
        available = {f: w for f, w in stage.mixture.items() if f in index.families()}
        missing = sorted(set(stage.mixture) - set(available))
        if missing:
            log.warning("stage %s: the dataset has no %s records; their share goes to the others", stage.name, ", ".join(missing))
        if not available:
            raise ValueError(f"stage {stage.name}: the dataset has none of the families {sorted(stage.mixture)}")
        self.missing = missing
        total = sum(available.values())
        self.families = sorted(available)
        self.family_p = np.array([available[f] / total for f in self.families])
        self.sources = {f: sorted(s for fam, s in index.groups if fam == f) for f in self.families}
        self.source_p = {}
        for f, names in self.sources.items():
            w = np.array([stage.source_weights.get(s, float(len(index.groups[(f, s)]))) for s in names], dtype=float)
            self.source_p[f] = w / w.sum()
        self.state = {"draws": 0, "cursors": {f"{f}/{s}": 0 for f in self.families for s in self.sources[f]}}

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def next(self) -> tuple[str, tuple[int, int]]:
        draw = self.state["draws"]
        rng = self._rng(1, draw)
        family = self.families[int(rng.choice(len(self.families), p=self.family_p))]
        names = self.sources[family]
        source = names[int(rng.choice(len(names), p=self.source_p[family]))]
        members = self.index.groups[(family, source)]
        key = f"{family}/{source}"
        cursor = self.state["cursors"][key]
        epoch, position = divmod(cursor, len(members))
        order = self._rng(2, self.families.index(family), names.index(source), epoch).permutation(len(members))
        self.state["cursors"][key] = cursor + 1
        self.state["draws"] = draw + 1
        return family, members[int(order[position])]

    def state_dict(self) -> dict:
        return json.loads(json.dumps(self.state))

    def load_state_dict(self, state: dict) -> None:
        self.state = json.loads(json.dumps(state))


def estimate_tokens(plan: list[PlanItem], vit: ImageTransform, vae: ImageTransform, vit_patch: int = 14, latent_px: int = 16) -> int:
    """Tokens a plan occupies: text + 2 wrappers per text item, image tokens + 2 markers per image."""
    n = 0
    for item in plan:
        if item.kind == "text":
            n += len(item.ids) + 2
        else:
            h, w = item.pixels.shape[:2]
            tw, th = (vit if item.kind == "vit" else vae).target_size(w, h)
            side = vit_patch if item.kind == "vit" else latent_px
            n += (tw // side) * (th // side) + 2
    return n


@dataclass
class PackStats:
    samples: int = 0
    tokens: int = 0
    skipped_too_long: int = 0


class BatchStream:
    """Micro-batches of sequence plans filled up to the stage's token budget.

    A record that does not fit ends the batch and is drawn again first for the next one (the
    sampler is rolled back by one draw), so the sampler's state alone resumes the stream exactly.
    """

    def __init__(self, index: DatasetIndex, sampler: MixtureSampler, tokenizer, stage: StageConfig, seed: int):
        self.index, self.sampler, self.tokenizer, self.stage, self.seed = index, sampler, tokenizer, stage, seed
        self.vit = ImageTransform(*stage.vit_transform)
        self.vae = ImageTransform(*stage.vae_transform)
        self.stats = PackStats()

    def next_batch(self) -> list[tuple[str, list[PlanItem]]]:
        from .sequence import plan_record

        batch, used = [], 0
        while True:
            before = self.sampler.state_dict()
            family, (shard, row) = self.sampler.next()
            record = self.index.read(shard, row)
            plan = plan_record(record, self.tokenizer, np.random.default_rng([self.seed, 3, before["draws"]]))
            if self.stage.augment and family == "understanding":
                plan = augment_understanding(plan, np.random.default_rng([self.seed, 4, before["draws"]]))
            n = estimate_tokens(plan, self.vit, self.vae)
            if n > self.stage.max_tokens_per_sample:
                self.stats.skipped_too_long += 1
                continue
            if batch and used + n > self.stage.tokens_per_batch:
                self.sampler.load_state_dict(before)  # this record opens the next batch
                return batch
            batch.append((family, plan))
            used += n
            self.stats.samples += 1
            self.stats.tokens += n
            if used >= self.stage.tokens_per_batch:
                return batch

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "stats": self.stats.__dict__.copy()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.stats = PackStats(**state["stats"])
