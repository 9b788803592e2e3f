"""``kind: image_folder`` - labelled images (classification data) -> captions, VQA and text-to-image.

Example::

    - name: fundus-dr
      kind: image_folder
      path: /data/fundus            # images under this folder
      modality: CFP
      license: CC-BY-4.0
      options:
        labels: labels.csv          # columns: file, label [, patient]
        tasks: [caption, closed_vqa, open_vqa, t2i]

Closed VQA asks about the image's own label ("Yes.") and about another label of the source
("No."); open VQA asks for the finding; text-to-image prompts come from the caption templates.
"""

from __future__ import annotations

from typing import Iterator

from .. import templates as T
from ..imaging import png_bytes
from ..schema import Record, Rejection
from .base import TableAdapter

TASKS = ("caption", "closed_vqa", "open_vqa", "t2i")


class ImageFolderAdapter(TableAdapter):
    kind = "image_folder"
    table_option = "labels"
    options = {"labels": "labels.csv", "tasks": list(TASKS)}

    def __init__(self, source, ctx):
        super().__init__(source, ctx)
        bad = set(self.opt["tasks"]) - set(TASKS)
        if bad:
            raise ValueError(f"source {source.name!r}: unknown task(s) {sorted(bad)}; known: {list(TASKS)}")
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
        read = self.read_images(item, self.source.path / item)
        if isinstance(read, Rejection):
            yield read
            return
        (pixels,) = read
        png = png_bytes(pixels)
        group = self.patient_group(row.get("patient"), item)
        mod = self.source.modality
        base = dict(**self.provenance(group), meta={"width": pixels.shape[1], "height": pixels.shape[0], "label": label})
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
