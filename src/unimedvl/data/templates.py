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
# Modality-specific phrasings, used alongside the generic ones.
MODALITY_CAPTION = {
    "CXR": ["Frontal chest radiograph demonstrating {label}.", "Chest X-ray with {label}."],
    "CT": ["Axial CT image demonstrating {label}.", "CT scan showing {label}."],
    "MRI": ["MRI slice demonstrating {label}.", "Magnetic resonance image showing {label}."],
    "Ultrasound": ["Ultrasound image demonstrating {label}.", "Sonographic image showing {label}."],
    "HIS": ["Histopathology tile showing {label}.", "Microscopy of a stained tissue section with {label}."],
    "CFP": ["Colour fundus photograph showing {label}.", "Retinal fundus image with {label}."],
    "OCT": ["OCT B-scan showing {label}.", "Optical coherence tomography of the retina with {label}."],
    "Endoscopy": ["Endoscopic view showing {label}.", "Endoscopy frame with {label}."],
    "Dermoscopy": ["Dermoscopic image of {label}.", "Dermoscopy showing {label}."],
}
MODALITY_OPEN_QUESTION = {
    "CXR": ["What abnormality is seen on this chest radiograph?"],
    "CT": ["What is the main finding on this CT image?"],
    "MRI": ["What does this MRI slice show?"],
    "HIS": ["What does this histopathology tile show?"],
    "CFP": ["What finding is visible on this fundus photograph?"],
    "OCT": ["What does this OCT scan show?"],
}

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


def for_modality(generic: list[str], specific: dict[str, list[str]], modality: str) -> list[str]:
    """The generic templates plus the modality's own phrasings."""
    return generic + specific.get(modality, [])


def pick(templates: list[str], key: str) -> str:
    """The template for ``key`` (stable across runs and machines)."""
    digest = hashlib.sha256(key.encode()).digest()
    return templates[int.from_bytes(digest[:4], "big") % len(templates)]


def fill(template: str, modality: str, **values: str) -> str:
    m = MODALITY_NAMES.get(modality, "medical")
    return template.format(m=m, M=m[:1].upper() + m[1:], **values)
