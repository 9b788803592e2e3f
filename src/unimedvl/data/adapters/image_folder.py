"""``kind: image_folder`` - labelled images (classification data) -> captions, VQA and text-to-image.

Example::

    - name: fundus-dr
      kind: image_folder
      path: /data/fundus            # images under this folder
      modality: CFP
      license: CC-BY-4.0
      options:
        labels: labels.csv          # columns: file, label [, patient]
        tasks: [caption, closed_vqa, open_vqa, t2i]   # also: modality_vqa, sr
        sr_factor: 4                # sr: the upscaling factor
        sr_degradation: kspace      # sr: kspace (greyscale central k-space crop) or bicubic

Closed VQA asks about the image's own label ("Yes.") and about another label of the source
("No."); open VQA asks for the finding; text-to-image prompts come from the caption templates;
``modality_vqa`` asks which kind of image it is; ``sr`` makes a 4x super-resolution pair of the
image (the same patient group, hence the same split, as its other records).
"""

from __future__ import annotations

from typing import Iterator

from .. import templates as T
from ..imaging import png_bytes, sr_pair
from ..schema import Record, Rejection
from .base import TableAdapter

TASKS = ("caption", "closed_vqa", "open_vqa", "t2i", "modality_vqa", "sr")
DEFAULT_TASKS = ["caption", "closed_vqa", "open_vqa", "t2i"]


class ImageFolderAdapter(TableAdapter):
    kind = "image_folder"
    table_option = "labels"
    options = {"labels": "labels.csv", "tasks": DEFAULT_TASKS, "sr_factor": 4, "sr_degradation": "kspace"}

    def __init__(self, source, ctx):
        super().__init__(source, ctx)
        bad = set(self.opt["tasks"]) - set(TASKS)
        if bad:
            raise ValueError(f"source {source.name!r}: unknown task(s) {sorted(bad)}; known: {list(TASKS)}")
        if self.opt["sr_degradation"] not in ("kspace", "bicubic"):
            raise ValueError(f"source {source.name!r}: sr_degradation must be kspace or bicubic, got {self.opt['sr_degradation']!r}")
        self.labels = sorted({r["label"].strip() for r in self.rows.values() if r["label"].strip()})

    def columns(self) -> set[str]:
        return {"file", "label"}

    def row_key(self, row: dict) -> str:
        return row["file"]

    def process(self, item: str) -> Iterator[Record | Rejection]:
        row = self.rows[item]
        label = row["label"].strip()
        if not label:
            yield self.reject(item, "no_label", "empty label in the label file")
            return
        image = self.read_row_image(item)
        if isinstance(image, Rejection):
            yield image
            return
        pixels, png = image.pixels, image.png
        mod = self.source.modality
        base = dict(**image.provenance, meta={**image.size, "label": label})
        tasks = self.opt["tasks"]
        caption = T.fill(T.pick(T.for_modality(T.CAPTION, T.MODALITY_CAPTION, mod), item), mod, label=label)
        if "caption" in tasks:
            yield Record(id=self.record_id(item, "caption"), family="understanding", task="caption", input_images=[png],
                         messages=[{"from": "human", "value": "<image>\nDescribe this image."}, {"from": "gpt", "value": caption}], **base)
        if "closed_vqa" in tasks:
            q = T.fill(T.pick(T.CLOSED_QUESTION, item), mod, label=label)
            msgs = [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": "Yes."}]
            others = [lab for lab in self.labels if lab != label]
            if others:
                other = others[int(self.record_id(item, "neg"), 16) % len(others)]
                msgs += [{"from": "human", "value": T.fill(T.pick(T.CLOSED_QUESTION, item + "#neg"), mod, label=other)},
                         {"from": "gpt", "value": "No."}]
            yield Record(id=self.record_id(item, "closed_vqa"), family="understanding", task="vqa", input_images=[png], messages=msgs, **base)
        if "open_vqa" in tasks:
            q = T.fill(T.pick(T.for_modality(T.OPEN_QUESTION, T.MODALITY_OPEN_QUESTION, mod), item), mod)
            yield Record(id=self.record_id(item, "open_vqa"), family="understanding", task="vqa", input_images=[png],
                         messages=[{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": label[:1].upper() + label[1:] + "."}], **base)
        if "t2i" in tasks:
            yield Record(id=self.record_id(item, "t2i"), family="generation", task="t2i", output_images=[png],
                         captions={"caption": caption, "prompt": T.fill(T.pick(T.GENERATION_PROMPT, item), mod, label=label)}, **base)
        if "modality_vqa" in tasks:
            yield Record(id=self.record_id(item, "modality_vqa"), family="understanding", task="vqa", input_images=[png],
                         messages=[{"from": "human", "value": "<image>\n" + T.pick(T.MODALITY_QUESTION, item)},
                                   {"from": "gpt", "value": T.fill(T.MODALITY_ANSWER, mod)}], **base)
        if "sr" in tasks:
            factor = int(self.opt["sr_factor"])
            low, target = sr_pair(pixels, factor, self.opt["sr_degradation"])
            yield Record(id=self.record_id(item, "sr"), family="interleaved", task="sr", input_images=[png_bytes(low)],
                         output_images=[png_bytes(target)], instruction=T.fill(T.pick(T.SR_INSTRUCTION, item), mod),
                         response=T.fill(T.SR_RESPONSE, mod),
                         **{**base, "meta": {**base["meta"], "sr_factor": factor, "degradation": self.opt["sr_degradation"]}})
