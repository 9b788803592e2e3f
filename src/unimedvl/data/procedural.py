"""Procedurally generated stand-in images for modalities that no installable package ships
(chest X-ray, OCT, endoscopy, ultrasound, dermoscopy), each with a visible, label-defining
feature, plus counterfactual pairs (the same image with and without the feature).

These exist so the demo corpus covers every modality and task family offline; they are marked
``procedural`` in their source's licence and are not medical data.
"""

from __future__ import annotations

import numpy as np

SIZE = 256


def _grid(size: int = SIZE):
    yy, xx = np.mgrid[:size, :size] / size
    return yy, xx


def _blob(yy, xx, cy, cx, r):
    return np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))


def chest_xray(rng: np.random.Generator, finding: bool) -> np.ndarray:
    yy, xx = _grid()
    width, height, top = rng.uniform(0.12, 0.17), rng.uniform(0.24, 0.34), rng.uniform(0.42, 0.52)
    body = np.clip(1.2 - rng.uniform(2.6, 3.4) * np.abs(xx - 0.5), 0, 1) * 0.6
    lungs = np.zeros_like(xx)
    for cx in (0.5 - rng.uniform(0.15, 0.2), 0.5 + rng.uniform(0.15, 0.2)):
        lungs += ((xx - cx) / width) ** 2 + ((yy - top) / height) ** 2 < 1
    spine = np.exp(-((xx - 0.5) / 0.04) ** 2) * 0.35
    heart = _blob(yy, xx, top + 0.14, 0.54 + rng.uniform(-0.03, 0.03), rng.uniform(0.07, 0.11)) * 0.3
    ribs = 0.06 * (np.sin(yy * rng.uniform(50, 70) + np.abs(xx - 0.5) * 12 + rng.uniform(0, 6)) > 0.7) * lungs
    img = body + spine + heart + ribs - 0.35 * lungs + 0.03 * rng.standard_normal(xx.shape)
    if finding:  # a focal opacity in one lung (drawn last: the rest is the same with or without it)
        side = rng.choice([0.32, 0.68])
        img += 0.35 * _blob(yy, xx, rng.uniform(0.4, 0.65), side + rng.uniform(-0.05, 0.05), rng.uniform(0.04, 0.07)) * lungs
    return _to_u8(img, reference=body + spine + heart - 0.35 * lungs)


def oct_scan(rng: np.random.Generator, finding: bool) -> np.ndarray:
    yy, xx = _grid()
    surface = (rng.uniform(0.25, 0.45) + rng.uniform(0.02, 0.08) * np.sin(xx * rng.uniform(3, 9) + rng.uniform(0, 6))
               - 0.08 * np.exp(-((xx - rng.uniform(0.35, 0.65)) / 0.08) ** 2))
    img = np.zeros_like(xx)
    for k, (offset, gain) in enumerate([(0.0, 0.9), (0.04, 0.4), (0.09, 0.7), (0.16, 0.5), (0.22, 1.0)]):
        img += gain * np.exp(-((yy - surface - offset) / 0.012) ** 2)
    if finding:  # drusen: bumps under the bright RPE band
        for cx in rng.uniform(0.2, 0.8, 3):
            img += 0.8 * _blob(yy, xx, float((surface + 0.21)[0, int(cx * SIZE)]) - 0.02, cx, 0.02)
    speckle = rng.gamma(2.0, 0.5, img.shape)
    return _to_u8(img * speckle * 0.8)


def endoscopy(rng: np.random.Generator, finding: bool) -> np.ndarray:
    yy, xx = _grid()
    r = np.hypot(yy - 0.5, xx - 0.5)
    light = np.hypot(yy - rng.uniform(0.3, 0.7), xx - rng.uniform(0.3, 0.7))
    texture = 0.1 * np.sin(xx * rng.uniform(25, 50) + rng.uniform(0, 6)) * np.sin(yy * rng.uniform(25, 50) + rng.uniform(0, 6))
    base = np.clip(1 - light * 1.2, 0, 1) * (0.8 + texture)
    rgb = np.stack([base * 0.95, base * 0.45, base * 0.4], axis=-1)
    if finding:  # a raised polyp: brighter, redder blob
        b = _blob(yy, xx, rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65), 0.07)[..., None]
        rgb = rgb + b * np.array([0.3, 0.05, 0.0])
    rgb[r > 0.48] = 0
    return _to_u8(rgb + 0.02 * rng.standard_normal(rgb.shape))


def ultrasound(rng: np.random.Generator, finding: bool) -> np.ndarray:
    yy, xx = _grid()
    angle = np.arctan2(xx - 0.5, yy + 0.1)
    radius = np.hypot(xx - 0.5, yy + 0.1)
    fan = (np.abs(angle) < rng.uniform(0.45, 0.7)) & (radius > 0.15) & (radius < 1.0)
    layer = rng.uniform(0.3, 0.6)
    tissue = 0.5 + 0.2 * np.sin(radius * rng.uniform(15, 35) + rng.uniform(0, 6)) + 0.2 * (radius > layer)
    if finding:  # an anechoic (dark) cyst with posterior enhancement
        cy, cx = rng.uniform(0.45, 0.7), rng.uniform(0.4, 0.6)
        cyst = ((yy - cy) ** 2 + (xx - cx) ** 2) < 0.06**2
        tissue = np.where(cyst, 0.05, tissue + 0.25 * ((np.abs(xx - cx) < 0.05) & (yy > cy + 0.06)))
    img = tissue * rng.rayleigh(0.6, xx.shape) * fan
    return _to_u8(img)


def dermoscopy(rng: np.random.Generator, finding: bool) -> np.ndarray:
    yy, xx = _grid()
    skin = np.stack([0.85 + 0 * xx, 0.68 + 0 * xx, 0.58 + 0 * xx], axis=-1)
    cy, cx, size = rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6), rng.uniform(0.14, 0.24)
    theta = np.arctan2(yy - cy, xx - cx)
    irregular = 1 + (0.3 * np.sin(5 * theta + rng.uniform(0, 6)) if finding else 0.05 * np.sin(3 * theta))
    lesion = np.hypot(yy - cy, xx - cx) < size * irregular
    colour = np.array([0.35, 0.2, 0.12]) if finding else np.array([0.55, 0.38, 0.28])
    rgb = np.where(lesion[..., None], colour, skin)
    return _to_u8(rgb + 0.03 * rng.standard_normal(rgb.shape))


def _to_u8(x: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Scale to 8 bits between percentiles of ``reference`` (default ``x``) - a fixed reference
    keeps a counterfactual pair on the same intensity scale."""
    lo, hi = np.percentile(x if reference is None else reference, (0.5, 99.5))
    return np.clip((x - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)


GENERATORS = {
    # modality: (generator, label without the finding, label with it)
    "CXR": (chest_xray, "no acute cardiopulmonary finding", "a focal lung opacity"),
    "OCT": (oct_scan, "normal retinal layers", "drusen beneath the retinal pigment epithelium"),
    "Endoscopy": (endoscopy, "normal mucosa", "a polyp"),
    "Ultrasound": (ultrasound, "homogeneous tissue", "an anechoic cyst"),
    "Dermoscopy": (dermoscopy, "a benign-appearing naevus", "an irregular pigmented lesion"),
}


def counterfactual_pair(rng_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A chest X-ray without and with a focal opacity, identical elsewhere."""
    a = chest_xray(np.random.default_rng(rng_seed), False)
    b = chest_xray(np.random.default_rng(rng_seed), True)
    return a, b
