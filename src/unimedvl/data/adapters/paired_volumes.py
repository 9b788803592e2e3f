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

import numpy as np

from ...medical_io import NIFTI_AXES, MedicalImageError, load_nifti_volume, nifti_plane
from .. import templates as T
from ..imaging import as_rgb_u8, limit_size, png_bytes
from ..schema import Record, Rejection
from ._tables import read_table
from .base import Adapter
from .nifti import select_slices


class PairedVolumesAdapter(Adapter):
    kind = "paired_volumes"
    options = {"table": "subjects.csv", "pairs": [], "names": {}, "axis": "axial", "slices_per_volume": 4,
               "min_foreground": 0.15, "edge_fraction": 0.1}

    def __init__(self, source, ctx):
        super().__init__(source, ctx)
        pairs = self.opt["pairs"]
        if not pairs or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
            raise ValueError(f"source {source.name!r}: options.pairs must be a list of [from, to] contrast names")
        contrasts = {c for p in pairs for c in p}
        rows = read_table(source.path / self.opt["table"], {"subject", *contrasts}, f"source {source.name!r}")
        self.rows = {str(r["subject"]): r for r in rows}

    def items(self) -> list[str]:
        return sorted(self.rows)

    def process(self, item: str) -> Iterator[Record | Rejection]:
        row = self.rows[item]
        volumes = {}
        try:
            for contrast in sorted({c for p in self.opt["pairs"] for c in p}):
                volumes[contrast] = load_nifti_volume(self.source.path / row[contrast])[0]
        except MedicalImageError as e:
            yield self.reject(item, "unreadable", str(e).replace(str(self.source.path), "<source>"))
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
            grey = np.round(np.clip((plane - lo) / (hi - lo) if hi > lo else plane * 0, 0, 1) * 255).astype(np.uint8)
            return limit_size(as_rgb_u8(grey), self.ctx.max_side)

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
