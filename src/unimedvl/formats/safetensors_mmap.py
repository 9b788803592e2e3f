"""Reading safetensors files larger than memory, one tensor mapping at a time.

safetensors' own ``safe_open(framework="pt")`` maps the whole file as one private writable mapping.
Linux charges such a mapping against its overcommit limit, and in the default heuristic mode it
refuses a single mapping larger than RAM + swap: the official 29 GB ``ema.safetensors`` cannot even
be opened on a 24 GB machine.  Here each tensor gets its own private (copy-on-write) mapping of just
its bytes, so no single mapping is larger than the largest tensor (the 1.1 GB embedding of the 14B
model), tensors that are used as stored stay zero-copy, writing to one never touches the file, and a
tensor's pages are unmapped as soon as the tensor is dropped (a cast copy leaves nothing mapped).

The header is checked as it is parsed: a file shorter than its header says, a header that is not
a JSON object, an unknown dtype or a byte range that disagrees with its shape or runs past the end
of the file raises :class:`SafetensorsFormatError` naming the file and the key.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import torch

from .safetensors_stream import DTYPE_CODES

TORCH_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


class SafetensorsFormatError(ValueError):
    """A file is not a well-formed safetensors file."""


class SafetensorsFile:
    """The header of a safetensors file and its tensors, each read by its own mapping."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise SafetensorsFormatError(f"{self.path}: {size} bytes, too short for a safetensors header")
                (n,) = struct.unpack("<Q", prefix)
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise SafetensorsFormatError(f"{self.path}: header length {n} does not fit the file ({size} bytes)")
                raw = f.read(n)
        except OSError as e:
            raise SafetensorsFormatError(f"{self.path}: cannot read ({e})") from e
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsFormatError(f"{self.path}: the header is not valid JSON ({e})") from e
        if not isinstance(header, dict):
            raise SafetensorsFormatError(f"{self.path}: the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise SafetensorsFormatError(f"{self.path}: __metadata__ must map strings to strings")
        self.metadata: dict[str, str] = metadata
        self.data_start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        self.codes: dict[str, str] = {}
        for key, entry in header.items():
            self.entries[key] = self._check_entry(key, entry, size)
            self.codes[key] = entry["dtype"]

    def _check_entry(self, key: str, entry, size: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor {key}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise SafetensorsFormatError(f"{where}: the header entry needs dtype, shape and data_offsets")
        dtype = TORCH_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise SafetensorsFormatError(f"{where}: unknown dtype {entry['dtype']!r} (known: {', '.join(sorted(TORCH_DTYPES))})")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise SafetensorsFormatError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise SafetensorsFormatError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected or begin < 0:
            raise SafetensorsFormatError(f"{where}: {entry['dtype']} {shape} needs {expected} bytes, data_offsets give {end - begin}")
        if self.data_start + end > size:
            raise SafetensorsFormatError(f"{where}: its bytes end at {self.data_start + end}, past the end of the file "
                                         f"({size} bytes; truncated?)")
        return dtype, tuple(shape), begin, end

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def dtype_code(self, key: str) -> str:
        """The safetensors dtype code (``BF16``, ``F32``, ``I8``, ...)."""
        return self.codes[key]

    def get_tensor(self, key: str) -> torch.Tensor:
        """Tensor ``key``, backed by a private mapping of its bytes (unmapped when the tensor is freed)."""
        dtype, shape, begin, end = self.entries[key]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        start = self.data_start + begin
        aligned = start - start % mmap.ALLOCATIONGRANULARITY  # mappings start on a page boundary
        with open(self.path, "rb") as f:
            view = mmap.mmap(f.fileno(), end - begin + (start - aligned), access=mmap.ACCESS_COPY, offset=aligned)
        # frombuffer keeps ``view`` alive for as long as the tensor lives
        flat = torch.frombuffer(view, dtype=dtype, count=torch.Size(shape).numel(), offset=start - aligned)
        return flat.view(shape)
