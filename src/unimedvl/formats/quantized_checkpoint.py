"""Pre-quantised checkpoints: ``unimedvl quantize --model DIR --out DIR --scheme int8``.

The output is the official layout with the weight file replaced by its quantised form: the same
name (``ema.safetensors``), every :func:`~unimedvl.model.quantized.quantizable` linear weight stored
int8 with a float32 ``.scale`` of one value per output row beside it, everything else as it was
stored.  The file describes itself in its safetensors metadata - ``unimedvl_quantization`` (the
scheme), ``group_size`` (``row``), ``source_file`` and ``source_sha256`` (of the unquantised file) -
and ``quantization.json`` repeats it for people.  Configs, tokenizer files and ``ae.safetensors`` are
copied.  :func:`unimedvl.formats.checkpoint.load_pretrained` recognises the metadata and loads the
int8 tensors as they are, without re-quantising; a tensor of the wrong dtype or shape, a missing
scale or an unreadable file is an error naming the key and the scheme.

The file is written tensor by tensor (:mod:`.safetensors_stream`): one source matrix in float32 at a
time, never the whole model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from ..model.quantized import QUANTIZED_LINEARS, check_scheme, quantize_int8
from ..tokenizer import TOKENIZER_FILES
from .atomic import atomic_path, write_text
from .checkpoint import QUANTIZATION_METADATA as METADATA_SCHEME
from .checkpoint import CheckpointError, find_weights, read_config, read_header
from .hashing import file_sha256
from .safetensors_stream import DTYPE_CODES, write_safetensors_stream

TORCH_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}

QUANTIZATION_FILE = "quantization.json"
GROUP_SIZE = "row"  # one scale per output row
COPIED = ("llm_config.json", "vit_config.json", "ae_config.json", "unimedvl_config.json", "ae.safetensors", *TOKENIZER_FILES)


def quantized_key(key: str, shape: tuple[int, ...]) -> bool:
    """Whether checkpoint key ``key`` (of ``shape``) is a weight that the scheme stores quantised."""
    return key.endswith(".weight") and len(shape) == 2 and QUANTIZED_LINEARS.match(key.removesuffix(".weight")) is not None


def scale_key(weight_key: str) -> str:
    return weight_key.removesuffix("weight") + "scale"


def quantize_checkpoint(model_dir: str | Path, out: str | Path, scheme: str = "int8", *, weights: str = "ema",
                        progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the pre-quantised copy of checkpoint ``model_dir`` to ``out``; returns ``out``.
    ``progress(done, total)`` is called after each tensor."""
    check_scheme(scheme)
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
    for key in sorted(shapes):
        if quantized_key(key, shapes[key]):
            specs += [(key, torch.int8, shapes[key]), (scale_key(key), torch.float32, (shapes[key][0],))]
        else:
            specs.append((key, TORCH_DTYPES[header.dtypes[key]], shapes[key]))
    with safe_open(str(source), framework="pt", device="cpu") as handle:

        def produce(key: str) -> torch.Tensor:
            if key in pending:  # the scale computed with its weight
                return pending.pop(key)
            tensor = handle.get_tensor(key)
            if quantized_key(key, shapes[key]):
                q, scale = quantize_int8(tensor)
                pending[scale_key(key)] = scale
                return q
            return tensor

        done = [0]

        def tick(_key: str) -> None:
            done[0] += 1
            if progress is not None:
                progress(done[0], len(specs))

        metadata = {"format": "pt", METADATA_SCHEME: scheme, "group_size": GROUP_SIZE, "source_file": source.name,
                    "source_sha256": file_sha256(source)}
        write_safetensors_stream(out / f"{weights}.safetensors", specs, produce, metadata, on_tensor=tick)
    for name in COPIED:
        if (model_dir / name).is_file():
            with atomic_path(out / name) as tmp:
                shutil.copyfile(model_dir / name, tmp)
    write_text(out / QUANTIZATION_FILE, json.dumps({k: v for k, v in metadata.items() if k != "format"}, indent=1) + "\n")
    return out
