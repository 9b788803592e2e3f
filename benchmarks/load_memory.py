"""Peak memory while loading a checkpoint, against the size of the loaded weights.

Each measurement runs in a fresh subprocess: RSS just before ``load_pretrained`` and the
process's peak RSS after it; the rise is compared with the bytes of the loaded tensors.

    python benchmarks/load_memory.py                      # the shared fixture + a `small` random checkpoint
    python benchmarks/load_memory.py --model DIR --dtype bf16

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# VmHWM (not ru_maxrss, which survives exec and would report the parent's peak) is this process's peak.
CHILD = r"""
import json, sys, torch
def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
import unimedvl, safetensors.torch, transformers  # imports before the baseline
from unimedvl import load_pretrained
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[2]]
before = status_mb("VmRSS")
model = load_pretrained(sys.argv[1], dtype=dtype)[0]
peak_load = status_mb("VmHWM")
with torch.no_grad():  # touch every weight, as a first forward would
    for p in model.parameters():
        p.sum()
peak_used = status_mb("VmHWM")
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
print(json.dumps({"rss_before_mb": round(before, 1), "weights_mb": round(weights, 1),
                  "load_peak_rss_rise_mb": round(peak_load - before, 1),
                  "peak_rss_rise_after_touching_weights_mb": round(peak_used - before, 1),
                  "rise_over_weights": round((peak_used - before) / weights, 3)}))
"""


def measure(model_dir: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), dtype], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: the shared fixture and a `small` random model)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], action="append")
    args = ap.parse_args()
    dtypes = args.dtype or ["bf16", "fp32"]
    results = {}
    if args.model:
        for d in dtypes:
            results[f"{args.model.name}/{d}"] = measure(args.model, d)
    else:
        fixture = REPO.parent / "shared" / "fixtures" / "official_tiny_a"
        for d in dtypes:
            results[f"official_tiny_a/{d}"] = measure(fixture, d)
        import torch

        from unimedvl import UniMedVL, UniMedVLConfig, save_pretrained

        with tempfile.TemporaryDirectory() as tmp:
            model = UniMedVL.from_config(UniMedVLConfig.from_preset("small"))
            save_pretrained(model, tmp, dtype=torch.bfloat16)  # stored like the official file
            del model
            for d in dtypes:
                results[f"small_bf16_file/{d}"] = measure(Path(tmp), d)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
