"""``kind: paired_volumes`` - co-registered volumes of one subject (BraTS T1/T2/FLAIR, SynthRAD
MR/CT) -> cross-modal synthesis pairs: the same slice index of contrast A -> contrast B.

Example::

    - name: brats
      kind: paired_volumes
      path: /data/brats
      modality: MRI
      options:
        table: subjects.csv        # columns: subject, and one column per contrast with its file
        pairs: [[t2w, t2f], [t2f, t2w]]
        names: {t2w: T2-weighted, t2f: FLAIR}
        slices_per_volume: 4

Slices are chosen on the source contrast as for ``kind: nifti`` (foreground coverage, away from the
ends) and each contrast is scaled between its own foreground percentiles (never one scaling
across contrasts).  Volumes of different shapes after reorientation are rejected as not registered.
"""

from __future__ import annotations

from typing import Iterator


from ...formats.medical_io import NIFTI_AXES, MedicalImageError, load_nifti_volume, nifti_plane, scale_to_u8
from .. import templates as T
from ..imaging import as_rgb_u8, limit_size, png_bytes
from ..schema import Record, Rejection
from .base import TableAdapter
from .nifti import select_slices


class PairedVolumesAdapter(TableAdapter):
    kind = "paired_volumes"
    options = {"table": "subjects.csv", "pairs": [], "names": {}, "axis": "axial", "slices_per_volume": 4,
               "min_foreground": 0.15, "edge_fraction": 0.1}

    def columns(self) -> set[str]:
        pairs = self.opt["pairs"]
        if not pairs or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
            raise ValueError(f"source {self.source.name!r}: options.pairs must be a list of [from, to] contrast names")
        return {"subject", *self.contrasts()}

    def contrasts(self) -> list[str]:
        return sorted({c for p in self.opt["pairs"] for c in p})

    def row_key(self, row: dict) -> str:
        return str(row["subject"])

    def process(self, item: str) -> Iterator[Record | Rejection]:
        row = self.rows[item]
        volumes = {}
        paths = {c: self.source.path / row[c] for c in self.contrasts()}
        try:
            for contrast, path in paths.items():
                volumes[contrast] = load_nifti_volume(path)[0]
        except MedicalImageError as e:
            yield self.reject(item, "unreadable", str(e), paths=paths.values())
            return
        shapes = {c: v.shape for c, v in volumes.items()}
        if len(set(shapes.values())) != 1:
            yield self.reject(item, "not_registered", f"volume shapes differ: {shapes}")
            return
        axis = NIFTI_AXES[self.opt["axis"]]
        count, min_fg, edge = int(self.opt["slices_per_volume"]), self.opt["min_foreground"], self.opt["edge_fraction"]
        selections = {c: select_slices(v, axis, count, min_fg, edge) for c, v in volumes.items()}
        scales = {c: sel[1:] for c, sel in selections.items()}  # each contrast scaled on its own
        group = self.patient_group(item, item)
        names = self.opt["names"]

        def slice_u8(contrast, index):
            lo, hi = scales[contrast]
            plane = nifti_plane(volumes[contrast], axis, index)
            return limit_size(as_rgb_u8(scale_to_u8(plane, lo, hi)), self.ctx.max_side)

        for src, dst in self.opt["pairs"]:
            indices = selections[src][0]  # slices chosen on the source contrast
            for index in indices:
                key = f"{item}#{src}->{dst}@{index}"
                a, b = slice_u8(src, index), slice_u8(dst, index)
                src_name, dst_name = names.get(src, src), names.get(dst, dst)
                yield Record(
                    id=self.record_id(key, "cross_modal"), family="interleaved", task="cross_modal", **self.provenance(group),
                    input_images=[png_bytes(a)], output_images=[png_bytes(b)],
                    instruction=T.fill(T.TRANSLATION_INSTRUCTION, self.source.modality, src=src_name, dst=dst_name),
                    response=T.fill(T.TRANSLATION_RESPONSE, self.source.modality, dst=dst_name),
                    meta={"width": b.shape[1], "height": b.shape[0], "from": src, "to": dst, "slice_index": int(index), "axis": self.opt["axis"]},
                )
