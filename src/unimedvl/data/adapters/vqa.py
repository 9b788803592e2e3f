"""``kind: vqa`` - existing medical VQA datasets (VQA-RAD, SLAKE, PathVQA layouts, or any JSON /
JSONL / CSV with image, question and answer fields) -> multi-turn conversations, one per image.

Example::

    - name: slake
      kind: vqa
      path: /data/slake            # images are looked up under path/images_dir
      modality: auto               # per question from a modality field when the format has one
      options:
        format: slake              # vqa_rad, slake, pathvqa or custom
        annotations: train.json
        images_dir: imgs
        language: en               # SLAKE: keep English questions only

Field names per format: VQA-RAD ``image_name/question/answer`` (``image_organ``); SLAKE
``img_name/question/answer`` (``modality``, ``q_lang``); PathVQA ``image/question/answer``;
custom: ``image_field``, ``question_field``, ``answer_field``.  Splits stay patient-group based:
give a ``split`` override in your own format only if the source is pre-split.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterator

from ..imaging import png_bytes
from ..schema import MODALITIES, Record, Rejection
from .base import Adapter, read_annotations

FORMATS = {
    "vqa_rad": {"image": "image_name", "question": "question", "answer": "answer", "modality": None},
    "slake": {"image": "img_name", "question": "question", "answer": "answer", "modality": "modality"},
    "pathvqa": {"image": "image", "question": "question", "answer": "answer", "modality": None},
}
SLAKE_MODALITY = {"CT": "CT", "MRI": "MRI", "X-Ray": "CXR"}
IMAGE_SUFFIXES = ("", ".jpg", ".png", ".jpeg")


class VqaAdapter(Adapter):
    kind = "vqa"
    requires_modality = False
    options = {"format": "custom", "annotations": "annotations.json", "images_dir": ".", "language": None,
               "image_field": "image", "question_field": "question", "answer_field": "answer"}

    def __init__(self, source, ctx):
        super().__init__(source, ctx)
        fmt = self.opt["format"]
        if fmt != "custom" and fmt not in FORMATS:
            raise ValueError(f"source {source.name!r}: format must be one of {sorted(FORMATS)} or custom")
        self.fields = FORMATS.get(fmt) or {"image": self.opt["image_field"], "question": self.opt["question_field"],
                                            "answer": self.opt["answer_field"], "modality": None}
        rows = read_annotations(source, self.opt["annotations"], {self.fields["image"], self.fields["question"], self.fields["answer"]})
        if self.opt["language"]:
            rows = [r for r in rows if r.get("q_lang", self.opt["language"]) == self.opt["language"]]
        self.by_image: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            self.by_image[str(r[self.fields["image"]])].append(r)

    def items(self) -> list[str]:
        return sorted(self.by_image)

    def _image_path(self, name: str):
        base = self.source.path / self.opt["images_dir"]
        for suffix in IMAGE_SUFFIXES:
            if (base / (name + suffix)).is_file():
                return base / (name + suffix)
        return base / name

    def process(self, item: str) -> Iterator[Record | Rejection]:
        qas = self.by_image[item]
        read = self.read_images(item, self._image_path(item))
        if isinstance(read, Rejection):
            yield read
            return
        (pixels,) = read
        modality = self.source.modality
        if modality == "auto":
            field = self.fields.get("modality")
            modality = SLAKE_MODALITY.get(str(qas[0].get(field, "")), "Other") if field else "Other"
        if modality not in MODALITIES:
            modality = "Other"
        messages = []
        for k, qa in enumerate(qas):
            q, a = str(qa[self.fields["question"]]).strip(), str(qa[self.fields["answer"]]).strip()
            if not q or not a:
                continue
            messages += [{"from": "human", "value": ("<image>\n" if not messages else "") + q}, {"from": "gpt", "value": a[:1].upper() + a[1:]}]
        if not messages:
            yield self.reject(item, "no_text", "no question with an answer")
            return
        group = self.patient_group(None, item)
        yield Record(id=self.record_id(item, "vqa"), family="understanding", task="vqa", **self.provenance(group, modality), input_images=[png_bytes(pixels)],
                     messages=messages, meta={"width": pixels.shape[1], "height": pixels.shape[0], "questions": len(messages) // 2})
