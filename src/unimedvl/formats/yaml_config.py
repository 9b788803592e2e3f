"""YAML configuration files (build configs, curriculum plans): reading and field checks whose
errors name the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable


def read_yaml(path: str | Path, error: type[Exception]):
    """The parsed document of the YAML file ``path``; ``error`` (naming the file) when it is not valid YAML."""
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({e})") from e


def check_fields(doc: dict, known: Iterable[str], where: str, error: type[Exception] = ValueError) -> None:
    """``error`` naming the fields of ``doc`` that are not ``known``, and the known ones."""
    known = set(known)
    extra = set(doc) - known
    if extra:
        raise error(f"{where}: unknown field(s) {sorted(extra)}; known: {sorted(known)}")
