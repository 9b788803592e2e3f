"""The ``unimedvl`` command line: a table of thin commands over the Python API.

Each command is a plain typed function in a module of its family - it parses its options, calls the
Python API and prints; :data:`COMMANDS` and :data:`GROUPS` below are the whole command tree.
``common`` holds what the modules share (shared options, model resolution, the error exit).
"""

from __future__ import annotations

import logging
from typing import Callable

import typer

from . import data, demo, evaluation, inference, model, serve, training

# command name -> function, in the order ``unimedvl --help`` lists them
COMMANDS: dict[str, Callable[..., None]] = {
    "info": model.info,
    "manifest": model.manifest,
    "parity": model.parity,
    "quantize": model.quantize,
    "ask": inference.ask,
    "report": inference.report,
    "generate": inference.generate,
    "edit": inference.edit,
    "chat": inference.chat,
    "presets": inference.presets,
    "train": training.train,
    "export": training.export,
    "demo": demo.demo,
    "serve": serve.serve,
}

# sub-command groups: name -> typer app
GROUPS: dict[str, typer.Typer] = {
    "data": data.app,
    "eval": evaluation.app,
}

app = typer.Typer(add_completion=False, no_args_is_help=True, help="UniMedVL: understand and generate medical images.")
for _name, _function in COMMANDS.items():
    app.command(_name)(_function)
for _name, _group in GROUPS.items():
    app.add_typer(_group, name=_name)


def main() -> None:
    """The ``unimedvl`` entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


__all__ = ["COMMANDS", "GROUPS", "app", "main"]
