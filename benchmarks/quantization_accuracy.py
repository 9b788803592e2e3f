"""int8 against fp32 on a trained demo model: held-out modality-question accuracy and the PSNR
between int8 and fp32 text-to-image outputs (same prompts, seeds and sampler).

    python benchmarks/quantization_accuracy.py --run runs/demo      # after `unimedvl demo`

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished `unimedvl demo` run folder")
    ap.add_argument("--scheme", default="int8")
    args = ap.parse_args()

    from unimedvl import UniMedVLPipeline
    from unimedvl.demo import checks
    from unimedvl.demo.config import demo_preset
    from unimedvl.demo.heldout import load_heldout

    held = load_heldout(args.run / "dataset")
    sampler = demo_preset("default").sampler  # the demo's own settings, as its report uses
    results, images = {}, {}
    for scheme in (None, args.scheme):
        name = scheme or "fp32"
        pipe = UniMedVLPipeline.from_pretrained(args.run / "model", dtype="fp32", quantize=scheme)
        vqa = checks.modality_questions(pipe, held.questions)
        results[name] = {"modality_accuracy": vqa["accuracy"], "correct": sum(r["correct"] for r in vqa["answers"]),
                         "questions": len(vqa["answers"])}
        size = pipe.default_image_size
        images[name] = [np.asarray(pipe.generate_image(text, height=size, width=size, preset=sampler.preset, steps=sampler.steps,
                                                       cfg_text_scale=sampler.cfg_text_scale, cfg_img_scale=sampler.cfg_img_scale,
                                                       timestep_shift=sampler.timestep_shift, seed=k).image, dtype=np.float64)
                        for k, text in enumerate(t for _, texts in sorted(held.prompts.items()) for t in texts)]
    psnr = [10 * np.log10(255**2 / max(((a - b) ** 2).mean(), 1e-12)) for a, b in zip(images["fp32"], images[args.scheme])]
    results[f"t2i_psnr_{args.scheme}_vs_fp32_db"] = {"mean": round(float(np.mean(psnr)), 2), "min": round(float(np.min(psnr)), 2),
                                                     "images": len(psnr)}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
