"""Quantised against fp32, two ways:

* ``--fixture DIR`` (a reference fixture, e.g. shared/fixtures/official_tiny_a): the relative L2
  error of the teacher-forced logits of the fp32 greedy answer, for every scheme - int8 and int4
  through their real CPU layers, nf4 and fp8 *simulated* (weights quantised and dequantised with the
  schemes' own functions, :func:`unimedvl.model.quantized.simulate_quantization`: this machine
  cannot run them), and fp8 with the activation rounding of its GPU path emulated on the CPU - plus
  the bytes of the 14B model's weights per scheme (computed on the meta device);
* ``--run DIR`` (a finished ``unimedvl demo`` run): held-out modality-question accuracy and the
  PSNR between quantised and fp32 text-to-image outputs (same prompts, seeds and sampler).

    python benchmarks/quantization_accuracy.py --fixture ../shared/fixtures/official_tiny_a
    python benchmarks/quantization_accuracy.py --run runs/demo --scheme int4      # after `unimedvl demo`

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

QUESTION = "What is shown in this image?"


def fixture_errors(directory: Path) -> dict:
    import torch
    from PIL import Image

    from unimedvl import UniMedVLPipeline
    from unimedvl.model import quantized

    image = Image.open(directory / "test_image.png").convert("RGB")
    fp32 = UniMedVLPipeline.from_pretrained(directory, dtype="fp32")
    ids = fp32.ask([image], QUESTION, temperature=0, max_new_tokens=24).token_ids + [fp32.tokenizer.special.eos]

    def logits(pipe) -> torch.Tensor:
        ctx = pipe.chat().add_user(QUESTION, [image])
        return pipe.engine.generate_text(ctx, len(ids), forced_ids=ids).logits.float()

    ref = logits(fp32)

    def measure(pipe, how: str) -> dict:
        out = logits(pipe)
        top2 = ref.topk(2, dim=-1).values
        decisive = (top2[:, 0] - top2[:, 1]) > 2 * float((out - ref).abs().max())
        return {"rel_l2": float((out - ref).norm() / ref.norm()), "how": how,
                "greedy_agreement": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
                "decisive_steps": int(decisive.sum()), "steps": len(ids)}

    results: dict = {"fixture": str(directory), "metric": "relative L2 of teacher-forced logits vs fp32"}
    for scheme in ("int8", "int4"):
        results[scheme] = measure(UniMedVLPipeline.from_pretrained(directory, dtype="fp32", quantize=scheme),
                                  "real layers (CPU kernels; int4 layers of 48 inputs dequantise per call)")
    for scheme in quantized.SCHEMES:
        pipe = UniMedVLPipeline.from_pretrained(directory, dtype="fp32")
        quantized.simulate_quantization(pipe.model, scheme)
        results[f"{scheme}_simulated"] = measure(pipe, "simulated: weights quantised and dequantised in fp32")
    # fp8's GPU path (torch._scaled_mm) also rounds the activations to e4m3, per token; torch runs it on CPUs too
    pipe = UniMedVLPipeline.from_pretrained(directory, dtype="fp32")
    quantized.quantize_model(pipe.model, "fp8")
    fits = quantized.FP8Linear._scaled_mm_fits
    quantized.FP8Linear._scaled_mm_fits = lambda self, x: self.in_features % 16 == 0 and self.out_features % 16 == 0
    try:
        results["fp8_weights_and_activations_emulated"] = measure(pipe, "the GPU path's arithmetic (torch._scaled_mm) on the CPU")
    finally:
        quantized.FP8Linear._scaled_mm_fits = fits
    results["weights_gib_unimedvl_14b_bf16"] = weight_bytes_14b()
    return results


def weight_bytes_14b() -> dict:
    """GiB of the 14B model's weights (without the autoencoder) in bf16 and under each scheme."""
    import torch

    from unimedvl.config import UniMedVLConfig
    from unimedvl.model.quantized import SCHEMES, quantize_model
    from unimedvl.model.unimedvl import UniMedVL

    sizes = {}
    for scheme in (None, *SCHEMES):
        with torch.device("meta"):
            model = UniMedVL(UniMedVLConfig.from_preset("unimedvl-14b", visual_gen=True)).to(torch.bfloat16)
        if scheme:
            quantize_model(model, scheme)
        sd = model.state_dict()
        sizes[scheme or "bf16"] = round(sum(v.numel() * v.element_size() for k, v in sd.items() if not k.startswith("vae_model.")) / 2**30, 2)
    return sizes


def demo_accuracy(run: Path, scheme: str) -> dict:
    from unimedvl import UniMedVLPipeline
    from unimedvl.demo import checks
    from unimedvl.demo.config import demo_preset
    from unimedvl.demo.heldout import load_heldout

    held = load_heldout(run / "dataset")
    sampler = demo_preset("default").sampler  # the demo's own settings, as its report uses
    results, images = {}, {}
    for s in (None, scheme):
        name = s or "fp32"
        pipe = UniMedVLPipeline.from_pretrained(run / "model", dtype="fp32", quantize=s)
        vqa = checks.modality_questions(pipe, held.questions)
        results[name] = {"modality_accuracy": vqa["accuracy"], "correct": sum(r["correct"] for r in vqa["answers"]),
                         "questions": len(vqa["answers"])}
        size = pipe.default_image_size
        images[name] = [np.asarray(pipe.generate_image(text, height=size, width=size, preset=sampler.preset, steps=sampler.steps,
                                                       cfg_text_scale=sampler.cfg_text_scale, cfg_img_scale=sampler.cfg_img_scale,
                                                       timestep_shift=sampler.timestep_shift, seed=k).image, dtype=np.float64)
                        for k, text in enumerate(t for _, texts in sorted(held.prompts.items()) for t in texts)]
    psnr = [10 * np.log10(255**2 / max(((a - b) ** 2).mean(), 1e-12)) for a, b in zip(images["fp32"], images[scheme])]
    results[f"t2i_psnr_{scheme}_vs_fp32_db"] = {"mean": round(float(np.mean(psnr)), 2), "min": round(float(np.min(psnr)), 2),
                                                "images": len(psnr)}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", type=Path, default=None, help="a reference fixture directory: logits errors of every scheme")
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished `unimedvl demo` run folder")
    ap.add_argument("--scheme", default="int8", help="--run: the scheme compared with fp32 (one this machine runs)")
    args = ap.parse_args()
    results = fixture_errors(args.fixture) if args.fixture else demo_accuracy(args.run, args.scheme)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
