"""``kind: segmentation`` - images with masks -> findings text (structure, location, size) and
interleaved prompt segmentation (image + "segment the X" -> mask + short text).

Example::

    - name: kidney-tumours
      kind: segmentation
      path: /data/kits
      modality: CT
      options:
        table: masks.csv            # columns: image, mask, structure [, patient]
        tasks: [findings, seg]

Any non-zero mask pixel belongs to the structure.  Location is the centroid's third of the image
(upper/middle/lower x left/central/right, in image coordinates), size the mask's share of the
image and its bounding box.  Empty masks are rejected.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..imaging import as_rgb_u8, limit_size, png_bytes
from ..schema import Record, Rejection
from .base import TableAdapter


def describe_mask(mask: np.ndarray, structure: str) -> tuple[str, dict]:
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() / h, xs.mean() / w
    vertical = "upper" if cy < 1 / 3 else "lower" if cy > 2 / 3 else "middle"
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "central"
    share = mask.mean()
    size = "small" if share < 0.02 else "large" if share > 0.15 else "medium-sized"
    bw, bh = int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)
    location = "central" if (vertical, horizontal) == ("middle", "central") else f"{vertical} {horizontal}"
    text = (f"A {size} {structure} is seen in the {location} part of the image, covering about {share:.1%} of it "
            f"(bounding box {bw} x {bh} pixels).")
    return text, {"share": round(float(share), 4), "bbox": [int(xs.min()), int(ys.min()), bw, bh], "location": location}


class SegmentationAdapter(TableAdapter):
    kind = "segmentation"
    options = {"table": "masks.csv", "tasks": ["findings", "seg"]}

    def columns(self) -> set[str]:
        return {"image", "mask", "structure"}

    def row_key(self, row: dict) -> str:
        return f"{row['image']}|{row['structure']}"

    def process(self, item: str) -> Iterator[Record | Rejection]:
        row = self.rows[item]
        structure = row["structure"].strip()
        read = self.read_images(item, self.source.path / row["image"], self.source.path / row["mask"], resize=False)
        if isinstance(read, Rejection):
            yield read
            return
        image_px, mask_px_raw = read
        if image_px.shape[:2] != mask_px_raw.shape[:2]:
            yield self.reject(item, "size_mismatch", "the mask and the image differ in size")
            return
        mask = mask_px_raw.max(axis=2) > 0
        if not mask.any():
            yield self.reject(item, "empty_mask", f"no pixel of {structure!r} in the mask")
            return
        text, geometry = describe_mask(mask, structure)
        pixels = limit_size(image_px, self.ctx.max_side)
        mask_px = limit_size(as_rgb_u8(np.where(mask, 255, 0).astype(np.uint8)), self.ctx.max_side)
        mask_px = np.where(mask_px >= 128, 255, 0).astype(np.uint8)  # keep it binary after resizing
        png = png_bytes(pixels)
        group = self.patient_group(row.get("patient"), row["image"])
        base = dict(**self.provenance(group), meta={"width": pixels.shape[1], "height": pixels.shape[0], "structure": structure, **geometry})
        if "findings" in self.opt["tasks"]:
            yield Record(id=self.record_id(item, "findings"), family="understanding", task="caption", input_images=[png],
                         messages=[{"from": "human", "value": f"<image>\nDescribe the {structure} in this image."}, {"from": "gpt", "value": text}], **base)
        if "seg" in self.opt["tasks"]:
            yield Record(id=self.record_id(item, "seg"), family="interleaved", task="seg", input_images=[png], output_images=[png_bytes(mask_px)],
                         instruction=f"Segment the {structure} in this image.", response=f"The {structure} is shown in white.", **base)
