"""``unimedvl data ...``: build training data from medical archives, and its quality control."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .common import fail

app = typer.Typer(no_args_is_help=True, help="Build training data from medical archives.")


class _ShardBar:
    """A tqdm bar over shards, fed by the builder's ``progress(counts, done, total)`` callback."""

    def __init__(self):
        self.bar = None

    def __call__(self, counts: dict, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc="shards", unit="shard")
        self.bar.update(1)
        self.bar.set_postfix(records=counts["records"], rejected=counts["rejections"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@app.command("build")
def build(
    config: Path = typer.Argument(..., help="YAML build config (sources, splits, QC settings)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: shards/, manifest.json, README.md (the dataset card)."),
    workers: int = typer.Option(1, "--workers", "-w", help="Parallel worker processes."),
    num_partitions: int = typer.Option(1, "--num-partitions", help="Split the shards over this many machines/jobs."),
    partition: int = typer.Option(0, "--partition", help="Which partition this job builds (0-based)."),
) -> None:
    """Build (or resume) a dataset; a killed build restarted with the same command continues."""
    from ..data.build_config import BuildConfigError, load_build_config
    from ..data.builder import build as build_dataset

    try:
        cfg = load_build_config(config)
        bar = _ShardBar()
        summary = build_dataset(cfg, out, workers=workers, num_partitions=num_partitions, partition=partition, progress=bar)
        bar.close()
    except (BuildConfigError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    typer.echo(
        f"{summary['shards_built']} shards built, {summary['shards_skipped']} already complete, of {summary['shards_total']}"
        + ("; manifest and dataset card written" if summary["finalized"] else "; other partitions still to run")
    )
    empty = summary.get("sources_without_records") or []
    if empty:
        fail(f"every item of source(s) {', '.join(empty)} was rejected: no records were built from them "
             f"(the reasons are in {out / 'shards'}/*.rejections.jsonl; check the source's options and the qc settings)", code=1)


@app.command("demo")
def demo(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the staged sources, build.yaml and dataset/."),
    workers: int = typer.Option(1, "--workers", "-w"),
    per_label: int = typer.Option(12, "--per-label", help="Procedural images per label and modality."),
    max_side: int = typer.Option(64, "--max-side", help="Longest image side stored (the demo model works at 64 pixels)."),
) -> None:
    """Build the embedded demo corpus offline from packaged sample files and procedural images."""
    from ..data.demo import build_demo_dataset

    try:
        summary = build_demo_dataset(out, per_label=per_label, max_side=max_side, workers=workers)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    if summary["missing"]:
        typer.secho(f"skipped sources whose package is not installed: {', '.join(summary['missing'])}", fg=typer.colors.YELLOW, err=True)
    if summary["rebuilt"]:
        typer.echo(f"{out / 'dataset'} was built by another version of the demo: rebuilt it")
    manifest = summary["manifest"]
    families = {f: sum(n for m in mods.values() for n in m.values()) for f, mods in manifest["counts"].items()}
    typer.echo(f"demo dataset: {manifest['num_kept']} records {families} in {out / 'dataset'} "
               f"({summary['shards_built']} shards built, {summary['shards_skipped']} reused); card: {out / 'dataset' / 'README.md'}")


@app.command("score")
def score(
    dataset: Path = typer.Argument(..., help="A built dataset folder (with manifest.json)."),
    scorer: str = typer.Option(..., "--scorer", help="An image-text scorer: package.module:function or file.py:function, (image, text) -> float."),
    keep_fraction: float = typer.Option(0.5, "--keep-fraction", help="Share of records kept (the paper keeps the top 50%)."),
    per_modality: bool = typer.Option(True, "--per-modality/--global", help="Rank within each modality (default) or over all."),
) -> None:
    """Quality control stage 2: score image-text pairs with a local model and keep the top fraction."""
    from ..data.curation import load_scorer, score_dataset

    try:
        result = score_dataset(dataset, load_scorer(scorer), keep_fraction, per_modality)
    except (FileNotFoundError, ValueError, ImportError) as e:
        fail(str(e))
    typer.echo(f"scored {result['scored']} records, excluded {result['excluded']}; {result['kept']} kept")


@app.command("review-export")
def review_export(
    dataset: Path = typer.Argument(..., help="A built dataset folder."),
    out: Path = typer.Option(..., "--out", "-o", help="The HTML review sheet to write."),
    n: int = typer.Option(200, "--n", help="Samples, stratified by modality (the paper audits 200)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Quality control stage 3: export a self-contained HTML review sheet for expert reviewers."""
    from ..data.curation import export_review

    try:
        count = export_review(dataset, out, n, seed)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    typer.echo(f"wrote {out} with {count} samples; reviewers download verdicts.json from the page")


@app.command("review-import")
def review_import(
    dataset: Path = typer.Argument(..., help="A built dataset folder."),
    verdicts: Path = typer.Argument(..., help="verdicts.json downloaded from a review sheet."),
) -> None:
    """Apply expert verdicts: rejected samples are excluded, with the reviewer's comment as reason."""
    from ..data.curation import import_review

    try:
        result = import_review(dataset, verdicts)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as e:
        fail(str(e))
    typer.echo(f"applied {result['reviewed']} verdicts: {result['rejected']} rejected in total, {result['kept']} kept")


@app.command("locate")
def locate(
    config: Path = typer.Argument(..., help="The build config the dataset was built from."),
    items: list[str] = typer.Argument(..., help="Item labels from the rejection logs (source/hash)."),
) -> None:
    """Map hashed item labels of the rejection logs back to files (on the machine with the sources)."""
    from ..data.build_config import BuildConfigError
    from ..data.locate import locate_items

    try:
        found, missing = locate_items(config, items)
    except (BuildConfigError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    for label, path in found.items():
        typer.echo(f"{label}\t{path}")
    for label in missing:
        typer.secho(f"{label}\tnot found among the current items of the sources", fg=typer.colors.YELLOW, err=True)
