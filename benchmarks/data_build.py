"""Dataset-build throughput and memory.

    python benchmarks/data_build.py [--items 200] [--size 384]

Generates ``--items`` labelled images (procedural textures, ``--size`` px) as an image_folder
source, then builds them in fresh processes: with 1 and with 2 workers (records/s and the
speed-up), and with 10x the items (peak RSS, which should stay flat: shards are written as they
complete and nothing accumulates per record).  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = r"""
import json, sys, time
import pyarrow.parquet  # imports are start-up, not throughput: done before the clock starts
from unimedvl.data.build_config import load_build_config
from unimedvl.data.builder import build
cfg = load_build_config(sys.argv[1])
t = time.perf_counter()
build(cfg, sys.argv[2], workers=int(sys.argv[3]))
elapsed = time.perf_counter() - t
manifest = json.load(open(sys.argv[2] + "/manifest.json"))
def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
print(json.dumps({"seconds": elapsed, "records": manifest["num_records"], "peak_rss_mb": peak_mb()}))
"""


def make_source(root: Path, n: int, size: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    lines = ["file,label"]
    labels = ["pneumonia", "effusion", "cardiomegaly", "no finding", "nodule"]
    yy, xx = np.mgrid[:size, :size] / size
    for i in range(n):
        f1, f2, phase = rng.uniform(2, 12), rng.uniform(2, 12), rng.uniform(0, 6.28)
        img = 127 + 60 * np.sin(f1 * 6.28 * xx + phase) * np.cos(f2 * 6.28 * yy) + rng.normal(0, 12, (size, size))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "img" / f"{i:06d}.png")
        lines.append(f"{i:06d}.png,{labels[i % len(labels)]}")
    (root / "img" / "labels.csv").write_text("\n".join(lines) + "\n")
    config = root / "build.yaml"
    config.write_text(
        "salt: benchmark-salt\nitems_per_shard: 8\nsources:\n"
        "  - {name: synthetic, kind: image_folder, path: img, modality: CXR}\n"
    )
    return config


def run(config: Path, out: Path, workers: int) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(config), str(out), str(workers)], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--size", type=int, default=384)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="unimedvl-databench-") as tmp:
        tmp = Path(tmp)
        small = make_source(tmp / "small", args.items, args.size)
        large = make_source(tmp / "large", 10 * args.items, args.size, seed=1)
        one = run(small, tmp / "out1", 1)
        two = run(small, tmp / "out2", 2)
        big = run(large, tmp / "out10", 1)
        same = all((tmp / "out1" / "shards" / f.name).read_bytes() == f.read_bytes() for f in (tmp / "out2" / "shards").iterdir())
    out = {
        "items": args.items,
        "image_size": args.size,
        "records": one["records"],
        "records_per_s_1_worker": round(one["records"] / one["seconds"], 1),
        "records_per_s_2_workers": round(two["records"] / two["seconds"], 1),
        "speedup_2_workers": round(one["seconds"] / two["seconds"], 2),
        "shards_identical_1_vs_2_workers": same,
        "peak_rss_mb": round(one["peak_rss_mb"], 1),
        "peak_rss_mb_10x_items": round(big["peak_rss_mb"], 1),
        "rss_growth_10x": round(big["peak_rss_mb"] / one["peak_rss_mb"], 3),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
