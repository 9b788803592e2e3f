"""Text templates that turn labels and metadata into captions, questions and instructions.

Deterministic choice: a template is picked by hashing the record id, so rebuilding gives the same
text.  Templates never interpolate anything but labels, modality names and geometry.
"""

from __future__ import annotations

import hashlib

MODALITY_NAMES = {
    "CXR": "chest X-ray",
    "CT": "CT",
    "MRI": "MRI",
    "Ultrasound": "ultrasound",
    "HIS": "histopathology",
    "CFP": "colour fundus photograph",
    "OCT": "OCT",
    "Endoscopy": "endoscopy",
    "Dermoscopy": "dermoscopy",
    "Other": "medical",
}

CAPTION = [
    "A {m} image showing {label}.",
    "{M} image with findings consistent with {label}.",
    "This {m} image demonstrates {label}.",
]
CLOSED_QUESTION = [
    "Is there evidence of {label} in this image?",
    "Does this {m} image show {label}?",
]
OPEN_QUESTION = [
    "What is the main finding in this {m} image?",
    "Which abnormality does this {m} image show?",
]
MODALITY_QUESTION = ["What imaging modality was used to acquire this image?", "Which kind of medical image is this?"]
MODALITY_ANSWER = "This is a {m} image."
GENERATION_PROMPT = ["Generate a {m} image showing {label}.", "Synthesize a {m} image with {label}."]
SR_INSTRUCTION = [
    "Enhance the spatial resolution of this {m} slice by a factor of four.",
    "Reconstruct a high-resolution version of this low-resolution {m} image (4x).",
]
SR_RESPONSE = "Here is the 4x super-resolved {m} image."
TRANSLATION_INSTRUCTION = "Translate this {src} {m} slice into the corresponding {dst} slice."
TRANSLATION_RESPONSE = "Here is the synthesized {dst} slice."


def pick(templates: list[str], key: str) -> str:
    """The template for ``key`` (stable across runs and machines)."""
    digest = hashlib.sha256(key.encode()).digest()
    return templates[int.from_bytes(digest[:4], "big") % len(templates)]


def fill(template: str, modality: str, **values: str) -> str:
    m = MODALITY_NAMES.get(modality, "medical")
    return template.format(m=m, M=m[:1].upper() + m[1:], **values)
