"""Small charts drawn with PIL (no plotting dependency)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from .atomic import atomic_path


def bar_chart(values: dict[str, float], title: str, width: int = 640, value_format: str = "{}") -> Image.Image:
    """A horizontal bar chart drawn with PIL (label, bar, value per row)."""
    rows = max(len(values), 1)
    height = 30 + 22 * rows
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 6), title, fill="black")
    top = max((v for v in values.values() if v is not None and v > 0), default=1)
    for i, (label, n) in enumerate(values.items()):
        y = 28 + 22 * i
        d.text((8, y + 3), label[:28], fill="black")
        bar = max(0, int((width - 260) * (n or 0) / top))  # negative values show as a label only
        d.rectangle([200, y, 200 + bar, y + 16], fill=(70, 110, 180))
        d.text((206 + bar, y + 3), "n/a" if n is None else value_format.format(n), fill="black")
    return img


LINE_COLOURS = {"loss": (40, 40, 40), "ce": (200, 60, 50), "mse": (50, 100, 200)}


def line_chart(series: dict[str, list[tuple[int, float]]], title: str, size=(720, 360), boundaries: list[int] = ()) -> Image.Image:
    w, h = size
    left, right, top, bottom = 60, 20, 30, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill="black")
    points = [p for pts in series.values() for p in pts]
    if not points:
        return img
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)
    sx = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    sy = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline=(180, 180, 180))
    for b in boundaries:
        d.line([sx(b), top, sx(b), h - bottom], fill=(220, 220, 220))
    for k, frac in enumerate((0.0, 0.5, 1.0)):
        y = y0 + frac * (y1 - y0)
        d.text((4, sy(y) - 6), f"{y:.3g}", fill="black")
    d.text((left, h - bottom + 6), f"step {x0}", fill="black")
    d.text((w - right - 70, h - bottom + 6), f"step {x1}", fill="black")
    for i, (name, pts) in enumerate(series.items()):
        colour = LINE_COLOURS.get(name, (100, 100, 100))
        if len(pts) > 1:
            d.line([(sx(x), sy(y)) for x, y in pts], fill=colour, width=2)
        d.text((w - right - 150 + 50 * i, 8), name, fill=colour)
    return img


def save_chart(image: Image.Image, path: str | Path) -> Path:
    """Write a chart as PNG, atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def image_grid(rows: list[list], cell: int = 96, row_labels: list[str] = (), column_labels: list[str] = (),
               label_width: int = 110, background: str = "white") -> Image.Image:
    """Images (uint8 ``[h, w, 3]`` / ``[h, w]`` arrays or PIL images) in labelled rows, each scaled
    to fit a ``cell x cell`` square: enlarged with nearest neighbour (pixels stay visible), reduced
    with a smoothing filter; ``None`` leaves a cell empty."""
    import numpy as np

    ncols = max((len(r) for r in rows), default=0)
    left = label_width if row_labels else 0
    top = 18 if column_labels else 0
    img = Image.new("RGB", (left + ncols * cell, top + len(rows) * cell), background)
    d = ImageDraw.Draw(img)
    for j, label in enumerate(column_labels):
        d.text((left + j * cell + 4, 3), str(label)[: cell // 6], fill="black" if background == "white" else "white")
    for i, row in enumerate(rows):
        if i < len(row_labels):
            d.text((4, top + i * cell + cell // 2 - 6), str(row_labels[i])[: label_width // 6], fill="black")
        for j, picture in enumerate(row):
            if picture is None:
                continue
            pil = picture if isinstance(picture, Image.Image) else Image.fromarray(np.asarray(picture))
            scale = cell / max(pil.size)
            size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
            pil = pil.convert("RGB").resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)
            img.paste(pil, (left + j * cell + (cell - pil.width) // 2, top + i * cell + (cell - pil.height) // 2))
    return img
