"""Placing one model over several devices: whole decoder layers, in order, within memory budgets.

A :class:`PlacementPlan` maps *units* - state-dict prefixes - to devices:

* the parts outside the decoder layers (token embeddings, ViT, connector, position tables,
  generation adapters, autoencoder, final norms, LM head) form one group that always sits on the
  **first device**: it is where inputs are built and outputs are read, i.e. ``model.device``;
* every decoder layer ``language_model.model.layers.{i}`` is one unit, and its KV caches live
  with it (a cache is allocated on the device of the keys it receives).

:func:`plan_placement` computes a plan from budgets (``{"cuda:0": bytes, "cpu": bytes}``, in
order).  The rule, in order of the devices:

1. every device keeps ``headroom`` (default 10%) of its budget free for activations and temporaries;
2. the first device takes the group outside the decoder layers (an error when it does not fit);
3. layers ``0, 1, ...`` are then given to the current device while its budget lasts - each layer
   counts its weights *plus* the KV cache of ``kv_tokens`` tokens (default: the context window,
   summed over all live contexts) - and the next layer that does not fit moves on to the next
   device, never back.  Layers are therefore contiguous and in order on each device.  When the
   devices run out, :class:`PlacementError` says how many GiB are needed and how many were given.

Sizes come from the state dict of the model the plan is for - the meta model ``load_pretrained``
builds, after quantisation - so an int8 layer counts one byte per weight plus its scales.

:func:`apply_placement` moves each unit to its device and installs hooks *from outside* the
model: a forward pre-hook on each decoder layer that runs away from the first device moves its
inputs (activations, RoPE tables, expert routing indices, attention masks) to the layer's device -
the per-forward inputs are copied once per device and forward, not once per layer - and a forward
hook on the last layer brings the hidden states back to the first device.  :meth:`Placement.remove`
takes the hooks off again.

``"cpu:1"``-style labels all denote host memory; they let tests (and curious users) split a plan
over "several" placements on a CPU-only machine: the hooks run exactly as they would between GPUs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import weakref
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..model import UniMedVL
from ..model.quantized import quantize_model

LAYERS = "language_model.model.layers"
# modules split into their children when listing units; the decoder layers are listed separately
_CONTAINERS = ("", "language_model", "language_model.model")
# where the hidden states return to after the last layer (the final norms, then lm_head / llm2vae)
RETURN_UNIT = "language_model.model.norm"
DEFAULT_HEADROOM = 0.10
GIB = 2**30

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_MAX_MEMORY_FORM = "DEVICE=SIZE[,DEVICE=SIZE...], e.g. cuda:0=20GiB,cpu=64GiB"


class PlacementError(ValueError):
    """A placement that cannot be made: bad budgets or plan, or a model that does not fit."""


# ---- budgets -----------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``"20GiB"`` -> 21474836480.  Decimal units (KB, MB, GB, TB) are powers of 1000, binary ones
    (KiB, MiB, GiB, TiB, and the bare K, M, G, T) powers of 1024; no unit means bytes."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in ("", *_UNITS):
        raise PlacementError(f"{str(text).strip()!r} is not a size (a number with an optional unit: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    value = int(float(m.group(1)) * _UNITS.get(unit, 1))
    if value <= 0:
        raise PlacementError(f"the size {str(text).strip()!r} is not positive")
    return value


def normalize_device(name: str | int | torch.device) -> str:
    """A device name as plans spell it: ``0`` and ``cuda`` -> ``cuda:0``; ``cpu``, ``cpu:1``, ``cuda:1`` unchanged."""
    if isinstance(name, int) or (isinstance(name, str) and name.strip().isdigit()):
        return f"cuda:{int(name)}"
    try:
        device = torch.device(name.strip() if isinstance(name, str) else name)
    except (RuntimeError, ValueError) as e:
        raise PlacementError(f"{name!r} is not a device name (e.g. cuda:0, cpu)") from e
    if device.type == "meta":
        raise PlacementError("the meta device holds no data: it cannot take part of a model")
    if device.type == "cuda" and device.index is None:
        return "cuda:0"
    return str(device)


def parse_max_memory(text: str | Mapping[str, int | str]) -> dict[str, int]:
    """``"cuda:0=20GiB,cpu=64GiB"`` (or a mapping) -> ``{"cuda:0": 21474836480, "cpu": 68719476736}``, in order."""
    items = list(text.items()) if isinstance(text, Mapping) else None
    if items is None:
        entries = [e for e in str(text).split(",") if e.strip()]
        if not entries:
            raise PlacementError(f"max memory {text!r} is empty: expected {_MAX_MEMORY_FORM}")
        items = []
        for entry in entries:
            device, sep, size = entry.partition("=")
            if not sep or not device.strip() or not size.strip():
                raise PlacementError(f"max memory entry {entry.strip()!r} is not DEVICE=SIZE; expected {_MAX_MEMORY_FORM}")
            items.append((device, size))
    budgets: dict[str, int] = {}
    for device, size in items:
        entry = f"{str(device).strip()}={str(size).strip()}"
        try:
            name = normalize_device(device)
            value = size if isinstance(size, int) and not isinstance(size, bool) else parse_size(size)
            if value <= 0:
                raise PlacementError(f"the size {size} is not positive")
        except PlacementError as e:
            raise PlacementError(f"max memory entry {entry!r}: {e}; expected {_MAX_MEMORY_FORM}") from None
        if name in budgets:
            raise PlacementError(f"max memory names {name} twice")
        budgets[name] = value
    return budgets


def _host_available() -> int:
    """Bytes of host memory available now (``MemAvailable`` on Linux, else free pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_memory() -> dict[str, int]:
    """The budgets of ``device_map="auto"`` without ``max_memory``: the free memory of every visible
    GPU (``torch.cuda.mem_get_info``), in index order, then the available host memory."""
    budgets = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            budgets[f"cuda:{i}"] = int(torch.cuda.mem_get_info(i)[0])
    budgets["cpu"] = _host_available()
    return budgets


# ---- units and sizes ---------------------------------------------------------------------------


def placement_units(model: nn.Module) -> tuple[list[str], list[str]]:
    """``(outside, layers)``: the units outside the decoder layers (the children of the model, the
    language model and its decoder, except the layer list) and the decoder layers in order."""
    outside = []
    for parent in _CONTAINERS:
        for name, _ in model.get_submodule(parent).named_children():
            full = f"{parent}.{name}" if parent else name
            if full not in _CONTAINERS and full != LAYERS:
                outside.append(full)
    layers = [f"{LAYERS}.{i}" for i in range(len(model.get_submodule(LAYERS)))]
    return outside, layers


def _unit_of(key: str, units: list[str]) -> str | None:
    """The unit a state-dict key (or module name) belongs to: the longest unit prefix."""
    best = None
    for unit in units:
        if (key == unit or key.startswith(unit + ".")) and (best is None or len(unit) > len(best)):
            best = unit
    return best


_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unit_sizes(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes of each unit's state-dict tensors: those in a compute dtype (fp32/fp16/bf16) counted in
    ``dtype`` (``None``: as they are), the others - quantised weights (int8, packed uint8, fp8) - at
    their own size.  Works on the meta device.  (The few float32 scales a quantised checkpoint keeps
    in float32 are counted in ``dtype`` too: well under 1% of a layer.)"""
    outside, layers = placement_units(model)
    units = outside + layers
    sizes = dict.fromkeys(units, 0)
    for key, t in model.state_dict(keep_vars=True).items():
        unit = _unit_of(key, units)
        if unit is None:  # a tensor held by a container itself: it goes with the first device's group
            unit = outside[0]
        itemsize = dtype.itemsize if dtype is not None and t.dtype in _COMPUTE_DTYPES else t.element_size()
        sizes[unit] += t.numel() * itemsize
    return sizes


def _model_dtype(model: nn.Module) -> torch.dtype:
    return model.get_submodule("language_model.model.embed_tokens").weight.dtype


def kv_bytes_per_layer(model: nn.Module, kv_tokens: int | None = None, dtype: torch.dtype | None = None) -> int:
    """KV cache bytes one decoder layer needs for ``kv_tokens`` tokens (default: the context window):
    keys and values, ``kv_heads x head_dim`` each, in the compute dtype."""
    cfg = model.config.llm
    tokens = cfg.max_position_embeddings if kv_tokens is None else int(kv_tokens)
    if tokens < 0:
        raise PlacementError(f"kv_tokens must be >= 0, got {tokens}")
    itemsize = (dtype or _model_dtype(model)).itemsize
    return 2 * cfg.num_kv_heads * cfg.head_dim * itemsize * tokens


# ---- the plan ----------------------------------------------------------------------------------


def _gib(n: int | float) -> str:
    """Bytes for people: GiB from 1 GiB up, MiB or KiB below (tiny models)."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _layer_index(unit: str) -> int:
    return int(unit.rsplit(".", 1)[1])


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    parts, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            parts.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ", ".join(parts)


@dataclass
class PlacementPlan:
    """Units (state-dict prefixes) -> devices, in model order: the parts outside the decoder layers
    first (all on the first device), then the decoder layers.

    ``sizes``/``kv`` are the bytes of each unit's weights and of each layer's KV reserve, and
    ``budgets``/``headroom`` what the plan was computed within (empty for explicit plans)."""

    units: dict[str, str]
    sizes: dict[str, int] = field(default_factory=dict)
    kv: dict[str, int] = field(default_factory=dict)
    budgets: dict[str, int] = field(default_factory=dict)
    headroom: float = 0.0
    kv_tokens: int | None = None

    @property
    def devices(self) -> list[str]:
        """The devices the plan uses, in order (the first one first)."""
        return list(dict.fromkeys(self.units.values()))

    @property
    def first_device(self) -> str:
        """Where inputs are built and outputs read: the device of everything outside the decoder layers."""
        return self.units[next(u for u in self.units if not u.startswith(LAYERS + "."))]

    def layers_on(self, device: str) -> list[int]:
        return [_layer_index(u) for u, d in self.units.items() if d == device and u.startswith(LAYERS + ".")]

    def device_of(self, key: str) -> str:
        """The device of a state-dict key or module name (the first device for anything outside the units)."""
        unit = _unit_of(key, list(self.units))
        return self.units[unit] if unit is not None else self.first_device

    def bytes_on(self, device: str) -> int:
        """Weights plus KV reserve the plan puts on ``device``."""
        return sum(self.sizes.get(u, 0) + self.kv.get(u, 0) for u, d in self.units.items() if d == device)

    def to_json(self) -> dict:
        """The plan as JSON; its ``units`` (or the whole object) is a ``--device-map`` file."""
        out: dict = {"units": dict(self.units)}
        if self.sizes:
            out["bytes"] = {d: self.bytes_on(d) for d in self.devices}
        if self.budgets:
            out["budgets"] = dict(self.budgets)
            out["headroom"] = self.headroom
            out["kv_tokens"] = self.kv_tokens
        return out

    def describe(self) -> str:
        """Units per device with their GiB: what ``unimedvl info --device-map`` prints."""
        lines = []
        if self.budgets:
            lines.append(f"placement over {', '.join(f'{d}={_gib(b)}' for d, b in self.budgets.items())} "
                         f"({self.headroom:.0%} headroom per device; KV reserve {self.kv_tokens} tokens per layer)")
        for device in self.devices:
            outside = [u for u, d in self.units.items() if d == device and not u.startswith(LAYERS + ".")]
            layers = self.layers_on(device)
            parts = []
            if outside:
                parts.append("outside the decoder (" + ", ".join(u.rsplit(".", 1)[-1] if u.startswith("language_model") else u
                                                              for u in outside) + ")")
            if layers:
                parts.append(f"layers {_ranges(layers)} ({len(layers)})")
            line = f"{device}: " + " + ".join(parts)
            if self.sizes:
                weights = sum(self.sizes.get(u, 0) for u, d in self.units.items() if d == device)
                kv = sum(self.kv.get(u, 0) for u, d in self.units.items() if d == device)
                line += f"; {_gib(weights)} weights + {_gib(kv)} KV = {_gib(weights + kv)}"
            if device in self.budgets:
                line += f" of {_gib(self.budgets[device])}"
            lines.append(line)
        return "\n".join(lines)


def plan_placement(
    model: nn.Module,
    max_memory: Mapping[str, int | str] | str | None = None,
    *,
    dtype: torch.dtype | None = None,
    kv_tokens: int | None = None,
    headroom: float = DEFAULT_HEADROOM,
) -> PlacementPlan:
    """The placement of ``model`` (typically the meta model of a load) within ``max_memory``
    (budgets in order; ``None``: :func:`available_memory`) by the rule of the module docstring.
    ``dtype`` is the dtype floating-point weights will have (``None``: their current one)."""
    budgets = available_memory() if max_memory is None else parse_max_memory(max_memory)
    if not 0.0 <= headroom < 1.0:
        raise PlacementError(f"headroom must be in [0, 1), got {headroom}")
    outside, layers = placement_units(model)
    sizes = unit_sizes(model, dtype)
    kv = kv_bytes_per_layer(model, kv_tokens, dtype)
    tokens = model.config.llm.max_position_embeddings if kv_tokens is None else int(kv_tokens)
    devices = list(budgets)
    usable = {d: int(b * (1.0 - headroom)) for d, b in budgets.items()}
    first = devices[0]
    outside_bytes = sum(sizes[u] for u in outside)
    if outside_bytes > usable[first]:
        raise PlacementError(
            f"the parts outside the decoder layers (embeddings, ViT, LM head, ...) need {_gib(outside_bytes)} on the first "
            f"device {first}, whose budget {_gib(budgets[first])} leaves {_gib(usable[first])} after {headroom:.0%} headroom; "
            "give the first device more memory")
    free = dict(usable)
    free[first] -= outside_bytes
    units = dict.fromkeys(outside, first)
    k = 0
    for unit in layers:
        need = sizes[unit] + kv
        while k < len(devices) and need > free[devices[k]]:
            k += 1
        if k == len(devices):
            total = sum(sizes.values()) + kv * len(layers)
            left = [_layer_index(u) for u in layers[layers.index(unit):]]
            raise PlacementError(
                f"the model does not fit: it needs {_gib(total)} ({_gib(sum(sizes.values()))} of weights + {_gib(kv * len(layers))} "
                f"of KV cache for {tokens} tokens) but the budgets give {_gib(sum(budgets.values()))} "
                f"({', '.join(f'{d}={_gib(b)}' for d, b in budgets.items())}; {_gib(sum(usable.values()))} usable after "
                f"{headroom:.0%} headroom); decoder layers {_ranges(left)} ({_gib(need)} each with their KV cache) found no room")
        units[unit] = devices[k]
        free[devices[k]] -= need
    return PlacementPlan(units, sizes, dict.fromkeys(layers, kv), budgets, headroom, tokens)


def resolve_plan(model: nn.Module, mapping: Mapping[str, str] | PlacementPlan, *, dtype: torch.dtype | None = None,
                 kv_tokens: int | None = None) -> PlacementPlan:
    """An explicit plan ``{prefix: device}`` resolved to every unit of ``model``: each unit takes the
    device of its longest prefix in ``mapping`` (``""`` matches everything).  Prefixes must name
    units or groups of units; everything outside the decoder layers must end up on one device."""
    if isinstance(mapping, PlacementPlan):
        mapping = mapping.units
    outside, layers = placement_units(model)
    units = outside + layers
    groups = set(_CONTAINERS) | {LAYERS}
    cleaned: dict[str, str] = {}
    for prefix, device in mapping.items():
        if prefix not in groups and prefix not in units:
            inside = _unit_of(prefix, units)
            if inside is not None:
                raise PlacementError(f"device map entry {prefix!r}: placement works on whole units; use {inside!r}")
            raise PlacementError(f"device map entry {prefix!r} names no part of this model (e.g. '', 'vit_model', "
                                 f"'{LAYERS}', '{LAYERS}.0')")
        cleaned[prefix] = normalize_device(device)
    resolved: dict[str, str] = {}
    unplaced = []
    for unit in units:
        best = None
        for prefix in cleaned:
            if (prefix == "" or unit == prefix or unit.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
                best = prefix
        if best is None:
            unplaced.append(unit)
        else:
            resolved[unit] = cleaned[best]
    if unplaced:
        raise PlacementError(f"the device map places no device for {', '.join(unplaced[:5])}"
                             + (f" (+{len(unplaced) - 5} more)" if len(unplaced) > 5 else "") + "; add an entry '' for the rest")
    heads = {resolved[u] for u in outside}
    if len(heads) > 1:
        raise PlacementError(f"everything outside the decoder layers must be on one device (the first), got {sorted(heads)}")
    sizes = unit_sizes(model, dtype)
    kv = kv_bytes_per_layer(model, kv_tokens, dtype)
    return PlacementPlan(resolved, sizes, dict.fromkeys(layers, kv), kv_tokens=kv_tokens)


def read_plan_file(path: str | Path) -> dict[str, str]:
    """A ``--device-map`` JSON file: ``{"units": {prefix: device}}`` (as ``unimedvl info --json``
    writes it) or a flat ``{prefix: device}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlacementError(f"--device-map {path}: no such file (give 'auto' or a JSON plan file)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise PlacementError(f"--device-map {path}: not a readable JSON plan ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("units"), dict):
        data = data["units"]
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, (str, int)) for k, v in data.items()):
        raise PlacementError(f"--device-map {path}: expected a JSON object {{module prefix: device}}")
    return {k: str(v) for k, v in data.items()}


class Planner:
    """What ``load_pretrained(device_map=...)`` calls on its meta model: computes (``"auto"``) or
    resolves (a mapping or JSON plan file) the plan, keeps it in :attr:`plan` and returns its units.

    :attr:`first_device` is known before the model is built (the first budget, or the device the
    mapping gives the token embeddings), so the dtype policy can follow it."""

    def __init__(self, device_map: str | Path | Mapping[str, str] | PlacementPlan = "auto",
                 max_memory: Mapping[str, int | str] | str | None = None, *, dtype: torch.dtype | None = None,
                 kv_tokens: int | None = None, headroom: float = DEFAULT_HEADROOM):
        self.dtype, self.kv_tokens, self.headroom = dtype, kv_tokens, headroom
        self.plan: PlacementPlan | None = None
        if isinstance(device_map, str) and device_map == "auto":
            self.mapping = None
            self.budgets = available_memory() if max_memory is None else parse_max_memory(max_memory)
            self.first_device = next(iter(self.budgets))
            return
        if max_memory is not None:
            raise PlacementError("max memory budgets go with device_map='auto'; an explicit plan places every unit itself")
        if isinstance(device_map, PlacementPlan):
            device_map = device_map.units
        self.mapping = read_plan_file(device_map) if isinstance(device_map, (str, Path)) else dict(device_map)
        best = max((p for p in self.mapping if p == "" or "language_model.model.embed_tokens".startswith(p + ".")
                    or p == "language_model.model.embed_tokens"), key=len, default=None)
        if best is None:
            raise PlacementError("the device map places no device for the token embeddings; add an entry '' for the "
                                 "parts outside the decoder layers")
        self.first_device = normalize_device(self.mapping[best])

    def __call__(self, model: nn.Module) -> dict[str, str]:
        if self.mapping is None:
            self.plan = plan_placement(model, self.budgets, dtype=self.dtype, kv_tokens=self.kv_tokens, headroom=self.headroom)
        else:
            self.plan = resolve_plan(model, self.mapping, dtype=self.dtype, kv_tokens=self.kv_tokens)
        return dict(self.plan.units)


def meta_model(config, quantize: str | None = None) -> UniMedVL:
    """The model of ``config`` on the meta device (no memory), quantised like a load with ``quantize``."""
    with torch.device("meta"):
        model = UniMedVL(config)
    if quantize:
        quantize_model(model, quantize)
    return model


# ---- applying a plan ---------------------------------------------------------------------------


def _torch_device(label: str) -> torch.device:
    """The torch device a plan label stands for (every ``cpu:N`` is the host)."""
    device = torch.device(label)
    return torch.device("cpu") if device.type == "cpu" else device


def _on(t: torch.Tensor, device: torch.device) -> bool:
    if t.device.type != device.type:
        return False
    return device.type == "cpu" or (t.device.index or 0) == (device.index or 0)


def _to(obj, device: torch.device):
    """``obj`` with its tensors on ``device``: tensors, lists/tuples of them and dataclasses holding
    them (expert routing, the attention plan's masks) are copied shallowly; anything else - the KV
    caches among them - is shared.  Returns ``obj`` itself when nothing had to move."""
    if isinstance(obj, torch.Tensor):
        return obj if _on(obj, device) else obj.to(device)
    if isinstance(obj, (list, tuple)):
        moved = [_to(v, device) for v in obj]
        if all(a is b for a, b in zip(moved, obj)):
            return obj
        return type(obj)(moved) if isinstance(obj, list) else tuple(moved)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {}
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            value = getattr(obj, f.name)
            new = _to(value, device)
            if new is not value:
                changes[f.name] = new
        return dataclasses.replace(obj, **changes) if changes else obj
    return obj


_LAYER_ARGS = ("x", "routing", "cos", "sin", "plan", "layer")  # MoTDecoderLayer.forward's parameters
_SHARED = ("routing", "cos", "sin", "plan")  # the same objects for every layer of one forward
_APPLIED: "weakref.WeakKeyDictionary[nn.Module, Placement]" = weakref.WeakKeyDictionary()
_LIVE = object()  # a shared input that needed no copy


def _weak(value):
    """A weak reference to ``value`` (``None`` stays matchable as ``None``)."""
    return (lambda: None) if value is None else weakref.ref(value)


class Placement:
    """The hooks :func:`apply_placement` installed on a model, with counters that tests and
    benchmarks read:

    * ``forwards`` - decoder forwards run;
    * ``crossings[unit]`` - times the activations entered ``unit`` from another placement (a
      decoder layer at a boundary, or :data:`RETURN_UNIT` when they come back to the first device);
    * ``prepared[device]`` - times the per-forward inputs (RoPE tables, routing indices, attention
      masks) were prepared for ``device``: once per forward that reaches it, not once per layer
      (a denoising loop that reuses one forward plan prepares them once for the whole loop).
    """

    def __init__(self, model: nn.Module, plan: PlacementPlan):
        self._model = weakref.ref(model)  # the model holds the hooks, which hold this
        self.plan = plan
        self.first = plan.first_device
        self.forwards = 0
        self.crossings: Counter[str] = Counter()
        self.prepared: Counter[str] = Counter()
        self._shared: dict[str, tuple[tuple, dict]] = {}
        self._handles: list = []

    def _start(self, module, args) -> None:
        self.forwards += 1

    def _shared_for(self, label: str, bound: dict) -> dict:
        """The per-forward inputs of a layer on ``label``: copied there once, then reused by every
        layer on it - and by later forwards with the same inputs (the steps of a denoising loop).

        Between forwards nothing is kept alive: the originals are matched through weak references,
        and the copied attention plan is kept without its KV caches, which the live plan supplies."""
        originals = tuple(bound.get(name) for name in _SHARED)
        slot = self._shared.get(label)
        if slot is None or not all(ref() is value for ref, value in zip(slot[0], originals)):
            plan = bound.get("plan")
            if getattr(plan, "block_mask", None) is not None:
                raise RuntimeError("a placed model runs the sdpa attention backend (inference); the flex backend is for training")
            device = _torch_device(label)
            kept = {}
            for name, value in zip(_SHARED, originals):
                moved = _to(value, device)
                if moved is value:
                    kept[name] = _LIVE  # nothing to copy: use the caller's object
                elif name == "plan" and hasattr(moved, "caches"):
                    kept[name] = dataclasses.replace(moved, caches=[])
                else:
                    kept[name] = moved
            slot = (tuple(_weak(value) for value in originals), kept)
            self._shared[label] = slot
            self.prepared[label] += 1
        out = {}
        for name, value in zip(_SHARED, originals):
            kept = slot[1][name]
            if kept is _LIVE:
                out[name] = value
            elif name == "plan" and hasattr(kept, "caches"):
                out[name] = dataclasses.replace(kept, caches=value.caches)
            else:
                out[name] = kept
        return out

    def _enter(self, module, args, kwargs, *, unit: str, label: str, boundary: bool):
        bound = dict(zip(_LAYER_ARGS, args))
        bound.update(kwargs)
        new = self._shared_for(label, bound)
        x = bound["x"]
        if boundary:
            self.crossings[unit] += 1
        new["x"] = _to(x, _torch_device(label))
        args = tuple(new.get(name, a) for name, a in zip(_LAYER_ARGS, args))
        kwargs = {k: new.get(k, v) for k, v in kwargs.items()}
        return args, kwargs

    def _leave(self, module, args, output):
        self.crossings[RETURN_UNIT] += 1
        return _to(output, _torch_device(self.first))

    @property
    def model(self) -> nn.Module | None:
        return self._model()

    def install(self) -> "Placement":
        model, plan = self.model, self.plan
        for unit, label in plan.units.items():
            model.get_submodule(unit).to(_torch_device(label))
        layers = model.get_submodule(LAYERS)
        previous = self.first
        for i, layer in enumerate(layers):
            label = plan.units[f"{LAYERS}.{i}"]
            boundary = label != previous
            if boundary or label != self.first:
                hook = partial(self._enter, unit=f"{LAYERS}.{i}", label=label, boundary=boundary)
                self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
            previous = label
        if len(layers) and previous != self.first:
            self._handles.append(layers[len(layers) - 1].register_forward_hook(self._leave))
        self._handles.append(model.get_submodule("language_model.model").register_forward_pre_hook(self._start))
        _APPLIED[model] = self
        return self

    def remove(self) -> None:
        """Take the hooks off (the weights stay where they are; move the model to one device to use it unplaced)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._shared.clear()
        model = self.model
        if model is not None and _APPLIED.get(model) is self:
            del _APPLIED[model]


def apply_placement(model: nn.Module, plan: PlacementPlan | Mapping[str, str]) -> Placement:
    """Move every unit of ``model`` to its device and install the hooks that carry the activations
    between devices (a previous placement of the model is removed first).  ``plan`` is a
    :class:`PlacementPlan` or an explicit ``{prefix: device}`` mapping (:func:`resolve_plan`)."""
    plan = resolve_plan(model, plan) if not isinstance(plan, PlacementPlan) else plan
    outside, layers = placement_units(model)
    if list(plan.units) != outside + layers:
        missing = [u for u in outside + layers if u not in plan.units]
        extra = [u for u in plan.units if u not in outside + layers]
        raise PlacementError(f"the plan is for another model: units missing {missing[:5]}, unknown {extra[:5]}")
    old = _APPLIED.get(model)
    if old is not None:
        old.remove()
    return Placement(model, plan).install()


def placement_of(model: nn.Module) -> Placement | None:
    """The placement applied to ``model``, if any."""
    return _APPLIED.get(model)

