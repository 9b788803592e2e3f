"""Reading annotation tables: ``.csv``, ``.tsv``, ``.json`` (a list of objects) and ``.jsonl``.

Every row comes with the line of the file it starts on, so callers can say where a problem is:
:class:`TableError` messages read ``FILE, line N: what is wrong``.  The dataset builder's source
adapters and the evaluation harness's benchmark loaders both read their tables here.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

SUFFIXES = (".csv", ".tsv", ".json", ".jsonl")


class TableError(ValueError):
    """``line``: a line number, or another location such as ``"row 3"`` of a Parquet file."""

    def __init__(self, path: Path | str, line: int | str | None, message: str):
        where = "" if line is None else f", line {line}" if isinstance(line, int) else f", {line}"
        super().__init__(f"{path}{where}: {message}")
        self.path, self.line = Path(path), line


def read_rows(path: str | Path, *, partial_tail: bool = False) -> list[tuple[int, dict]]:
    """``(line, row)`` pairs of a table file, each row a dict.

    ``partial_tail`` (JSONL only) drops an unparsable last line without a newline - a write an
    interrupted process did not finish - instead of raising.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: table file not found")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise TableError(path, None, f"expected a {', '.join(SUFFIXES)} file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TableError(path, None, f"not UTF-8 text ({e})") from None
    if suffix in (".csv", ".tsv"):
        rows = _delimited(path, text, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl":
        rows = _jsonl(path, text, partial_tail)
    else:
        rows = _json_list(path, text)
    for line, row in rows:
        if not isinstance(row, dict):
            raise TableError(path, line, f"expected an object, got {type(row).__name__}")
    return rows


def require(path: Path | str, line: int | str | None, row: dict, keys, *, nullable: bool = False) -> None:
    """Raise :class:`TableError` when ``row`` lacks any of ``keys`` (or, unless ``nullable``,
    holds null there)."""
    missing = [k for k in keys if k not in row or (row[k] is None and not nullable)]
    if missing:
        raise TableError(path, line, f"missing field(s) {missing}")


def _delimited(path: Path, text: str, delimiter: str) -> list[tuple[int, dict]]:
    csv.field_size_limit(sys.maxsize)  # TSV benchmarks carry base64 images in one field
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise TableError(path, 1, "empty file (expected a header row)") from None
    except csv.Error as e:
        raise TableError(path, 1, f"not valid {path.suffix} ({e})") from None
    rows = []
    try:
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise TableError(path, line, f"{len(row)} columns where the header has {len(header)}")
            rows.append((line, dict(zip(header, row))))
    except csv.Error as e:
        raise TableError(path, reader.line_num, f"not valid {path.suffix} ({e})") from None
    return rows


def _jsonl(path: Path, text: str, partial_tail: bool) -> list[tuple[int, object]]:
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            if partial_tail and number == len(lines) and not text.endswith("\n"):
                break
            raise TableError(path, number, f"not valid JSON ({e.msg})") from None
    return rows


def _json_list(path: Path, text: str) -> list[tuple[int, object]]:
    """Items of a JSON list with the line each item starts on."""
    decoder = json.JSONDecoder()
    line_of = lambda pos: text.count("\n", 0, pos) + 1  # noqa: E731
    pos = len(text) - len(text.lstrip())
    if text[pos:pos + 1] != "[":
        raise TableError(path, line_of(pos), "expected a JSON list of objects")
    pos += 1
    items: list[tuple[int, object]] = []
    while True:
        pos = _skip_space(text, pos)
        if text[pos:pos + 1] == "]":
            return items
        if items:
            if text[pos:pos + 1] != ",":
                raise TableError(path, line_of(pos), "not valid JSON (expected ',' or ']' between items)")
            pos = _skip_space(text, pos + 1)
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise TableError(path, e.lineno, f"not valid JSON ({e.msg})") from None
        items.append((line_of(pos), item))
        pos = end


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos
