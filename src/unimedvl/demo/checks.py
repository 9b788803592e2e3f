"""The demo's three held-out checks, run the same way on any pipeline (trained or untrained):

* :func:`modality_questions` - greedy answers to the closed modality questions, scored by the
  modality the answer names;
* :func:`super_resolution` - 4x super-resolution of each held-out pair through the image-editing
  path at the model's generation size for the target, PSNR/SSIM against the target at its own size
  (greyscale, bicubic resize where the sizes differ: EVALUATION.md 4.3 conventions);
* :func:`text_to_image` - one image per held-out prompt, scored by the image-statistics
  classifier's agreement with the prompted modality.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from ..evaluation.image_metrics import pixel_scores
from .heldout import ModalityQuestion, SRPair, answered_modality
from .modality_classifier import ModalityClassifier


@dataclass(frozen=True)
class SamplerChoice:
    """Image sampler settings of the demo's checks (fixed before looking at any result): a sampler
    preset (``None``: each task's default, as at every other door) and the fields the demo
    overrides for its tiny model."""

    preset: str | None = None
    steps: int = 20
    cfg_text_scale: float = 3.0
    cfg_img_scale: float = 1.5
    timestep_shift: float = 1.0  # the demo plan trains with shift 1


def modality_questions(pipe, questions: list[ModalityQuestion], *, max_new_tokens: int = 16) -> dict:
    answers = pipe.ask_batch([([Image.fromarray(q.image)], q.question) for q in questions], max_new_tokens=max_new_tokens)
    rows, per = [], {}
    for q, a in zip(questions, answers):
        predicted = answered_modality(a.text)
        correct = predicted == q.modality
        rows.append({"id": q.id, "modality": q.modality, "question": q.question, "answer": a.text, "predicted": predicted,
                     "correct": correct, "reference": q.reference})
        hits, n = per.get(q.modality, (0, 0))
        per[q.modality] = (hits + correct, n + 1)
    accuracy = sum(r["correct"] for r in rows) / len(rows) if rows else None
    return {"accuracy": accuracy, "per_modality": {m: h / n for m, (h, n) in sorted(per.items())}, "answers": rows}


def bicubic_upsample(low: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``low`` resized to ``size`` (width, height) with PIL's bicubic filter."""
    return np.asarray(Image.fromarray(low).resize(size, Image.BICUBIC))


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def super_resolution(pipe, pairs: list[SRPair], sampler: SamplerChoice, *, seed: int = 0,
                     on_item: Callable[[], None] | None = None) -> dict:
    rows, outputs = [], []
    for k, pair in enumerate(pairs):
        w, h = pipe.generation_size(pair.target.shape[1], pair.target.shape[0])  # scored at the target's size
        result = pipe.edit([Image.fromarray(pair.low)], pair.instruction, height=h, width=w, preset=sampler.preset, steps=sampler.steps,
                           cfg_text_scale=sampler.cfg_text_scale, cfg_img_scale=sampler.cfg_img_scale,
                           timestep_shift=sampler.timestep_shift, analyze=False, seed=seed + k)
        output = np.asarray(result.image.convert("RGB"))
        outputs.append(output)
        rows.append({"id": pair.id, "source": pair.source, "modality": pair.modality, **pixel_scores(output, pair.target, "sr4x")})
        if on_item:
            on_item()
    return {"psnr": _mean([r["psnr"] for r in rows]), "ssim": _mean([r["ssim"] for r in rows]), "pairs": rows, "outputs": outputs}


def bicubic_baseline(pairs: list[SRPair]) -> dict:
    rows, outputs = [], []
    for pair in pairs:
        h, w = pair.target.shape[:2]
        output = bicubic_upsample(pair.low, (w, h))
        outputs.append(output)
        rows.append({"id": pair.id, "source": pair.source, "modality": pair.modality, **pixel_scores(output, pair.target, "sr4x")})
    return {"psnr": _mean([r["psnr"] for r in rows]), "ssim": _mean([r["ssim"] for r in rows]), "pairs": rows, "outputs": outputs}


def text_to_image(pipe, prompts: dict[str, list[str]], classifier: ModalityClassifier, sampler: SamplerChoice, *,
                  size: int, seed: int = 0, on_item: Callable[[], None] | None = None) -> dict:
    images: dict[str, list[np.ndarray]] = {}
    rows = []
    k = 0
    for modality, texts in sorted(prompts.items()):
        for text in texts:
            result = pipe.generate_image(text, height=size, width=size, preset=sampler.preset, steps=sampler.steps,
                                         cfg_text_scale=sampler.cfg_text_scale,
                                         cfg_img_scale=sampler.cfg_img_scale, timestep_shift=sampler.timestep_shift, seed=seed + k)
            k += 1
            px = np.asarray(result.image.convert("RGB"))
            images.setdefault(modality, []).append(px)
            rows.append({"modality": modality, "prompt": text, "classified_as": classifier.predict(px)})
            if on_item:
                on_item()
    agreement, per = classifier.agreement(images)
    return {"agreement": agreement, "per_modality": per, "images": images, "rows": rows}
