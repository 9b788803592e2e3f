"""``kind: paired_images`` - registered input/target pairs (H&E -> IHC tiles, T2 -> FLAIR slices,
MR -> CT) -> interleaved records.

Example::

    - name: bci-her2
      kind: paired_images
      path: /data/bci
      modality: HIS
      options:
        pairs: pairs.csv            # columns: input, target, instruction [, response] [, patient]
        task: ihc_staining          # ihc_staining, cross_modal, sr, counterfactual, seg, ...

Both images are read like any input (DICOM/NIfTI/PNG...), converted to 8-bit RGB and stored at
<= ``max_side``; pairs whose images differ in size are rejected (registration is the source's job).
"""

from __future__ import annotations

from typing import Iterator

from ..imaging import limit_size, png_bytes
from ..schema import Record, Rejection
from .base import TableAdapter


class PairedImagesAdapter(TableAdapter):
    kind = "paired_images"
    table_option = "pairs"
    options = {"pairs": "pairs.csv", "task": "cross_modal"}

    def columns(self) -> set[str]:
        return {"input", "target", "instruction"}

    def row_key(self, row: dict) -> str:
        return f"{row['input']}->{row['target']}"

    def process(self, item: str) -> Iterator[Record | Rejection]:
        row = self.rows[item]
        read = self.read_images(item, self.source.path / row["input"], self.source.path / row["target"], resize=False)
        if isinstance(read, Rejection):
            yield read
            return
        src, dst = read
        if src.shape[:2] != dst.shape[:2]:
            yield self.reject(item, "size_mismatch", f"input {src.shape[1]}x{src.shape[0]} vs target {dst.shape[1]}x{dst.shape[0]}")
            return
        a, b = limit_size(src, self.ctx.max_side), limit_size(dst, self.ctx.max_side)
        group = self.patient_group(row.get("patient"), item)
        yield Record(
            id=self.record_id(item, self.opt["task"]), family="interleaved", task=self.opt["task"], **self.provenance(group),
            input_images=[png_bytes(a)], output_images=[png_bytes(b)], instruction=row["instruction"].strip(),
            response=(row.get("response") or "").strip(), meta={"width": b.shape[1], "height": b.shape[0]},
        )
