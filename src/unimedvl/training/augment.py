"""Augmentation of the images the model reads (the ViT inputs of understanding samples), for
training at small scale where the same few patients would otherwise be memorised.

A random crop keeping 70-100% of each side, then a random gamma (0.7-1.4), contrast (0.8-1.2)
and brightness shift (+-20 of 255).  No flips or rotations: left and right carry meaning in
medical images (laterality of a finding), and an augmentation must not change the right answer.
Generation targets and image-editing pairs are never augmented (their pixels are the answer).
"""

from __future__ import annotations

import numpy as np


def augment_image(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random variant of ``pixels [H, W, 3]`` uint8."""
    h, w = pixels.shape[:2]
    ch, cw = max(1, int(round(h * rng.uniform(0.7, 1.0)))), max(1, int(round(w * rng.uniform(0.7, 1.0))))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    img = pixels[y : y + ch, x : x + cw].astype(np.float32) / 255.0
    img = img ** rng.uniform(0.7, 1.4)
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.8, 1.2) + mean + rng.uniform(-20, 20) / 255.0
    return np.ascontiguousarray(np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8))


def augment_understanding(plan: list, rng: np.random.Generator) -> list:
    """The plan of an understanding sample with each ViT image replaced by a random variant."""
    from dataclasses import replace

    return [replace(item, pixels=augment_image(item.pixels, rng)) if item.kind == "vit" else item for item in plan]
