"""The dataset card: a README with counts and rejections, a bar chart and a contact sheet per
modality, written next to the shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..formats.atomic import write_text
from ..formats.charts import bar_chart, image_grid, save_chart
from .imaging import decode_png
from .layout import DatasetLayout

THUMB = 96
PER_MODALITY = 8


def contact_sheets(out: Path, manifest: dict) -> dict[str, Image.Image]:
    """Up to eight kept images per modality, from the shards in order."""
    found: dict[str, list[np.ndarray]] = {}
    for rows in DatasetLayout(out).kept_by_shard(["id", "modality", "input_images", "output_images"], manifest):
        for row in rows:
            images = row["output_images"] or row["input_images"]
            if not images or len(found.get(row["modality"], [])) >= PER_MODALITY:
                continue
            found.setdefault(row["modality"], []).append(decode_png(images[0]))
        if found and all(len(v) >= PER_MODALITY for v in found.values()) and len(found) >= 8:
            break
    sheets = {m: image_grid([images], cell=THUMB, background="black") for m, images in sorted(found.items())}
    return sheets


def write_card(out: Path, manifest: dict) -> None:
    layout = DatasetLayout(out)
    layout.card_dir.mkdir(exist_ok=True)
    figure = layout.card_figure
    per_family = {f: sum(n for m in mods.values() for n in m.values()) for f, mods in manifest["counts"].items()}
    per_modality: dict[str, int] = {}
    for mods in manifest["counts"].values():
        for m, by_source in mods.items():
            per_modality[m] = per_modality.get(m, 0) + sum(by_source.values())
    save_chart(bar_chart(per_family, "kept records per task family"), figure("records_per_family"))
    save_chart(bar_chart(per_modality, "kept records per modality"), figure("records_per_modality"))
    save_chart(bar_chart(manifest["rejections"], "rejections by stage/reason"), figure("rejections"))
    sheets = contact_sheets(out, manifest)
    for modality, sheet in sheets.items():
        save_chart(sheet, figure(f"samples_{modality}"))

    def link(name: str) -> str:  # a figure as the README names it
        return layout.relative(figure(name))

    lines = ["# Dataset card", "", f"Schema version {manifest['schema_version']}, build fingerprint `{manifest['fingerprint']}`.",
             f"{manifest['num_kept']} records kept of {manifest['num_records']} written "
             f"({len(manifest['excluded'])} excluded as duplicates), in {len(manifest['shards'])} Parquet shards.", "",
             f"![records per family]({link('records_per_family')})", f"![records per modality]({link('records_per_modality')})", "",
             "## Records per task family, modality and source", "", "| family | modality | source | records |", "|---|---|---|---|"]
    for family, mods in sorted(manifest["counts"].items()):
        for modality, by_source in sorted(mods.items()):
            for source, n in sorted(by_source.items()):
                lines.append(f"| {family} | {modality} | {source} | {n} |")
    lines += ["", "## Splits (by patient group)", "", "| family/split | records |", "|---|---|"]
    lines += [f"| {k} | {n} |" for k, n in manifest["splits"].items()]
    lines += ["", "## Rejections", "", f"![rejections]({link('rejections')})", "", "| stage/reason | count |", "|---|---|"]
    lines += [f"| {k} | {n} |" for k, n in manifest["rejections"].items()] or ["| (none) | 0 |"]
    lines += ["", f"Every rejection is listed with its item in `{layout.relative(layout.shards_dir)}/*.rejections.jsonl` and "
              f"`{layout.relative(layout.exclusion('duplicates'))}`.", "",
              "## Samples", ""]
    lines += [f"**{m}**\n\n![{m}]({link(f'samples_{m}')})\n" for m in sorted(sheets)]
    lines += ["## Sources", "", "| name | kind | modality | licence |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['kind']} | {s['modality']} | {s['license']} |" for s in manifest["sources"]]
    lines += ["", "Images are 8-bit PNG (windowed or percentile-scaled before encoding). Patient groups are salted "
              "hashes; no DICOM header field is copied into the records."]
    write_text(layout.card_readme, "\n".join(lines) + "\n")
