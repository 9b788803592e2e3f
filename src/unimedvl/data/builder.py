"""Run a build: plan shards, process them in parallel, write them atomically, finish with the
duplicate pass and the manifest.

Plan: every source lists its work items (deterministic order); the concatenated list is cut into
shards of ``items_per_shard`` items.  Shard ``k`` is processed by one worker and written as its
Parquet file plus its rejections (:meth:`.layout.DatasetLayout.shard`), each to a temporary name
and renamed; its ``.done.json`` is written last and marks the shard complete.  A restarted
build skips complete shards and redoes the rest, so a killed build resumes and yields the same
bytes.  ``--num-partitions P --partition I`` processes the shards with ``k % P == I``, so a
scheduler can spread one build over many machines; the build that finds every shard complete
writes the manifest.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..formats.atomic import write_bytes, write_json, write_jsonl
from .adapters import make_adapter
from .adapters.base import item_hash, make_rejection
from .build_config import BuildConfig
from .finalize import finalize
from .imaging import decode_png, perceptual_hash, sha256_pixels
from .layout import DatasetLayout
from .qc import check_agreement, check_record
from .schema import Record, Rejection, arrow_schema

ROW_GROUP_SIZE = 256
MASK_TASKS = {"seg"}


@dataclass
class ShardPlan:
    index: int
    items: list[tuple[int, str]]  # (source index, item)


class BuildError(ValueError):
    """A build that cannot produce what its config asks for (a source without items or records)."""


def plan_shards(config: BuildConfig) -> list[ShardPlan]:
    """The shards of a build; :class:`BuildError` naming a source whose folder holds no item its
    kind can read (nothing would be built from it)."""
    items: list[tuple[int, str]] = []
    for i, source in enumerate(config.sources):
        found = _adapter(config, i).items()
        if not found:
            raise BuildError(f"source {source.name!r} (kind {source.kind}): no items found under {source.path}; "
                             f"check its path and kind (nothing would be built from it)")
        items += [(i, it) for it in found]
    n = config.items_per_shard
    return [ShardPlan(k, items[k * n : (k + 1) * n]) for k in range((len(items) + n - 1) // n)]


def _finish_record(record: Record, item_key: str, config: BuildConfig, source, decoded: dict) -> Record | Rejection:
    """Stage-1 QC and the hashes.  ``decoded`` caches decoded images by their bytes (the records
    of one item usually share their image)."""

    def decode(b: bytes):
        if b not in decoded:
            if len(decoded) >= 16:
                decoded.clear()
            decoded[b] = decode_png(b)
        return decoded[b]

    if record.task in MASK_TASKS:  # the target is a binary mask: the checks apply to the input image
        images, others = [decode(b) for b in record.input_images], []
    else:
        images = [decode(b) for b in record.output_images] or [decode(b) for b in record.input_images]
        others = [decode(b) for b in record.input_images] if record.output_images else []
    bad = check_record(record, images, others, config.qc)
    if bad:
        return make_rejection(config.context, source, item_key, "qc1", bad[0], f"{record.task}: {bad[1]}")
    bad = check_agreement(record)
    if bad:
        return make_rejection(config.context, source, item_key, "qc2", bad[0], f"{record.task}: {bad[1]}")
    record.item_hash = item_hash(record.source, item_key)
    record.image_sha256 = sha256_pixels(images[0]) if images else ""
    record.image_phash = f"{perceptual_hash(images[0]):064x}" if images else ""
    return record


_ADAPTER_CACHE: dict[str, dict] = {}  # per process: each source's adapter is built once, for planning and every shard


def _adapters_for(config: BuildConfig) -> dict:
    return _ADAPTER_CACHE.setdefault(config.fingerprint(), {})


def _adapter(config: BuildConfig, source_index: int):
    """The adapter of ``config.sources[source_index]``, made on first use in this process."""
    adapters = _adapters_for(config)
    if source_index not in adapters:
        adapters[source_index] = make_adapter(config.sources[source_index], config.context)
    return adapters[source_index]


def build_shard(config: BuildConfig, plan: ShardPlan, out: Path) -> dict:
    """Process one shard and write its files; returns its counts."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    records: list[Record] = []
    rejections: list[Rejection] = []
    decoded: dict = {}
    per_source = {config.sources[i].name: 0 for i, _ in plan.items}  # records kept per source
    for source_index, item in plan.items:
        adapter = _adapter(config, source_index)
        try:
            produced = list(adapter.process(item))
        except Exception as e:  # an adapter bug or an unforeseen file problem must not stop the build
            produced = [make_rejection(config.context, config.sources[source_index], item, "read", "error", f"{type(e).__name__}: {str(e)[:200]}")]
        for r in produced:
            if isinstance(r, Rejection):
                rejections.append(r)
            else:
                done = _finish_record(r, item, config, config.sources[source_index], decoded)
                (rejections if isinstance(done, Rejection) else records).append(done)
                if not isinstance(done, Rejection):
                    per_source[config.sources[source_index].name] += 1
    paths = DatasetLayout(out).shard(plan.index)
    table = pa.Table.from_pylist([r.to_row() for r in records], schema=arrow_schema())
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP_SIZE, compression="zstd")
    write_bytes(paths.parquet, buf.getvalue())
    write_jsonl(paths.rejections, [r.to_json() for r in rejections])
    counts = {"shard": plan.index, "items": len(plan.items), "records": len(records), "rejections": len(rejections),
              "records_per_source": per_source}
    write_json(paths.done, counts)
    return counts


