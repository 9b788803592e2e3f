"""The user-facing surface of the ``unimedvl`` command line: every command path with its
parameters' names, short aliases, defaults and environment variables.

``python tests/cli_surface.py > tests/cli_surface.json`` records it (run with the ``unimedvl`` of the
commit to record, e.g. ``PYTHONPATH=/tmp/cli-orig/src``); ``tests/test_cli_surface.py`` compares the
current app with the recording.
"""

from __future__ import annotations

import json
import sys
from pathlib import PurePath


def _plain(value):
    """A parameter default as JSON (paths as strings, tuples as lists)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


def _param(p) -> dict:
    return {
        "name": p.name,
        "kind": p.param_type_name,  # "argument" or "option"
        "opts": list(p.opts),
        "secondary_opts": list(p.secondary_opts),
        "required": bool(p.required),
        "multiple": bool(p.multiple),
        "nargs": p.nargs,
        "default": _plain(p.default),
        "envvar": _plain(p.envvar),
        "is_flag": bool(getattr(p, "is_flag", False)),
        "type": _type_name(p),
    }


def _type_name(p) -> str:
    descriptor = getattr(p, "type_descriptor", None)  # typer >= 0.2x; older typers expose click's ``type``
    annotation = descriptor.annotation if descriptor is not None else None
    if annotation is None:
        return getattr(getattr(p, "type", None), "name", "?")
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


def walk(command, path: str = "") -> dict[str, dict]:
    """``{"data build": {"group": False, "params": {name: {...}}}, ...}``; the root is ``""``.

    Duck-typed (typer vendors its own click, whose classes are not ``click``'s)."""
    group = hasattr(command, "commands")
    out = {path: {"group": group, "params": {p.name: _param(p) for p in command.params}}}
    if group:
        for name, sub in command.commands.items():
            out.update(walk(sub, f"{path} {name}".strip()))
    return out


def surface(app=None) -> dict[str, dict]:
    """The surface of ``app`` (default: ``unimedvl.cli.app``)."""
    import typer

    if app is None:
        from unimedvl.cli import app
    return walk(typer.main.get_command(app))


def names(recorded: dict[str, dict]) -> set[str]:
    """Every user-visible name as a flat set: ``"data build"``, ``"data build --out"``,
    ``"data build -o"``, ``"data build <config>"``, ``"ask --no-stream"``..."""
    out = set()
    for path, command in recorded.items():
        out.add(path)
        for p in command["params"].values():
            if p["kind"] == "argument":
                out.add(f"{path} <{p['name']}>".strip())
            else:
                out.update(f"{path} {opt}".strip() for opt in p["opts"] + p["secondary_opts"])
    return out


if __name__ == "__main__":
    json.dump(surface(), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
