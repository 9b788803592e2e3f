"""The YAML build config: sources, splits, sharding and quality-control settings.

```yaml
salt: a-secret-string        # keys the patient hashes; keep it private and fixed for a corpus
seed: 0                      # split assignment and every other choice
splits: {val: 0.0, test: 0.1}
items_per_shard: 64          # work items (files / volumes) per Parquet shard
max_side: 1024               # images are stored at most this long on their long edge
qc: {min_side: 128}          # see unimedvl.data.qc.QCConfig
log_item_paths: false        # rejection logs name items by hash (paths can hold patient names)
sources:
  - {name: fundus, kind: image_folder, path: fundus/, modality: CFP, license: CC-BY-4.0,
     options: {labels: labels.csv}}
  - {name: site-b, kind: dicom, path: site_b/, split: test}   # a whole source held out
```

A source's ``split`` (default ``auto``: drawn per patient group from ``splits``) puts all of it in
one split - an external site kept for testing.  A patient present in two sources with different
fixed splits would span both: keep such sources' patients disjoint.

Relative source paths are resolved against the config file's folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..formats.yaml_config import check_fields, read_yaml
from .adapters.base import BuildContext, SourceConfig
from .qc import QCConfig

TOP_LEVEL = {"salt", "seed", "splits", "items_per_shard", "max_side", "qc", "sources", "log_item_paths"}
SOURCE_FIELDS = {"name", "kind", "path", "modality", "license", "options", "split"}
SOURCE_SPLITS = ("auto", "train", "val", "test")


class BuildConfigError(ValueError):
    pass


@dataclass
class BuildConfig:
    sources: list[SourceConfig]
    context: BuildContext
    items_per_shard: int = 64
    qc: QCConfig = field(default_factory=QCConfig)

    def fingerprint(self) -> str:
        """Changes whenever anything that shapes the output changes (the salt is not revealed)."""
        doc = {
            "sources": [{**s.__dict__, "path": str(s.path)} for s in self.sources],
            "context": {**self.context.__dict__, "salt": hashlib.sha256(self.context.salt.encode()).hexdigest()},
            "items_per_shard": self.items_per_shard,
            "qc": self.qc.__dict__,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _require(d: dict, key: str, kind: type, where: str):
    if key not in d:
        raise BuildConfigError(f"{where}: missing field {key!r}")
    if not isinstance(d[key], kind):
        raise BuildConfigError(f"{where}: field {key!r} must be {kind.__name__}, got {type(d[key]).__name__}")
    return d[key]


def parse_build_config(doc: dict, base_dir: Path, where: str = "build config") -> BuildConfig:
    if not isinstance(doc, dict):
        raise BuildConfigError(f"{where}: expected a mapping at the top level")
    check_fields(doc, TOP_LEVEL, where, BuildConfigError)
    salt = _require(doc, "salt", str, where)
    if len(salt) < 8:
        raise BuildConfigError(f"{where}: salt must be at least 8 characters (it keys the patient hashes)")
    splits = doc.get("splits", {}) or {}
    if not isinstance(splits, dict):
        raise BuildConfigError(f"{where}: splits must be a mapping like {{val: 0.05, test: 0.1}}, got {splits!r}")
    bad = set(splits) - {"val", "test"}
    if bad:
        raise BuildConfigError(f"{where}: splits may set val and test fractions, not {sorted(bad)}")
    val = _number(splits, "val", 0.0, f"{where}: splits")
    test = _number(splits, "test", 0.1, f"{where}: splits")
    if not (0 <= val and 0 <= test and val + test < 1):
        raise BuildConfigError(f"{where}: split fractions val={val}, test={test} must be >= 0 and sum below 1")
    log_paths = doc.get("log_item_paths", False)
    if not isinstance(log_paths, bool):
        raise BuildConfigError(f"{where}: field 'log_item_paths' must be true or false, got {log_paths!r}")
    ctx = BuildContext(salt=salt, seed=_integer(doc, "seed", 0, where, minimum=0), val_fraction=val, test_fraction=test,
                       max_side=_integer(doc, "max_side", 1024, where, minimum=1), log_item_paths=log_paths)
    try:
        qc_doc = doc.get("qc", {}) or {}
        if not isinstance(qc_doc, dict):
            raise BuildConfigError(f"{where}: qc must be a mapping, got {qc_doc!r}")
        qc = QCConfig.from_dict(qc_doc, f"{where}: qc")
    except (TypeError, ValueError) as e:
        raise BuildConfigError(str(e)) from e
    raw_sources = _require(doc, "sources", list, where)
    if not raw_sources:
        raise BuildConfigError(f"{where}: sources is empty")
    sources, names = [], set()
    for i, s in enumerate(raw_sources):
        w = f"{where}: sources[{i}]"
        if not isinstance(s, dict):
            raise BuildConfigError(f"{w}: expected a mapping")
        check_fields(s, SOURCE_FIELDS, w, BuildConfigError)
        options = s.get("options", {}) or {}
        if not isinstance(options, dict):
            raise BuildConfigError(f"{w}: field 'options' must be a mapping, got {options!r}")
        name = _require(s, "name", str, w)
        if name in names:
            raise BuildConfigError(f"{w}: duplicate source name {name!r}")
        names.add(name)
        path = Path(_require(s, "path", str, w)).expanduser()
        split = str(s.get("split", "auto"))
        if split not in SOURCE_SPLITS:
            raise BuildConfigError(f"{w}: split must be one of {list(SOURCE_SPLITS)}, got {split!r}")
        sources.append(SourceConfig(
            name=name, kind=_require(s, "kind", str, w), path=path if path.is_absolute() else (base_dir / path),
            modality=str(s.get("modality", "auto")), license=str(s.get("license", "unknown")), options=dict(options),
            split=split,
        ))
    per_shard = _integer(doc, "items_per_shard", 64, where, minimum=1)
    if ctx.max_side < qc.min_side:
        raise BuildConfigError(f"{where}: max_side={ctx.max_side} is below qc.min_side={qc.min_side}: every image would be "
                               "rejected as too small; max_side must be >= qc.min_side")
    return BuildConfig(sources, ctx, per_shard, qc)


def _integer(d: dict, key: str, default, where: str, minimum: int) -> int:
    """``d[key]`` as an integer >= ``minimum`` (``2.9`` is refused, not truncated)."""
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        raise BuildConfigError(f"{where}: field {key!r} must be an integer, got {value!r}")
    if value < minimum:
        raise BuildConfigError(f"{where}: field {key!r} must be >= {minimum}, got {value!r}")
    return int(value)


def _number(d: dict, key: str, default, where: str) -> float:
    import math

    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BuildConfigError(f"{where}: field {key!r} must be a number, got {value!r}")
    return float(value)


def load_build_config(path: str | Path) -> BuildConfig:
    path = Path(path)
    if not path.is_file():
        raise BuildConfigError(f"{path}: no such build config")
    return parse_build_config(read_yaml(path, BuildConfigError), path.parent, str(path))
