"""Small charts drawn with PIL (no plotting dependency)."""

from __future__ import annotations

from PIL import Image, ImageDraw


def bar_chart(values: dict[str, float], title: str, width: int = 640, value_format: str = "{}") -> Image.Image:
    """A horizontal bar chart drawn with PIL (label, bar, value per row)."""
    rows = max(len(values), 1)
    height = 30 + 22 * rows
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 6), title, fill="black")
    top = max((v for v in values.values() if v is not None), default=1) or 1
    for i, (label, n) in enumerate(values.items()):
        y = 28 + 22 * i
        d.text((8, y + 3), label[:28], fill="black")
        bar = int((width - 260) * (n or 0) / top)
        d.rectangle([200, y, 200 + bar, y + 16], fill=(70, 110, 180))
        d.text((206 + bar, y + 3), "n/a" if n is None else value_format.format(n), fill="black")
    return img
