"""Resize-to-stride image transforms of the ViT and VAE inputs (ARCHITECTURE 6.1).

Both encoders take an RGB image resized so that its long side is at most ``max_size``, its short
side at least ``min_size``, both sides multiples of ``stride`` and its area at most ``max_pixels``
(PIL bicubic), then map pixels to [-1, 1] with mean = std = 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .config import InferenceTransforms

DEFAULT_MAX_PIXELS = 14 * 14 * 9 * 1024  # 1,806,336
MAX_INPUT_PIXELS = 20_000_000  # UniMedVL rejects larger inputs


@dataclass(frozen=True)
class ImageTransform:
    max_size: int
    min_size: int
    stride: int
    max_pixels: int = DEFAULT_MAX_PIXELS

    def target_size(self, width: int, height: int, img_num: int = 1) -> tuple[int, int]:
        """Output ``(width, height)`` for an input of ``width x height``.

        Reproduces the reference rule exactly, including Python's half-to-even ``round`` and the
        ``max_pixels`` branch that uses an area ratio as a linear factor (ARCHITECTURE 12.2).
        """
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        stride = self.stride

        def snapped(w: float, h: float, s: float) -> tuple[int, int]:
            return max(stride, round(round(w * s) / stride) * stride), max(stride, round(round(h * s) / stride) * stride)

        s = min(self.max_size / max(width, height), 1.0)
        s = max(s, self.min_size / min(width, height))
        w, h = snapped(width, height, s)
        budget = self.max_pixels / img_num
        if w * h > budget:
            w, h = snapped(w, h, budget / (w * h))
        if max(w, h) > self.max_size:
            w, h = snapped(w, h, self.max_size / max(w, h))
        return w, h

    def resize(self, image: Image.Image, img_num: int = 1) -> Image.Image:
        image = to_rgb(image)
        size = self.target_size(*image.size, img_num=img_num)
        return image.copy() if size == image.size else image.resize(size, Image.BICUBIC)

    def __call__(self, image: Image.Image, img_num: int = 1) -> torch.Tensor:
        """Resized image as a ``[3, h, w]`` float32 tensor in [-1, 1]."""
        return normalize_u8(np.asarray(self.resize(image, img_num)))


# Transforms of the official scripts (ARCHITECTURE 6.1 table).
# The official scripts' inference rules are the defaults of ``InferenceTransforms`` (one place).
_OFFICIAL = InferenceTransforms()
VQA_VIT = ImageTransform(*_OFFICIAL.understanding_vit)  # UniMedVL VQA script, SFT config: 980, 378, 14, 2,007,040
GEN_VIT = ImageTransform(*_OFFICIAL.generation_vit)  # UniMedVL image-generation script, ViT side: 980, 387, 14
GEN_VAE = ImageTransform(*_OFFICIAL.generation_vae)  # UniMedVL image-generation script, VAE side: 1024, 32, 16
BAGEL_VIT = ImageTransform(980, 224, 14)
BAGEL_VAE = ImageTransform(1024, 512, 16)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparent images are composited onto white as the reference does."""
    if image.width * image.height > MAX_INPUT_PIXELS:
        raise ValueError(f"image of {image.width}x{image.height} pixels exceeds the {MAX_INPUT_PIXELS} pixel limit")
    if image.mode == "RGBA" or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.split()[3])
        return white
    return image.convert("RGB")


def normalize_u8(array: np.ndarray) -> torch.Tensor:
    """``[h, w, 3]`` uint8 -> ``[3, h, w]`` float32 ``(u8/255 - 0.5)/0.5``."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an [h, w, 3] uint8 array, got {array.dtype} {list(array.shape)}")
    x = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).to(torch.float32) / 255.0
    return (x - 0.5) / 0.5


def to_uint8_image(pixels: torch.Tensor) -> np.ndarray:
    """Decoder output ``[3, h, w]`` (about [-1, 1]) -> ``[h, w, 3]`` uint8, truncating as the reference does."""
    x = ((pixels.float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    return x.permute(1, 2, 0).cpu().numpy()
