"""``kind: reports`` - images with their reports -> report generation and report-conditioned
text-to-image.

Example::

    - name: cxr-reports
      kind: reports
      path: /data/cxr
      modality: CXR
      options:
        table: reports.csv          # columns: image, findings, impression [, patient]  (.csv/.json/.jsonl)
        tasks: [report, t2i]

Report answers read ``Findings: ...\\nImpression: ...``; the text-to-image prompt is the impression
(or the findings when there is none).
"""

from __future__ import annotations

from typing import Iterator

from ..imaging import png_bytes
from ..schema import Record, Rejection
from .base import TableAdapter

REPORT_REQUEST = "<image>\nWrite the radiology report for this image."


class ReportsAdapter(TableAdapter):
    kind = "reports"
    options = {"table": "reports.csv", "tasks": ["report", "t2i"]}

    def columns(self) -> set[str]:
        return {"image", "findings", "impression"}

    def row_key(self, row: dict) -> str:
        return row["image"]

    def process(self, item: str) -> Iterator[Record | Rejection]:
        row = self.rows[item]
        findings, impression = (row.get("findings") or "").strip(), (row.get("impression") or "").strip()
        if not findings and not impression:
            yield self.reject(item, "no_text", "both findings and impression are empty")
            return
        read = self.read_images(item, self.source.path / item)
        if isinstance(read, Rejection):
            yield read
            return
        (pixels,) = read
        png = png_bytes(pixels)
        group = self.patient_group(row.get("patient"), item)
        base = dict(**self.provenance(group), meta={"width": pixels.shape[1], "height": pixels.shape[0]})
        report = "\n".join(p for p in (f"Findings: {findings}" if findings else "", f"Impression: {impression}" if impression else "") if p)
        if "report" in self.opt["tasks"]:
            yield Record(id=self.record_id(item, "report"), family="understanding", task="report", input_images=[png],
                         messages=[{"from": "human", "value": REPORT_REQUEST}, {"from": "gpt", "value": report}], **base)
        if "t2i" in self.opt["tasks"]:
            yield Record(id=self.record_id(item, "t2i"), family="generation", task="t2i", output_images=[png],
                         captions={"report": impression or findings}, **base)
