"""Pre-quantised checkpoints: ``unimedvl quantize --model DIR --out DIR --scheme int8|int4|nf4|fp8``.

The output is the official layout with the weight file replaced by its quantised form: the same
name (``ema.safetensors``), every :func:`~unimedvl.model.quantized.quantizable` linear weight that
the scheme stores replaced by the scheme's tensors (:meth:`~unimedvl.model.quantized.QuantScheme.layout`,
e.g. int8 ``<name>.weight`` + float32 ``<name>.scale``; the module docstring of
:mod:`unimedvl.model.quantized` lists them all), everything else as it was stored.  The file
describes itself in its safetensors metadata - ``unimedvl_quantization`` (the scheme),
``group_size`` (the scheme's nominal group: ``row``, ``128``, ``64``), ``source_file`` and
``source_sha256`` (of the unquantised file) - and ``quantization.json`` repeats it for people, with
the layers whose group differs from the nominal one (int4) and those the scheme keeps unquantised.
Configs, tokenizer files and ``ae.safetensors`` are copied.  Any scheme can be written on any
machine (quantising needs no kernel); only loading checks the device.
:func:`unimedvl.formats.checkpoint.load_pretrained` recognises the metadata and loads the quantised
tensors as they are, without re-quantising; a tensor of the wrong dtype or shape, a missing
tensor or an unreadable file is an error naming the key and the scheme.

The file is written tensor by tensor (:mod:`.safetensors_stream`): one source matrix in float32 at a
time, never the whole model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from ..model.quantized import QUANTIZED_LINEARS, QuantScheme, check_scheme
from ..tokenizer import TOKENIZER_FILES
from .atomic import atomic_path, write_text
from .checkpoint import QUANTIZATION_METADATA as METADATA_SCHEME
from .checkpoint import CheckpointError, find_weights, open_safetensors, read_config, read_header
from .hashing import file_sha256
from .safetensors_mmap import TORCH_DTYPES
from .safetensors_stream import write_safetensors_stream

QUANTIZATION_FILE = "quantization.json"
COPIED = ("llm_config.json", "vit_config.json", "ae_config.json", "unimedvl_config.json", "ae.safetensors", *TOKENIZER_FILES)


def quantized_key(key: str, shape: tuple[int, ...], scheme: QuantScheme) -> bool:
    """Whether checkpoint key ``key`` (of ``shape``) is a weight that ``scheme`` stores quantised
    (the same rule as :func:`unimedvl.model.quantized.quantize_model`: the layer's name and whether
    the scheme has a layout for its size)."""
    return (key.endswith(".weight") and len(shape) == 2 and QUANTIZED_LINEARS.match(key.removesuffix(".weight")) is not None
            and scheme.layout(*shape) is not None)


def quantize_checkpoint(model_dir: str | Path, out: str | Path, scheme: str = "int8", *, weights: str = "ema",
                        progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the pre-quantised copy of checkpoint ``model_dir`` to ``out``; returns ``out``.
    ``progress(done, total)`` is called after each tensor."""
    spec = check_scheme(scheme)  # no device: writing needs none
    model_dir, out = Path(model_dir), Path(out)
    read_config(model_dir)  # a readable checkpoint, before anything is written
    source = find_weights(model_dir, weights)
    header = read_header(source)
    if header.scheme:
        raise CheckpointError(f"{source}: already quantised ({header.scheme})")
    if out.resolve() == model_dir.resolve():
        raise CheckpointError(f"{out}: write the quantised copy to another folder than its source")
    out.mkdir(parents=True, exist_ok=True)
    shapes = header.shapes
    specs, pending = [], {}
    groups: dict[str, str] = {}  # weight key -> its group, where it is not the nominal one
    kept = []  # quantisable weights the scheme keeps unquantised (sizes it cannot store)
    for key in sorted(shapes):
        if quantized_key(key, shapes[key], spec):
            prefix = key.removesuffix("weight")
            # the weight first: producing it produces the rest of its layer
            specs += [(prefix + suffix, stored or torch.float32, shape) for suffix, (stored, shape) in spec.layout(*shapes[key]).items()]
            if spec.group_of(*shapes[key]) != spec.group_size:
                groups[key] = spec.group_of(*shapes[key])
        else:
            specs.append((key, TORCH_DTYPES[header.dtypes[key]], shapes[key]))
            if key.endswith(".weight") and len(shapes[key]) == 2 and QUANTIZED_LINEARS.match(key.removesuffix(".weight")):
                kept.append(key)
    handle = open_safetensors(source)  # tensor by tensor: a source larger than memory is fine

    def produce(key: str) -> torch.Tensor:
        if key in pending:  # computed with its weight
            return pending.pop(key)
        tensor = handle.get_tensor(key)
        if quantized_key(key, shapes[key], spec):
            stored = spec.quantize(tensor)  # compute-dtype tensors come as float32, as files hold them
            prefix = key.removesuffix("weight")
            pending.update({prefix + suffix: t for suffix, t in stored.items() if suffix != "weight"})
            return stored["weight"]
        return tensor

    done = [0]

    def tick(_key: str) -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], len(specs))

    metadata = {"format": "pt", METADATA_SCHEME: scheme, "group_size": spec.group_size, "source_file": source.name,
                "source_sha256": file_sha256(source)}
    write_safetensors_stream(out / f"{weights}.safetensors", specs, produce, metadata, on_tensor=tick)
    for name in COPIED:
        if (model_dir / name).is_file():
            with atomic_path(out / name) as tmp:
                shutil.copyfile(model_dir / name, tmp)
    described = {k: v for k, v in metadata.items() if k != "format"}
    if groups:
        described["other_group_sizes"] = groups
    if kept:
        described["not_quantized"] = kept
    write_text(out / QUANTIZATION_FILE, json.dumps(described, indent=1) + "\n")
    return out
