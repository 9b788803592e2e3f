"""What every source adapter shares: its configuration, stable ids, patient groups and splits."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..schema import MODALITIES, Record, Rejection


@dataclass(frozen=True)
class SourceConfig:
    """One ``sources:`` entry of a build config."""

    name: str
    kind: str
    path: Path
    modality: str = "auto"  # one of MODALITIES, or "auto" where the adapter can tell (DICOM)
    license: str = "unknown"
    options: dict = field(default_factory=dict)
    # "auto": each patient group's split is drawn from the configured fractions; "train", "val" or
    # "test" puts the whole source there (an external site or a held-out volume kept for testing)
    split: str = "auto"


@dataclass(frozen=True)
class BuildContext:
    salt: str  # keyed hashing of patient identifiers; keep it secret, keep it fixed per corpus
    seed: int = 0
    val_fraction: float = 0.0
    test_fraction: float = 0.1
    max_side: int = 1024
    log_item_paths: bool = False  # rejection logs name items by hash unless this is set (paths may hold names)


def stable_hash(*parts: str, length: int = 16) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:length]


class Adapter:
    """Turns a source into work items, and a work item into records (or rejections).

    ``items()`` is deterministic (sorted) and cheap; ``process(item)`` does the reading and may be
    run in any worker process.  Items are strings (a path relative to the source root, with an
    optional ``#suffix``) so that they can be recorded in the rejection log.
    """

    kind = ""
    options: dict = {}  # option name -> default, checked against the config
    requires_modality = True  # False where the adapter reads the modality from the files (DICOM, VQA formats)

    def __init__(self, source: SourceConfig, ctx: BuildContext):
        unknown = set(source.options) - set(self.options)
        if unknown:
            raise ValueError(f"source {source.name!r} (kind {self.kind}): unknown option(s) {sorted(unknown)}; known: {sorted(self.options)}")
        if source.modality != "auto" and source.modality not in MODALITIES:
            raise ValueError(f"source {source.name!r}: modality must be one of {MODALITIES} or auto, got {source.modality!r}")
        if not source.path.exists():
            raise FileNotFoundError(f"source {source.name!r}: {source.path} does not exist")
        if self.requires_modality and source.modality == "auto":
            raise ValueError(f"source {source.name!r}: kind {self.kind} needs an explicit modality")
        self.source, self.ctx = source, ctx
        self._check_option_types(source)
        self.opt = {**self.options, **source.options}
        for name, allowed in self.option_choices.items():
            if name in source.options and source.options[name] not in allowed:
                raise ValueError(f"source {source.name!r} (kind {self.kind}): options.{name} must be one of "
                                 f"{[a for a in allowed]}, got {source.options[name]!r}")

    option_choices: dict = {}  # option name -> the values it may take (checked up front)
    nullable_options: frozenset = frozenset()  # options whose default is not None but that also take null

    def _check_option_types(self, source: SourceConfig) -> None:
        """Each option set in the config has its default's type (a count is a positive integer), so a
        value no file can satisfy is refused before anything is read."""
        for name, value in source.options.items():
            default = self.options[name]
            if default is None or (value is None and name in self.nullable_options):
                continue
            where = f"source {source.name!r} (kind {self.kind}): options.{name}"
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{where} must be true or false, got {value!r}")
            elif isinstance(default, int):
                low = 0 if default == 0 else 1  # an index (default 0) or a count
                if isinstance(value, bool) or not isinstance(value, int) or value < low:
                    raise ValueError(f"{where} must be an integer >= {low}, got {value!r}")
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                    raise ValueError(f"{where} must be a number in [0, 1], got {value!r}")
            elif isinstance(default, str):
                if not isinstance(value, str):
                    raise ValueError(f"{where} must be a string, got {value!r}")
            elif isinstance(default, (list, tuple)):
                if not isinstance(value, (list, tuple)):
                    raise ValueError(f"{where} must be a list, got {value!r}")
            elif isinstance(default, dict):
                if not isinstance(value, dict):
                    raise ValueError(f"{where} must be a mapping, got {value!r}")

    def items(self) -> list[str]:
        raise NotImplementedError

    def process(self, item: str) -> Iterator[Record | Rejection]:
        raise NotImplementedError

    # ---- helpers --------------------------------------------------------------------------
    def record_id(self, item: str, task: str, k: int = 0) -> str:
        return stable_hash(self.source.name, item, task, str(k), length=20)

    def provenance(self, group: str, modality: str | None = None) -> dict:
        """The record fields every sample of this source shares: modality, source, licence,
        patient group and the group's split."""
        return dict(modality=modality or self.source.modality, source=self.source.name, license=self.source.license,
                    patient_group=group, split=self.split_for(group))

    def patient_group(self, patient_id: str | None, item: str) -> str:
        """Salted hash of the patient identifier; without one, each item is its own group."""
        key = f"patient:{patient_id}" if patient_id else f"item:{self.source.name}/{item}"
        return stable_hash(self.ctx.salt, key, length=16)

    def split_for(self, group: str) -> str:
        """By patient group, so no patient spans two splits (a source with a fixed ``split`` goes there whole)."""
        if self.source.split != "auto":
            return self.source.split
        u = int(stable_hash(str(self.ctx.seed), group, length=12), 16) / 16**12
        if u < self.ctx.test_fraction:
            return "test"
        if u < self.ctx.test_fraction + self.ctx.val_fraction:
            return "val"
        return "train"

    def path_of(self, item: str) -> Path:
        """The file of a file-backed item (an item is its path relative to the source folder)."""
        return self.source.path / item if self.source.path.is_dir() else self.source.path

    def read_images(self, item: str, *paths: Path, resize: bool = True) -> list | Rejection:
        """The images at ``paths`` as 8-bit RGB arrays (at most ``max_side`` long when ``resize``),
        or the ``unreadable`` rejection of ``item`` naming what failed."""
        from ...formats.medical_io import MedicalImageError, read_medical_image
        from ..imaging import limit_size

        images = []
        for path in paths:
            try:
                pixels = read_medical_image(path).pixels
            except MedicalImageError as e:
                return self.reject(item, "unreadable", str(e), paths=paths)
            images.append(limit_size(pixels, self.ctx.max_side) if resize else pixels)
        return images

    def reject(self, item: str, reason: str, detail: str = "", stage: str = "read", paths: Iterable[Path] = ()) -> Rejection:
        """A rejection of ``item``; ``paths`` are the files it read, kept out of the detail text
        like the item itself unless the build logs paths."""
        return make_rejection(self.ctx, self.source, item, stage, reason, detail, paths)


def read_annotations(source: SourceConfig, file_name: str, required) -> list[dict]:
    """The rows of a source's annotation table (CSV, TSV, JSON or JSONL) with the ``required``
    fields; errors name the source, the file and the line."""
    from ...formats.tables import TableError, read_rows, require

    path = source.path / file_name
    if not path.is_file():
        raise FileNotFoundError(f"source {source.name!r}: annotation file {path} not found")
    try:
        rows = read_rows(path)
        for line, row in rows:
            require(path, line, row, sorted(required), nullable=True)
    except TableError as e:
        raise ValueError(f"source {source.name!r}: {e}") from None
    return [row for _, row in rows]


class TableAdapter(Adapter):
    """A source described by one annotation table (the file named by option ``table_option``): an
    item per row, named by :meth:`row_key`."""

    table_option = "table"

    def __init__(self, source: SourceConfig, ctx: BuildContext):
        super().__init__(source, ctx)
        self.rows = {self.row_key(r): r for r in read_annotations(source, self.opt[self.table_option], self.columns())}

    def columns(self) -> set[str]:
        """The fields every row needs (the options are checked by then)."""
        raise NotImplementedError

    def row_key(self, row: dict) -> str:
        raise NotImplementedError

    def items(self) -> list[str]:
        return sorted(self.rows)

    def read_row_image(self, item: str) -> "RowImage | Rejection":
        """The one image a row names (its item is the image's path below the source): 8-bit RGB
        pixels, their PNG bytes, the record provenance of the row's patient group and the size meta."""
        from ..imaging import png_bytes

        read = self.read_images(item, self.source.path / item)
        if isinstance(read, Rejection):
            return read
        (pixels,) = read
        group = self.patient_group(self.rows[item].get("patient"), item)
        return RowImage(pixels, png_bytes(pixels), self.provenance(group), {"width": pixels.shape[1], "height": pixels.shape[0]})


@dataclass
class RowImage:
    pixels: np.ndarray  # [H, W, 3] uint8
    png: bytes
    provenance: dict  # source, license, modality, patient group and split of the row's records
    size: dict  # {"width", "height"} for the records' meta


def item_label(ctx: BuildContext, source: SourceConfig, item: str) -> str:
    """How logs name a work item: its path, or (by default) ``source/hash`` - archive paths can
    carry patient names.  ``unimedvl data locate`` maps a hash back to the file on the build machine."""
    return item if ctx.log_item_paths else f"{source.name}/{item_hash(source.name, item)}"


def item_hash(source_name: str, item: str) -> str:
    """A work item's stable key: the records' ``item_hash`` and the hashed name in logs."""
    return stable_hash(source_name, item, length=16)


MAX_DETAIL = 200  # characters of a rejection's detail text


def make_rejection(ctx: BuildContext, source: SourceConfig, item: str, stage: str, reason: str, detail: str,
                   paths: Iterable[Path] = ()) -> Rejection:
    """A rejection whose detail never names the source folder and, unless ``log_item_paths`` is
    set, never names the item or the files it read (file and folder names can hold patient names)."""
    if ctx.log_item_paths:
        detail = detail.replace(str(source.path), "<source>")
    else:
        names = {str(source.path / item), str(source.path), item, *re.split(r"[/\\|#]|->", item)}
        for path in map(Path, paths):
            inside = path.is_relative_to(source.path)
            names |= {str(path), *(path.relative_to(source.path).parts if inside else (path.name,))}
        for text in sorted(names, key=len, reverse=True):
            if len(text) >= 3:
                detail = detail.replace(text, "<item>")
    return Rejection(item_label(ctx, source, item), source.name, stage, reason, detail[:MAX_DETAIL])


def file_items(root: Path, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """The items of a file-backed source: paths of the regular files under ``root`` relative to
    it (or the name of ``root`` itself when it is a file), sorted, hidden files skipped; see
    :meth:`Adapter.path_of`."""
    if root.is_file():
        return [root.name]
    out = []
    for p in sorted(root.rglob("*")):
        relative = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in relative.parts):
            if suffixes is None or p.name.lower().endswith(suffixes):
                out.append(str(relative))
    return out
