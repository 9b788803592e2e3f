"""The canonical sample record of a built dataset, and its Parquet schema.

One record is one training sample of one of three task families (DATA.md 1.4, 4.5):

* ``understanding`` - images + a conversation; ``messages`` are turns ``{"from": "human"|"gpt",
  "value": ...}``; gpt turns carry loss, human turns do not; ``<image>`` in a human turn marks
  where the images go.
* ``generation`` - a prompt (``captions``: alternatives, one picked per visit) + a target image.
* ``interleaved`` - input images + an instruction + target image(s) + an optional response text
  (the explanation of a counterfactual, the confirmation of a translation).

Images are embedded as 8-bit PNG bytes (already windowed: 16-bit data never reaches the loader).
``patient_group`` is a salted hash, never an identifier.  The Parquet files are readable with
pyarrow alone: nothing in them needs this package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

FAMILIES = ("understanding", "generation", "interleaved")
MODALITIES = ("CXR", "CT", "MRI", "Ultrasound", "HIS", "CFP", "OCT", "Endoscopy", "Dermoscopy", "Other")
SPLITS = ("train", "val", "test")
SCHEMA_VERSION = 1


@dataclass
class Record:
    id: str  # stable: derived from the source and item, never from patient data
    family: str
    task: str  # vqa, caption, report, classification, t2i, sr, cross_modal, ihc_staining, counterfactual, seg, ...
    modality: str
    source: str  # the build config's source name
    license: str
    patient_group: str  # salted hash of the patient (or of the item when no patient is known)
    input_images: list[bytes] = field(default_factory=list)  # PNG
    output_images: list[bytes] = field(default_factory=list)  # PNG
    messages: list[dict] = field(default_factory=list)  # understanding: [{"from", "value"}]
    captions: dict[str, str] = field(default_factory=dict)  # generation: {name: caption}
    instruction: str = ""  # interleaved
    response: str = ""  # interleaved: text after the target image (with loss)
    split: str = "train"
    meta: dict = field(default_factory=dict)  # width/height, window, slice... never identifiers
    item_hash: str = ""  # hash of the work item it came from (set by the builder)
    image_sha256: str = ""  # of the primary image's pixels (set by the builder)
    image_phash: str = ""  # 256-bit difference hash of the primary image, hex (set by the builder)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"record {self.id}: family must be one of {FAMILIES}, got {self.family!r}")
        if self.modality not in MODALITIES:
            raise ValueError(f"record {self.id}: modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.split not in SPLITS:
            raise ValueError(f"record {self.id}: split must be one of {SPLITS}, got {self.split!r}")

    def to_row(self) -> dict:
        return {
            "id": self.id,
            "family": self.family,
            "task": self.task,
            "modality": self.modality,
            "source": self.source,
            "license": self.license,
            "patient_group": self.patient_group,
            "split": self.split,
            "input_images": list(self.input_images),
            "output_images": list(self.output_images),
            "messages": json.dumps(self.messages, ensure_ascii=False, sort_keys=True),
            "captions": json.dumps(self.captions, ensure_ascii=False, sort_keys=True),
            "instruction": self.instruction,
            "response": self.response,
            "meta": json.dumps(self.meta, ensure_ascii=False, sort_keys=True),
            "item_hash": self.item_hash,
            "image_sha256": self.image_sha256,
            "image_phash": self.image_phash,
        }

    @classmethod
    def from_row(cls, row: dict) -> "Record":
        return cls(
            id=row["id"], family=row["family"], task=row["task"], modality=row["modality"], source=row["source"],
            license=row["license"], patient_group=row["patient_group"], split=row["split"],
            input_images=list(row["input_images"]), output_images=list(row["output_images"]),
            messages=json.loads(row["messages"]), captions=json.loads(row["captions"]),
            instruction=row["instruction"], response=row["response"], meta=json.loads(row["meta"]),
            item_hash=row["item_hash"], image_sha256=row["image_sha256"], image_phash=row["image_phash"],
        )


@dataclass
class Rejection:
    """An item or record that did not make it, and why (nothing is dropped silently)."""

    item: str  # the work item (a path relative to the source root, plus a slice/frame suffix)
    source: str
    stage: str  # read, qc1, qc2, review
    reason: str  # a short machine-readable code, e.g. "too_small", "blank", "corrupt"
    detail: str = ""  # human-readable, never pixel data or identifiers

    def to_json(self) -> dict:
        return {"item": self.item, "source": self.source, "stage": self.stage, "reason": self.reason, "detail": self.detail}


def arrow_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("family", pa.string()),
            ("task", pa.string()),
            ("modality", pa.string()),
            ("source", pa.string()),
            ("license", pa.string()),
            ("patient_group", pa.string()),
            ("split", pa.string()),
            ("input_images", pa.list_(pa.binary())),
            ("output_images", pa.list_(pa.binary())),
            ("messages", pa.string()),  # JSON list of turns
            ("captions", pa.string()),  # JSON object {name: caption}
            ("instruction", pa.string()),
            ("response", pa.string()),
            ("meta", pa.string()),  # JSON object
            ("item_hash", pa.string()),
            ("image_sha256", pa.string()),
            ("image_phash", pa.string()),
        ],
        metadata={"unimedvl_schema_version": str(SCHEMA_VERSION)},
    )
