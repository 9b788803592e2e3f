"""Loss curves of a run as PNG line charts."""

from __future__ import annotations

import json
from pathlib import Path

from ..formats.charts import line_chart, save_chart

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
        save_chart(line_chart(series(rs), f"{name.replace('_', ' ')} ({len(rs)} steps)", boundaries=marks), path)
        written.append(path)
    return written
