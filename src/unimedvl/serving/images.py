"""Images arriving in requests: data URLs or uploads (PNG/JPEG/TIFF/BMP, DICOM, NIfTI) and, when
the operator allows it, local files under named folders.

Medical files are read through the project's readers with the request's window/frame/slice
options.  Uploaded bytes live in a private temporary folder only while they are read, and are
deleted before the model runs; nothing about them is logged.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from .config import ServeConfig
from .errors import APIError, bad_request, too_large


@dataclass(frozen=True)
class ReadOptions:
    """Per-image reading options a request may carry (DICOM window/frame, NIfTI axis/slice)."""

    window: str | tuple[float, float] | None = None
    frame: int = 0
    axis: str | int = "axial"  # a plane name, or a RAS voxel axis 0/1/2
    slice_index: int | None = None

    @classmethod
    def parse(cls, raw: dict, where: str) -> "ReadOptions":
        window = raw.get("window")
        if isinstance(window, (list, tuple)):
            if len(window) != 2 or not all(isinstance(v, (int, float)) for v in window):
                raise bad_request(f"{where}.window: expected a preset name or [center, width]", f"{where}.window")
            window = (float(window[0]), float(window[1]))
        elif window is not None and not isinstance(window, str):
            raise bad_request(f"{where}.window: expected a preset name or [center, width]", f"{where}.window")
        for key in ("frame", "slice_index"):
            if raw.get(key) is not None and (not isinstance(raw[key], int) or raw[key] < 0):
                raise bad_request(f"{where}.{key}: expected a non-negative integer", f"{where}.{key}")
        axis = raw.get("axis", "axial")
        if isinstance(axis, str) and axis in ("0", "1", "2"):
            axis = int(axis)
        if not (axis in ("axial", "coronal", "sagittal") if isinstance(axis, str) else type(axis) is int and axis in (0, 1, 2)):
            raise bad_request(f"{where}.axis: expected axial, coronal or sagittal, or a RAS voxel axis 0, 1 or 2; got {axis!r}",
                              f"{where}.axis")
        return cls(window, raw.get("frame") or 0, axis, raw.get("slice_index"))

    def reader_kwargs(self, kind: str) -> dict:
        if kind == "dicom":
            return {k: v for k, v in (("window", self.window), ("frame", self.frame)) if v not in (None, 0)}
        if kind == "nifti":
            return {"axis": self.axis, **({"slice_index": self.slice_index} if self.slice_index is not None else {})}
        return {}


def sniff(data: bytes) -> str:
    """``dicom``, ``nifti`` or ``raster`` from the bytes (gzip is taken for a compressed NIfTI)."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data[:2] == b"\x1f\x8b":
        try:
            with gzip.open(io.BytesIO(data)) as f:
                head = f.read(348)
        except OSError:
            return "raster"
        return "nifti" if len(head) >= 348 and head[344:347] in (b"n+1", b"ni1") else "raster"
    if len(data) >= 348 and data[344:347] in (b"n+1", b"ni1"):
        return "nifti"
    return "raster"


def decode_image(data: bytes, options: ReadOptions, config: ServeConfig, where: str) -> Image.Image:
    """Bytes of any supported format -> an RGB PIL image, within the pixel limit."""
    if not data:
        raise bad_request(f"{where}: the image is empty", where, "invalid_image")
    kind = sniff(data)
    if kind == "raster":
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                _check_pixels(w, h, config, where)
                im.load()
                return im.convert("RGB")
        except Image.DecompressionBombError as e:  # PIL refuses the header's size before we see it
            raise _bomb(e, config, where) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise bad_request(f"{where}: not a readable image (PNG, JPEG, TIFF, BMP, DICOM or NIfTI expected)", where, "invalid_image") from None
    from ..formats.medical_io import ImageTooLargeError, MedicalImageError, read_medical_image

    suffix = ".dcm" if kind == "dicom" else (".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii")
    with tempfile.TemporaryDirectory(prefix="unimedvl-upload-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        try:  # the limits are checked from the header, before any pixel is decoded
            medical = read_medical_image(path, max_pixels=config.max_image_pixels, max_voxels=config.max_volume_voxels,
                                         **options.reader_kwargs(kind))
        except ImageTooLargeError as e:
            limit = "max_image_pixels" if e.limit == "max_pixels" else "max_volume_voxels"
            message = str(e).replace(str(path), "the uploaded file")
            raise too_large(f"{where}: {message} ({limit})", where, "image_too_large") from None
        except (MedicalImageError, ValueError, OSError) as e:
            message = str(e).replace(str(path), "the uploaded file")
            raise bad_request(f"{where}: {message}", where, "invalid_image") from None
    h, w = medical.pixels.shape[:2]
    _check_pixels(w, h, config, where)
    return medical.to_pil()


def _bomb(error: Exception, config: ServeConfig, where: str) -> APIError:
    """PIL's decompression-bomb refusal as our pixel-limit error (its message carries the pixel count)."""
    import re

    found = re.search(r"\((\d+) pixels\)", str(error))
    size = f"has {int(found.group(1))} pixels" if found else "has more pixels than the reader accepts"
    return too_large(f"{where}: the image {size}; the limit is {config.max_image_pixels} (max_image_pixels)", where, "image_too_large")


def _check_pixels(w: int, h: int, config: ServeConfig, where: str) -> None:
    if w * h > config.max_image_pixels:
        raise too_large(f"{where}: the image has {w}x{h} = {w * h} pixels; the limit is {config.max_image_pixels} (max_image_pixels)",
                        where, "image_too_large")


def image_from_url(url: str, options: ReadOptions, config: ServeConfig, where: str) -> Image.Image:
    """A ``data:`` URL (base64) or, for operator-allowed folders, a ``file://`` URL or plain path."""
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}: expected a data URL or an allowed local file", where)
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise bad_request(f"{where}: data URLs must be base64-encoded", where, "invalid_image")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{where}: the data URL is not valid base64", where, "invalid_image") from None
        return decode_image(data, options, config, where)
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raise bad_request(f"{where}: remote URLs are not fetched; send the image as a data URL", where, "remote_url")
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else url)
    resolved = path.resolve()
    if not config.allowed_file_roots or not any(resolved.is_relative_to(root) for root in config.allowed_file_roots):
        raise APIError(403, f"{where}: local files are only read under the folders the operator allows (--allow-files)", param=where,
                       code="file_not_allowed")
    if not resolved.is_file():
        raise bad_request(f"{where}: no such file under the allowed folders", where, "file_not_found")
    if resolved.stat().st_size > config.max_body_bytes:
        raise too_large(f"{where}: the file is larger than max_body_bytes ({config.max_body_bytes})", where)
    return decode_image(resolved.read_bytes(), options, config, where)
