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
        image = self.read_row_image(item)
        if isinstance(image, Rejection):
            yield image
            return
        png = image.png
        base = dict(**image.provenance, meta=image.size)
        report = "\n".join(p for p in (f"Findings: {findings}" if findings else "", f"Impression: {impression}" if impression else "") if p)
        if "report" in self.opt["tasks"]:
            yield Record(id=self.record_id(item, "report"), family="understanding", task="report", input_images=[png],
                         messages=[{"from": "human", "value": REPORT_REQUEST}, {"from": "gpt", "value": report}], **base)
        if "t2i" in self.opt["tasks"]:
            yield Record(id=self.record_id(item, "t2i"), family="generation", task="t2i", output_images=[png],
                         captions={"report": impression or findings}, **base)
