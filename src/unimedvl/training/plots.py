"""Loss curves of a run as PNG line charts (drawn with PIL; no plotting dependency)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from ..atomic import atomic_path

COLOURS = {"loss": (40, 40, 40), "ce": (200, 60, 50), "mse": (50, 100, 200)}


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
        colour = COLOURS.get(name, (100, 100, 100))
        if len(pts) > 1:
            d.line([(sx(x), sy(y)) for x, y in pts], fill=colour, width=2)
        d.text((w - right - 150 + 50 * i, 8), name, fill=colour)
    return img


def plot_run(run_dir: str | Path) -> list[Path]:
    """``plots/loss.png`` (every stage, boundaries marked) and ``plots/loss_<stage>.png``."""
    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []

    def series(rs):
        return {k: [(r["step"], r[k]) for r in rs if r.get(k) is not None] for k in ("loss", "ce", "mse")}

    stages = list(dict.fromkeys(r["stage"] for r in rows))
    boundaries = [next(r["step"] for r in rows if r["stage"] == s) for s in stages[1:]]
    for name, rs, marks in [("loss", rows, boundaries)] + [(f"loss_{s}", [r for r in rows if r["stage"] == s], []) for s in stages]:
        path = out / f"{name}.png"
        with atomic_path(path) as tmp:
            line_chart(series(rs), f"{name.replace('_', ' ')} ({len(rs)} steps)", boundaries=marks).save(tmp, format="PNG")
        written.append(path)
    return written