def _worker(args):
    config, plan, out = args
    return build_shard(config, plan, out)


def _exit_with_parent(parent_pid: int) -> None:
    """Worker initializer: end this worker when the build process dies (even by SIGKILL), so no
    worker outlives it holding its memory.  On Linux the kernel delivers SIGKILL on the parent's
    death (``prctl(PR_SET_PDEATHSIG)``); everywhere a daemon thread also checks the parent's pid."""
    import os
    import signal
    import sys
    import threading
    import time

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def build(
    config: BuildConfig,
    out: str | Path,
    *,
    workers: int = 1,
    num_partitions: int = 1,
    partition: int = 0,
    progress: Callable[[dict, int, int], None] | None = None,
) -> dict:
    """Build (or resume) the shards of this partition; finalise when every shard is complete.

    Returns a summary: shards built now, skipped (already complete), and whether the manifest
    was written.
    """
    if not 0 <= partition < num_partitions:
        raise ValueError(f"partition {partition} is outside 0..{num_partitions - 1}")
    out = Path(out)
    layout = DatasetLayout(out)
    fingerprint_file = layout.build_info
    fp = config.fingerprint()
    if fingerprint_file.exists():
        previous = json.loads(fingerprint_file.read_text()).get("fingerprint")
        if previous != fp:
            raise ValueError(f"{out} holds a build of another config (fingerprint {previous}, this config {fp}); use a new --out")
    # every source is opened (its options checked) and listed before anything is written, so a
    # config that cannot build leaves no build.json behind to block the corrected rerun
    plans = plan_shards(config)
    layout.shards_dir.mkdir(parents=True, exist_ok=True)
    if not fingerprint_file.exists():
        info = {"fingerprint": fp, "sources": [{"name": s.name, "kind": s.kind, "modality": s.modality, "license": s.license} for s in config.sources]}
        write_json(fingerprint_file, info)
    for stale in layout.stale_partials():
        stale.unlink()  # left by a killed run; never visible under a final name

    import pyarrow.parquet  # noqa: F401  (imported once here, inherited by forked workers)

    mine = [p for p in plans if p.index % num_partitions == partition]
    todo = [p for p in mine if not layout.shard(p.index).done.exists()]
    built = 0
    if workers <= 1:
        for plan in todo:
            counts = build_shard(config, plan, out)
            built += 1
            if progress:
                progress(counts, built, len(todo))
    else:
        import os

        with ProcessPoolExecutor(max_workers=workers, initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
            for counts in pool.map(_worker, [(config, p, out) for p in todo]):
                built += 1
                if progress:
                    progress(counts, built, len(todo))
    complete = all(layout.shard(p.index).done.exists() for p in plans)
    summary = {"shards_total": len(plans), "shards_built": built, "shards_skipped": len(mine) - len(todo), "finalized": False}
    if complete:
        finalize(out, len(plans))
        summary["finalized"] = True
        summary["sources_without_records"] = _sources_without_records(config, layout, plans)
    return summary


def _sources_without_records(config: BuildConfig, layout: DatasetLayout, plans: list[ShardPlan]) -> list[str]:
    """Names of the sources from which every item was rejected (counted from the shards' done files;
    shards written before these counts existed are not counted)."""
    kept = {s.name: 0 for s in config.sources}
    for p in plans:
        try:
            counts = json.loads(layout.shard(p.index).done.read_text()).get("records_per_source")
        except (OSError, ValueError):
            counts = None
        if counts is None:
            return []  # an older build's shards: unknown
        for name, n in counts.items():
            kept[name] = kept.get(name, 0) + n
    return [name for name, n in kept.items() if n == 0]
