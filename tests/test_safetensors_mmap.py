"""The per-tensor safetensors reader against safetensors' own writer, and its errors on bad files."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from unimedvl.formats.safetensors_mmap import SafetensorsFile, SafetensorsFormatError


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(33, 17, generator=g).to(torch.bfloat16),  # odd sizes: unaligned offsets after it
        "b.scale": torch.randn(5, generator=g),
        "c.q": torch.randint(-127, 128, (7, 9), generator=g, dtype=torch.int8),
        "d.f8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "e.empty": torch.zeros(0, 3),
        "f.big": torch.randn(300, 1000, generator=g),  # spans several pages
    }


def test_reads_what_safetensors_writes_bit_exactly(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = sample_tensors()
    save_file(tensors, str(path), metadata={"unimedvl_quantization": "int8"})
    f = SafetensorsFile(path)
    reference = load_file(str(path))
    assert set(f.keys()) == set(tensors)
    assert f.metadata == {"unimedvl_quantization": "int8"}
    for key, expected in reference.items():
        got = f.get_tensor(key)
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), key
        assert f.shape(key) == tuple(expected.shape)
    assert f.dtype_code("a.weight") == "BF16" and f.dtype_code("c.q") == "I8"


def test_writing_a_mapped_tensor_leaves_the_file_unchanged(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.ones(1000)}, str(path))
    t = SafetensorsFile(path).get_tensor("w")
    t.mul_(3)  # copy-on-write: the process's own pages change, the file does not
    assert float(t.sum()) == 3000.0
    assert float(load_file(str(path))["w"].sum()) == 1000.0


def _write_raw(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "past the end of the file"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16, "needs 16 bytes"),
        ({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype 'Q4'"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "non-negative integers"),
        ({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "needs dtype, shape and data_offsets"),
    ],
)
def test_bad_entries_name_the_file_and_the_key(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    _write_raw(path, header, data)
    with pytest.raises(SafetensorsFormatError, match=message) as err:
        SafetensorsFile(path)
    assert str(path) in str(err.value) and ("tensor w" in str(err.value))


def test_truncated_and_garbage_files(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\1\2")
    with pytest.raises(SafetensorsFormatError, match="too short"):
        SafetensorsFile(short)
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(SafetensorsFormatError, match="header length 10000 does not fit"):
        SafetensorsFile(lying)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe[]")
    with pytest.raises(SafetensorsFormatError, match="not valid JSON"):
        SafetensorsFile(garbage)
