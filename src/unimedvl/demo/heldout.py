"""The held-out evaluation sets of a built dataset's test split (whose patients, volumes and
procedural items never appear in training):

* closed modality questions - each distinct test image that has a "which kind of image" record,
  with its modality as the reference;
* 4x super-resolution pairs - the test split's ``sr`` records (low-resolution input, target);
* text-to-image prompts - the test split's ``t2i`` prompts, grouped by modality;
* reference images per modality from the train split, for the image-statistics classifier.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data import templates as T
from ..data.imaging import decode_png
from ..data.layout import DatasetLayout

MODALITY_QUESTIONS = set(T.MODALITY_QUESTION)
# the names the answers use, matched as whole words (so "CT" is not found inside "OCT")
ANSWER_NAMES = {m: name for m, name in T.MODALITY_NAMES.items() if m != "Other"}


@dataclass
class ModalityQuestion:
    id: str
    image: np.ndarray
    question: str
    modality: str
    reference: str


@dataclass
class SRPair:
    id: str
    modality: str
    source: str
    instruction: str
    low: np.ndarray
    target: np.ndarray


@dataclass
class HeldOut:
    questions: list[ModalityQuestion] = field(default_factory=list)
    sr_pairs: list[SRPair] = field(default_factory=list)
    prompts: dict[str, list[str]] = field(default_factory=dict)  # modality -> test-split t2i prompts
    train_modalities: dict[str, int] = field(default_factory=dict)  # modality -> train modality questions
    train_images: dict[str, list[np.ndarray]] = field(default_factory=dict)  # modality -> train images
    test_images: dict[str, list[np.ndarray]] = field(default_factory=dict)  # modality -> held-out real images

    def limited(self, max_questions: int | None, max_sr_pairs: int | None, prompts_per_modality: int | None) -> "HeldOut":
        """The sets the checks run on: the first ``max_*`` items (``None``: all), ``prompts_per_modality`` prompts each."""
        return dataclasses.replace(
            self, questions=self.questions[:max_questions], sr_pairs=self.sr_pairs[:max_sr_pairs],
            prompts={m: p[:prompts_per_modality] for m, p in self.prompts.items()})


def answered_modality(answer: str) -> str | None:
    """The modality an answer names first (whole words, case-insensitive); ``None`` if it names none."""
    text = answer.lower()
    best = None
    for modality, name in ANSWER_NAMES.items():
        match = re.search(r"(?<![a-z0-9])" + re.escape(name.lower()) + r"(?![a-z0-9])", text)
        if match and (best is None or match.start() < best[0]):
            best = (match.start(), modality)
    return best[1] if best else None


def load_heldout(dataset: str | Path, *, images_per_modality: int = 24) -> HeldOut:
    """The held-out sets of ``dataset`` (``test`` split) and the train-split references."""
    held = HeldOut()
    seen_questions: set[str] = set()
    for row in DatasetLayout(dataset).iter_kept():
        split, modality, task = row["split"], row["modality"], row["task"]
        messages = json.loads(row["messages"])
        question = messages[0]["value"].replace("<image>", "").strip() if messages else ""
        is_modality_question = row["family"] == "understanding" and question in MODALITY_QUESTIONS and modality in ANSWER_NAMES
        if split == "train":
            if is_modality_question:
                held.train_modalities[modality] = held.train_modalities.get(modality, 0) + 1
            if task == "t2i" and modality in ANSWER_NAMES and len(held.train_images.setdefault(modality, [])) < images_per_modality:
                held.train_images[modality].append(decode_png(row["output_images"][0]))
            continue
        if split != "test":
            continue
        if is_modality_question and row["image_sha256"] not in seen_questions:
            seen_questions.add(row["image_sha256"])
            held.questions.append(ModalityQuestion(row["id"], decode_png(row["input_images"][0]), question, modality, messages[1]["value"]))
        elif task == "sr":
            held.sr_pairs.append(SRPair(row["id"], modality, row["source"], row["instruction"],
                                        decode_png(row["input_images"][0]), decode_png(row["output_images"][0])))
        elif task == "t2i" and modality in ANSWER_NAMES:
            captions = json.loads(row["captions"])
            held.prompts.setdefault(modality, []).append(captions.get("prompt") or next(iter(captions.values())))
            if len(held.test_images.setdefault(modality, [])) < images_per_modality:
                held.test_images[modality].append(decode_png(row["output_images"][0]))
    held.questions.sort(key=lambda q: (q.modality, q.id))
    held.sr_pairs.sort(key=lambda p: (p.source, p.id))
    return held
