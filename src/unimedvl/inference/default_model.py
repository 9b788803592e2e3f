"""The model that ``unimedvl ask / report / generate / edit / chat / serve`` use when no ``--model``
is given: ``$UNIMEDVL_MODEL`` if set, else the one ``unimedvl demo`` registered last (a small JSON
file in ``$UNIMEDVL_HOME``, default ``$XDG_CONFIG_HOME/unimedvl`` or ``~/.config/unimedvl``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..formats.atomic import write_json

ENV_MODEL = "UNIMEDVL_MODEL"
ENV_HOME = "UNIMEDVL_HOME"
POINTER = "default_model.json"


def config_home() -> Path:
    if os.environ.get(ENV_HOME):
        return Path(os.environ[ENV_HOME]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config").expanduser()
    return base / "unimedvl"


def set_default_model(directory: str | Path, set_by: str) -> Path:
    """Register ``directory`` (a checkpoint in the official layout) as the default model; returns the pointer file."""
    path = config_home() / POINTER
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"model": str(Path(directory).resolve()), "set_by": set_by, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return path


def resolve_default_model() -> tuple[Path, str] | None:
    """``(directory, why)`` of the default model, or ``None`` when there is none."""
    if os.environ.get(ENV_MODEL):
        return Path(os.environ[ENV_MODEL]).expanduser(), f"${ENV_MODEL}"
    pointer = config_home() / POINTER
    if not pointer.is_file():
        return None
    try:
        doc = json.loads(pointer.read_text())
        directory = Path(doc["model"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    if not directory.is_dir():
        return None
    return directory, f"registered by `{doc.get('set_by', 'unimedvl demo')}` in {pointer}"
