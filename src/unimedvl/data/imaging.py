"""Pixel helpers for the dataset builder: canonical 8-bit RGB, PNG bytes, hashes, degradations."""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

def as_rgb_u8(pixels: np.ndarray) -> np.ndarray:
    """``[H, W]`` or ``[H, W, 3]`` uint8 -> ``[H, W, 3]`` uint8."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 2:
        return np.repeat(pixels[..., None], 3, axis=2)
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        return pixels
    raise ValueError(f"expected HxW or HxWx3 pixels, got shape {pixels.shape}")


def limit_size(pixels: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink so the long edge is at most ``max_side`` (bicubic, aspect kept); never enlarge."""
    h, w = pixels.shape[:2]
    if max(h, w) <= max_side:
        return pixels
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.BICUBIC))


def png_bytes(pixels: np.ndarray) -> bytes:
    """Deterministic PNG encoding (no timestamps or text chunks)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def sha256_pixels(pixels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(pixels.shape).encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


def perceptual_hash(pixels: np.ndarray, size: int = 16) -> int:
    """Difference hash of ``size * size`` bits (256 by default): a grey ``(size+1) x size``
    thumbnail, one bit per horizontal neighbour comparison.

    Equal for re-encoded or rescaled copies of an image; 256 bits (rather than the common 64) keep
    distinct images of the same anatomy and protocol - which look alike at 9x8 pixels - apart."""
    grey = Image.fromarray(as_rgb_u8(pixels)).convert("L").resize((size + 1, size), Image.BILINEAR)
    a = np.asarray(grey, dtype=np.int16)
    bits = (a[:, 1:] > a[:, :-1]).ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def kspace_downsample(grey: np.ndarray, factor: int = 4) -> np.ndarray:
    """Low-resolution MRI by central k-space cropping: keep the central ``1/factor`` of the
    spectrum in each direction and invert at the reduced size (DATA.md 5.3), then rescale to the
    input's 8-bit range.  ``grey [H, W]`` uint8 -> ``[H/factor, W/factor]`` uint8."""
    h, w = grey.shape
    lh, lw = h // factor, w // factor
    spectrum = np.fft.fftshift(np.fft.fft2(grey.astype(np.float64)))
    top, left = (h - lh) // 2, (w - lw) // 2
    low = spectrum[top : top + lh, left : left + lw]
    image = np.abs(np.fft.ifft2(np.fft.ifftshift(low))) / (factor * factor)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def kspace_pair(grey: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """A super-resolution pair from ``grey [H, W]`` uint8: the image cropped to a multiple of
    ``factor`` (the target) and its central-k-space low-resolution version (the input)."""
    h, w = (grey.shape[0] // factor) * factor, (grey.shape[1] // factor) * factor
    target = grey[:h, :w]
    return kspace_downsample(target, factor), target


def sr_pair(pixels: np.ndarray, factor: int, degradation: str = "kspace") -> tuple[np.ndarray, np.ndarray]:
    """A ``factor``x super-resolution pair ``(low, target)`` of 8-bit RGB arrays from ``pixels [H, W, 3]``:
    the image cropped to a multiple of ``factor`` is the target; the input is its central-k-space
    crop (``kspace``, greyscale: MRI-like) or its anti-aliased bicubic reduction (``bicubic``)."""
    from PIL import Image

    h, w = (pixels.shape[0] // factor) * factor, (pixels.shape[1] // factor) * factor
    hr = pixels[:h, :w]
    if degradation == "kspace":
        low, target = kspace_pair(hr.mean(axis=2).round().astype(np.uint8), factor)
        return as_rgb_u8(low), as_rgb_u8(target)
    if degradation == "bicubic":
        return np.asarray(Image.fromarray(hr).resize((w // factor, h // factor), Image.BICUBIC, reducing_gap=2.0)), hr
    raise ValueError(f"degradation must be kspace or bicubic, got {degradation!r}")


def evenly_spaced(values: list, count: int) -> list:
    """``count`` evenly spaced elements of ``values``, first and last included."""
    return [values[round(j * (len(values) - 1) / max(count - 1, 1))] for j in range(count)]
