"""Writing a safetensors file tensor by tensor, so that a checkpoint larger than memory (the 14B
model's 29 GB, a quantised copy of it) never has to be held whole.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a
JSON header mapping each key to its dtype, shape and byte range (plus ``__metadata__`` strings),
padded with spaces to a multiple of 8, then the tensors' bytes in header order.  The header is
written first from the declared specs; each tensor is then produced, checked against its spec and
appended.  The file appears under its name only when complete (:func:`.atomic.atomic_path`); files
written here are read back with safetensors' own reader in the tests.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch

from .atomic import atomic_path

DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def write_safetensors_stream(
    path: str | Path,
    specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> Path:
    """Write ``path`` from ``specs`` (key, dtype, shape) in order; ``produce(key)`` returns each
    tensor when its turn comes (then it may be freed).  A produced tensor that does not match its
    spec is an error naming the key."""
    specs = list(specs)
    header: dict = {"__metadata__": {k: str(v) for k, v in (metadata or {"format": "pt"}).items()}}
    offset = 0
    for key, dtype, shape in specs:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, dtype, shape in specs:
            tensor = produce(key)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{path}: {key} was declared {dtype} {list(shape)} but produced {tensor.dtype} {list(tensor.shape)}")
            data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)  # the raw bytes, no copy when possible
            f.write(memoryview(data.numpy()))
            if on_tensor is not None:
                on_tensor(key)
    return path
