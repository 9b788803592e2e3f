"""Atomic file writes: every file the project produces appears under its final name complete or
not at all.  The data goes to a hidden temporary file in the same folder (``.NAME.*.partial``),
is flushed to disk, then renamed over the final name; an interrupted write leaves only the
temporary file, which resumable jobs delete on restart.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj, **dumps_options) -> None:
    """``obj`` as JSON, keys sorted unless ``dumps_options`` say otherwise."""
    write_text(path, json.dumps(obj, **{"sort_keys": True, **dumps_options}))


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """One JSON object per line (keys sorted), each line ending in a newline."""
    write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
