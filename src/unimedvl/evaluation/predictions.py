"""Prediction files: JSONL lines of ``{"id": ..., "prediction": ...}``.

A run appends each answer as soon as it exists (one line, flushed and synced), so an interrupted
run loses at most the line being written; :func:`read_predictions` with ``partial_tail=True``
drops such an unfinished last line and :func:`PredictionLog` cuts it off before appending.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..formats.tables import TableError, read_rows, require


PredictionFileError = TableError  # "FILE, line N: what is wrong"


def read_predictions(path: str | Path, *, partial_tail: bool = False) -> dict[str, str]:
    """``id -> prediction`` (ids as strings).  Every line must be an object with ``id`` and a
    string ``prediction``; ids must be unique.  ``partial_tail`` ignores an unparsable last line
    that has no newline (a write the interrupted run did not finish)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: predictions file not found")
    out: dict[str, str] = {}
    seen_at: dict[str, int] = {}
    for number, row in read_rows(path, partial_tail=partial_tail):
        require(path, number, row, ("id", "prediction"))
        if not isinstance(row["prediction"], str):
            raise PredictionFileError(path, number, f"'prediction' must be a string, got {type(row['prediction']).__name__}")
        key = str(row["id"])
        if key in seen_at:
            raise PredictionFileError(path, number, f"id {key!r} already given on line {seen_at[key]}")
        seen_at[key] = number
        out[key] = row["prediction"]
    return out


class PredictionLog:
    """Append-only predictions of a running evaluation (resumable)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done = read_predictions(self.path, partial_tail=True) if self.path.exists() else {}
        self._drop_partial_tail()
        self._file = open(self.path, "a", encoding="utf-8")

    def _drop_partial_tail(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            keep = raw.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(keep)

    def append(self, question_id: str, prediction: str, **extra) -> None:
        self._file.write(json.dumps({"id": question_id, "prediction": prediction, **extra}, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done[question_id] = prediction

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "PredictionLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
