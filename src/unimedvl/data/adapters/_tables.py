"""Reading the CSV / JSON / JSONL annotation tables that adapters take."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def read_table(path: Path, required: set[str], where: str) -> list[dict]:
    """Rows of a ``.csv``, ``.json`` (a list of objects) or ``.jsonl`` file; checks ``required`` columns."""
    if not path.is_file():
        raise FileNotFoundError(f"{where}: annotation file {path} not found")
    name = path.name.lower()
    try:
        if name.endswith(".csv"):
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        elif name.endswith(".jsonl"):
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif name.endswith(".json"):
            rows = json.loads(path.read_text(encoding="utf-8"))
        else:
            raise ValueError(f"{where}: {path.name}: expected a .csv, .json or .jsonl file")
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: {path} is not valid {path.suffix} ({e})") from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{where}: {path} must hold a list of objects/rows")
    for i, row in enumerate(rows):
        missing = required - set(row)
        if missing:
            raise ValueError(f"{where}: {path.name} row {i}: missing field(s) {sorted(missing)}")
    return rows
