"""Map the item labels of rejection logs back to files, on the machine that holds the sources.

Logs name a work item ``source/hash`` by default (archive paths can carry patient names, see
:func:`~unimedvl.data.adapters.base.item_label`); the hash is only reversible by listing the
sources' items again with the same config - what :func:`locate_items` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .adapters import make_adapter
from .adapters.base import item_label
from .build_config import BuildConfig, load_build_config


def locate_items(config: BuildConfig | str | Path, labels: Iterable[str]) -> tuple[dict[str, Path], list[str]]:
    """``(found, missing)``: ``found`` maps each label of ``labels`` that names a current item of
    ``config``'s sources (a :class:`BuildConfig` or the path of its YAML file) to the item's file,
    in the sources' order; ``missing`` lists, sorted, the labels that name none.

    Raises :class:`~unimedvl.data.build_config.BuildConfigError`, ``FileNotFoundError`` or
    ``ValueError`` for a config that cannot be read or a source that cannot be listed."""
    cfg = config if isinstance(config, BuildConfig) else load_build_config(config)
    wanted = set(labels)
    found: dict[str, Path] = {}
    for source in cfg.sources:
        if not wanted:
            break
        # hashed labels start with their source's name; a source none of them names is not listed
        if not cfg.context.log_item_paths and not any(w.startswith(source.name + "/") for w in wanted):
            continue
        for item in make_adapter(source, cfg.context).items():
            label = item_label(cfg.context, source, item)
            if label in wanted:
                found[label] = source.path / item.split("#")[0]  # "#..." names a part of a file
                wanted.discard(label)
    return found, sorted(wanted)
