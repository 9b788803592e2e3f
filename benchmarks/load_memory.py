"""Peak memory while loading a checkpoint, against the size of the loaded weights.

Each measurement runs in a fresh subprocess: RSS just before ``load_pretrained`` and the
process's peak RSS after it; the rise is compared with the bytes of the loaded tensors.

    python benchmarks/load_memory.py                      # the shared fixture + a `small` random checkpoint
    python benchmarks/load_memory.py --model DIR --dtype bf16
    python benchmarks/load_memory.py --quantize int8      # also: int8 weights quantised while loading

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
quantize = None if sys.argv[3] == "none" else sys.argv[3]
model = load_pretrained(sys.argv[1], dtype=dtype, quantize=quantize)[0]
peak_load = status_mb("VmHWM")
with torch.no_grad():  # touch every weight (quantised ones are buffers), as a first forward would
    for t in model.state_dict().values():
        t.sum()
peak_used = status_mb("VmHWM")
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
print(json.dumps({"rss_before_mb": round(before, 1), "weights_mb": round(weights, 1),
                  "load_peak_rss_rise_mb": round(peak_load - before, 1),
                  "peak_rss_rise_after_touching_weights_mb": round(peak_used - before, 1),
                  "rise_over_weights": round((peak_used - before) / weights, 3)}))
"""


def measure(model_dir: Path, dtype: str, quantize: str | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), dtype, quantize or "none"], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: the shared fixture and a `small` random model)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], action="append")
    ap.add_argument("--quantize", choices=["int8", "int4"], help="also measure loads that quantise while reading")
    args = ap.parse_args()
    dtypes = args.dtype or ["bf16", "fp32"]
    variants = [(d, None) for d in dtypes] + [(d, args.quantize) for d in dtypes if args.quantize]

    def label(d, q):
        return d + (f"+{q}" if q else "")
    results = {}
    if args.model:
        for d, q in variants:
            results[f"{args.model.name}/{label(d, q)}"] = measure(args.model, d, q)
    else:
        fixture = REPO.parent / "shared" / "fixtures" / "official_tiny_a"
        for d, q in variants:
            results[f"official_tiny_a/{label(d, q)}"] = measure(fixture, d, q)
        import torch

        from unimedvl import UniMedVL, UniMedVLConfig, save_pretrained

        with tempfile.TemporaryDirectory() as tmp:
            model = UniMedVL.from_config(UniMedVLConfig.from_preset("small"))
            save_pretrained(model, tmp, dtype=torch.bfloat16)  # stored like the official file
            del model
            for d, q in variants:
                results[f"small_bf16_file/{label(d, q)}"] = measure(Path(tmp), d, q)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
