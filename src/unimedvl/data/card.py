"""The dataset card: a README with counts and rejections, a bar chart and a contact sheet per
modality, written next to the shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..formats.atomic import write_text
from ..formats.charts import bar_chart, image_grid, save_chart
from .imaging import decode_png

THUMB = 96
PER_MODALITY = 8


def contact_sheets(out: Path, manifest: dict) -> dict[str, Image.Image]:
    """Up to eight kept images per modality, from the shards in order."""
    import pyarrow.parquet as pq

    excluded = set(manifest["excluded"])
    found: dict[str, list[np.ndarray]] = {}
    for shard in manifest["shards"]:
        pf = pq.ParquetFile(out / shard["file"])
        for batch in pf.iter_batches(columns=["id", "modality", "input_images", "output_images"], batch_size=64):
            for row in batch.to_pylist():
                images = row["output_images"] or row["input_images"]
                if row["id"] in excluded or not images or len(found.get(row["modality"], [])) >= PER_MODALITY:
                    continue
                found.setdefault(row["modality"], []).append(decode_png(images[0]))
        if found and all(len(v) >= PER_MODALITY for v in found.values()) and len(found) >= 8:
            break
    sheets = {m: image_grid([images], cell=THUMB, background="black") for m, images in sorted(found.items())}
    return sheets


def write_card(out: Path, manifest: dict) -> None:
    (out / "card").mkdir(exist_ok=True)
    per_family = {f: sum(n for m in mods.values() for n in m.values()) for f, mods in manifest["counts"].items()}
    per_modality: dict[str, int] = {}
    for mods in manifest["counts"].values():
        for m, by_source in mods.items():
            per_modality[m] = per_modality.get(m, 0) + sum(by_source.values())
    save_chart(bar_chart(per_family, "kept records per task family"), out / "card" / "records_per_family.png")
    save_chart(bar_chart(per_modality, "kept records per modality"), out / "card" / "records_per_modality.png")
    save_chart(bar_chart(manifest["rejections"], "rejections by stage/reason"), out / "card" / "rejections.png")
    sheets = contact_sheets(out, manifest)
    for modality, sheet in sheets.items():
        save_chart(sheet, out / "card" / f"samples_{modality}.png")

    lines = ["# Dataset card", "", f"Schema version {manifest['schema_version']}, build fingerprint `{manifest['fingerprint']}`.",
             f"{manifest['num_kept']} records kept of {manifest['num_records']} written "
             f"({len(manifest['excluded'])} excluded as duplicates), in {len(manifest['shards'])} Parquet shards.", "",
             "![records per family](card/records_per_family.png)", "![records per modality](card/records_per_modality.png)", "",
             "## Records per task family, modality and source", "", "| family | modality | source | records |", "|---|---|---|---|"]
    for family, mods in sorted(manifest["counts"].items()):
        for modality, by_source in sorted(mods.items()):
            for source, n in sorted(by_source.items()):
                lines.append(f"| {family} | {modality} | {source} | {n} |")
    lines += ["", "## Splits (by patient group)", "", "| family/split | records |", "|---|---|"]
    lines += [f"| {k} | {n} |" for k, n in manifest["splits"].items()]
    lines += ["", "## Rejections", "", "![rejections](card/rejections.png)", "", "| stage/reason | count |", "|---|---|"]
    lines += [f"| {k} | {n} |" for k, n in manifest["rejections"].items()] or ["| (none) | 0 |"]
    lines += ["", "Every rejection is listed with its item in `shards/*.rejections.jsonl` and `duplicates.jsonl`.", "",
              "## Samples", ""]
    lines += [f"**{m}**\n\n![{m}](card/samples_{m}.png)\n" for m in sorted(sheets)]
    lines += ["## Sources", "", "| name | kind | modality | licence |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['kind']} | {s['modality']} | {s['license']} |" for s in manifest["sources"]]
    lines += ["", "Images are 8-bit PNG (windowed or percentile-scaled before encoding). Patient groups are salted "
              "hashes; no DICOM header field is copied into the records."]
    write_text(out / "README.md", "\n".join(lines) + "\n")
