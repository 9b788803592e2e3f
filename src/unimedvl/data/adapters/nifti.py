"""``kind: nifti`` - NIfTI volumes -> 8-bit slices with captions and text-to-image prompts, and
4x super-resolution pairs made by k-space truncation (MRI).

Example::

    - name: brain-mri
      kind: nifti
      path: /data/brain            # *.nii / *.nii.gz anywhere below
      modality: MRI
      options:
        description: T1-weighted brain MRI
        axis: axial
        slices_per_volume: 4       # evenly spaced among the usable slices
        min_foreground: 0.15       # skip slices whose foreground covers less than this
        edge_fraction: 0.1         # and the outermost 10% of slices at each end
        tasks: [caption, t2i, sr]     # also: modality_vqa
        crop_foreground: false        # crop every slice to the volume's foreground box (5% margin)

Slice selection: foreground = voxels above 10% of the volume's upper percentile.  Intensities are
scaled per volume between the 0.5th and 99.5th percentiles of its foreground voxels (DATA.md 5.3).
Super-resolution: input = the central quarter of the slice's k-space inverted at a quarter of the
size (a low-resolution acquisition), target = the slice; both stored as images.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ...formats.medical_io import NIFTI_AXES, NIFTI_SUFFIXES, MedicalImageError, load_nifti_volume, nifti_plane, scale_to_u8
from .. import templates as T
from ..imaging import as_rgb_u8, evenly_spaced, kspace_pair, limit_size, png_bytes
from ..schema import Record, Rejection
from .base import Adapter, file_items

TASKS = ("caption", "t2i", "sr", "modality_vqa")


def foreground_box(data: np.ndarray, axis: int, margin: float = 0.05) -> tuple[slice, ...]:
    """Index of the volume cropped, in the two in-plane axes, to the bounding box of its foreground
    (voxels above a tenth of the 99.5th percentile) over all slices, with ``margin`` of each side."""
    hi = np.percentile(data, 99.5)
    fg = data > 0.1 * hi if hi > 0 else data > data.min()
    box = [slice(None)] * 3
    if not fg.any():
        return tuple(box)
    for a in range(3):
        if a == axis:
            continue
        occupied = np.flatnonzero(fg.any(axis=tuple(b for b in range(3) if b != a)))
        pad = int(round(margin * data.shape[a]))
        box[a] = slice(max(0, int(occupied[0]) - pad), min(data.shape[a], int(occupied[-1]) + 1 + pad))
    return tuple(box)


def select_slices(data: np.ndarray, axis: int, count: int, min_foreground: float, edge_fraction: float) -> tuple[list[int], float, float]:
    """Up to ``count`` evenly spaced slice indices along ``axis`` whose foreground covers at least
    ``min_foreground``, away from the outer ``edge_fraction`` at each end; plus the volume's
    foreground 0.5/99.5 percentiles for scaling."""
    hi_all = np.percentile(data, 99.5)
    fg = data > 0.1 * hi_all if hi_all > 0 else data > data.min()
    n = data.shape[axis]
    edge = int(n * edge_fraction)
    other = tuple(a for a in range(3) if a != axis)
    coverage = fg.mean(axis=other)
    usable = [i for i in range(edge, n - edge) if coverage[i] >= min_foreground]
    if len(usable) > count:
        usable = evenly_spaced(usable, count)
    values = data[fg] if fg.any() else data.ravel()
    lo, hi = np.percentile(values, (0.5, 99.5))
    return usable, float(lo), float(hi)


class NiftiAdapter(Adapter):
    kind = "nifti"
    options = {"description": "", "axis": "axial", "slices_per_volume": 4, "min_foreground": 0.15, "edge_fraction": 0.1,
               "tasks": ["caption", "t2i"], "sr_factor": 4, "volume": 0, "crop_foreground": False}

    def __init__(self, source, ctx):
        super().__init__(source, ctx)
        if self.opt["axis"] not in NIFTI_AXES:
            raise ValueError(f"source {source.name!r}: axis must be one of {list(NIFTI_AXES)}")

    def items(self) -> list[str]:
        return file_items(self.source.path, NIFTI_SUFFIXES)

    def process(self, item: str) -> Iterator[Record | Rejection]:
        path = self.path_of(item)
        try:
            data, zooms = load_nifti_volume(path, int(self.opt["volume"]))
        except MedicalImageError as e:
            yield self.reject(item, "unreadable", str(e), paths=[path])
            return
        axis = NIFTI_AXES[self.opt["axis"]]
        if self.opt["crop_foreground"]:  # same field of view for volumes with more or less background
            data = data[foreground_box(data, axis)]
        slices, lo, hi = select_slices(data, axis, int(self.opt["slices_per_volume"]), self.opt["min_foreground"], self.opt["edge_fraction"])
        if not slices:
            yield self.reject(item, "no_usable_slice", f"no slice covers {self.opt['min_foreground']:.0%} foreground")
            return
        group = self.patient_group(None, item)
        mod, tasks = self.source.modality, self.opt["tasks"]
        what = self.opt["description"] or T.MODALITY_NAMES[mod]
        for index in slices:
            key = f"{item}#{self.opt['axis']}{index}"
            plane = nifti_plane(data, axis, index)
            pixels = limit_size(as_rgb_u8(scale_to_u8(plane, lo, hi)), self.ctx.max_side)
            png = png_bytes(pixels)
            caption = f"An {self.opt['axis']} slice of a {what}."
            meta = {"width": pixels.shape[1], "height": pixels.shape[0], "axis": self.opt["axis"], "slice_index": index,
                    "num_slices": int(data.shape[axis]), "voxel_size_mm": zooms}
            base = dict(**self.provenance(group), meta=meta)
            if "caption" in tasks:
                yield Record(id=self.record_id(key, "caption"), family="understanding", task="caption", input_images=[png],
                             messages=[{"from": "human", "value": "<image>\nDescribe this image."}, {"from": "gpt", "value": caption}], **base)
            if "modality_vqa" in tasks:
                yield Record(id=self.record_id(key, "modality_vqa"), family="understanding", task="vqa", input_images=[png],
                             messages=[{"from": "human", "value": "<image>\n" + T.pick(T.MODALITY_QUESTION, key)},
                                       {"from": "gpt", "value": T.fill(T.MODALITY_ANSWER, mod)}], **base)
            if "t2i" in tasks:
                yield Record(id=self.record_id(key, "t2i"), family="generation", task="t2i", output_images=[png],
                             captions={"caption": caption, "prompt": f"Generate an {self.opt['axis']} slice of a {what}."}, **base)
            if "sr" in tasks:
                factor = int(self.opt["sr_factor"])
                low, target = kspace_pair(pixels[..., 0], factor)
                yield Record(id=self.record_id(key, "sr"), family="interleaved", task="sr",
                             input_images=[png_bytes(as_rgb_u8(low))], output_images=[png_bytes(as_rgb_u8(target))],
                             instruction=T.fill(T.pick(T.SR_INSTRUCTION, key), mod), response=T.fill(T.SR_RESPONSE, mod),
                             **{**base, "meta": {**meta, "sr_factor": factor, "degradation": "central k-space crop"}})
