"""Quality control on every record: stage 1 automatic checks (DATA.md 2.6) and the stage-2
label/text agreement check.

Each check returns a rejection reason or ``None``; the builder records every rejection with its
reason.  Duplicates (exact and perceptual) are found after all shards are written
(:func:`unimedvl.data.finalize.find_duplicates`), because they need every record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from ..formats.yaml_config import check_fields
from .schema import Record

LENGTH_CHECKED_TASKS = {"caption", "report", "t2i"}  # short VQA answers ("yes") are fine


@dataclass(frozen=True)
class QCConfig:
    min_side: int = 128
    min_text_chars: int = 10
    max_text_chars: int = 1024
    blank_std: float = 2.0  # pixel standard deviation below which an image is blank/constant
    saturated_fraction: float = 0.9  # share of pixels at 0 or 255 above which an image is saturated
    min_letter_fraction: float = 0.5  # language sanity: share of letters among non-space characters

    @classmethod
    def from_dict(cls, d: dict, where: str = "qc") -> "QCConfig":
        import math

        known = set(cls.__dataclass_fields__)
        check_fields(d, known, where)
        for name, value in d.items():
            default = getattr(cls, name)
            if isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value) or value < 0:
                    raise ValueError(f"{where}: {name} must be a non-negative integer, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{where}: {name} must be a non-negative number, got {value!r}")
            if name.endswith("fraction") and value > 1:
                raise ValueError(f"{where}: {name} is a fraction and must be in [0, 1], got {value!r}")
        cfg = cls(**d)  # values as written: the build fingerprint hashes them
        if cfg.min_text_chars > cfg.max_text_chars:
            raise ValueError(f"{where}: min_text_chars={cfg.min_text_chars} exceeds max_text_chars={cfg.max_text_chars}")
        return cfg


def check_image(pixels: np.ndarray, cfg: QCConfig) -> tuple[str, str] | None:
    h, w = pixels.shape[:2]
    if min(h, w) < cfg.min_side:
        return "too_small", f"{w}x{h}, short side below {cfg.min_side} px"
    grey = pixels.mean(axis=2) if pixels.ndim == 3 else pixels
    std = float(grey.std())
    if std < cfg.blank_std:
        return "blank", f"pixel standard deviation {std:.2f} < {cfg.blank_std}"
    extreme = float(((grey <= 0) | (grey >= 255)).mean())
    if extreme > cfg.saturated_fraction:
        return "saturated", f"{extreme:.0%} of pixels at 0 or 255"
    return None


_PLACEHOLDER = re.compile(r"\{[A-Za-z_]*\}|<unk>|\bnan\b|\bNone\b")


def check_text(text: str, cfg: QCConfig, *, length_checked: bool) -> tuple[str, str] | None:
    if length_checked and not (cfg.min_text_chars <= len(text) <= cfg.max_text_chars):
        return "text_length", f"{len(text)} characters, expected {cfg.min_text_chars}-{cfg.max_text_chars}"
    if _PLACEHOLDER.search(text):
        return "template", "an unfilled template field or missing value in the text"
    visible = [c for c in text if not c.isspace()]
    if visible and sum(c.isalpha() for c in visible) / len(visible) < cfg.min_letter_fraction:
        return "language", "the text is mostly not letters"
    if any(ord(c) < 32 and c not in "\n\t" for c in text):
        return "language", "control characters in the text"
    return None


def check_record(record: Record, primary: list[np.ndarray], others: list[np.ndarray], cfg: QCConfig) -> tuple[str, str] | None:
    """``primary`` images (the target, or the understood image) must pass every image check;
    ``others`` (e.g. the small input of a super-resolution pair) all but the size check."""
    for pixels in primary:
        bad = check_image(pixels, cfg)
        if bad:
            return bad
    any_size = replace(cfg, min_side=1)
    for pixels in others:
        bad = check_image(pixels, any_size)
        if bad:
            return bad
    long_text = record.task in LENGTH_CHECKED_TASKS
    for m in record.messages:
        bad = check_text(m["value"].replace("<image>", "").strip(), cfg, length_checked=long_text and m["from"] == "gpt")
        if bad:
            return bad
    for caption in record.captions.values():
        bad = check_text(caption, cfg, length_checked=True)
        if bad:
            return bad
    for text in (record.instruction, record.response):
        if text:
            bad = check_text(text, cfg, length_checked=False)
            if bad:
                return bad
    return None


# Distinctive words per modality: acronyms match case-sensitively as whole words, phrases anywhere.
MODALITY_WORDS = {
    "CT": [r"\bCT\b", r"(?i)computed tomograph"],
    "MRI": [r"\bMRI?\b", r"(?i)magnetic resonance", r"(?i)\bT[12]-weighted", r"\bFLAIR\b"],
    "CXR": [r"(?i)chest x-?ray", r"(?i)\bradiograph"],
    "Ultrasound": [r"(?i)ultrasound", r"(?i)sonograph"],
    "HIS": [r"(?i)histopatholog", r"\bH&E\b", r"(?i)immunohistochem", r"\bIHC\b", r"(?i)hematoxylin"],
    "CFP": [r"(?i)fundus"],
    "OCT": [r"\bOCT\b", r"(?i)optical coherence"],
    "Endoscopy": [r"(?i)endoscop", r"(?i)colonoscop"],
}


def _mentions(text: str, modality: str) -> bool:
    return any(re.search(p, text) for p in MODALITY_WORDS.get(modality, []))


def check_agreement(record: Record) -> tuple[str, str] | None:
    """Label/text agreement: an answer, caption, instruction or response that names another
    modality and never the record's own contradicts its modality label (questions are not
    checked: "Is this an MRI?" - "No." is fine)."""
    if record.modality not in MODALITY_WORDS:
        return None
    texts = [m["value"] for m in record.messages if m["from"] == "gpt"] + list(record.captions.values()) + [record.instruction, record.response]
    text = " ".join(t for t in texts if t)
    if _mentions(text, record.modality):
        return None
    others = [m for m in MODALITY_WORDS if m != record.modality and _mentions(text, m)]
    if others:
        return "modality_text_mismatch", f"labelled {record.modality} but the text names {', '.join(others)}"
    return None
