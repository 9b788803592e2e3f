"""``kind: super_resolution`` - high-resolution 2D images -> 4x super-resolution pairs.

Example::

    - name: knee-mri-sr
      kind: super_resolution
      path: /data/knee_slices      # any images below (PNG/TIFF/DICOM...)
      modality: MRI
      options:
        factor: 4
        degradation: kspace        # kspace (MRI: central k-space crop) or bicubic (anti-aliased)

The input is the low-resolution image at 1/factor of the size (the model's VAE accepts 32-px
sides); the target is the original, cropped to a multiple of the factor.
"""

from __future__ import annotations

from typing import Iterator


from .. import templates as T
from ...formats.medical_io import IMAGE_SUFFIXES
from ..imaging import png_bytes, sr_pair
from ..schema import Record, Rejection
from .base import Adapter, file_items


class SuperResolutionAdapter(Adapter):
    kind = "super_resolution"
    options = {"factor": 4, "degradation": "kspace"}

    def __init__(self, source, ctx):
        super().__init__(source, ctx)
        if self.opt["degradation"] not in ("kspace", "bicubic"):
            raise ValueError(f"source {source.name!r}: degradation must be kspace or bicubic")

    def items(self) -> list[str]:
        return file_items(self.source.path, IMAGE_SUFFIXES)

    def process(self, item: str) -> Iterator[Record | Rejection]:
        read = self.read_images(item, self.path_of(item))
        if isinstance(read, Rejection):
            yield read
            return
        f = int(self.opt["factor"])
        (hr,) = read
        lr, hr = sr_pair(hr, f, self.opt["degradation"])
        h, w = hr.shape[:2]
        group = self.patient_group(None, item)
        yield Record(
            id=self.record_id(item, "sr"), family="interleaved", task="sr", **self.provenance(group),
            input_images=[png_bytes(lr)], output_images=[png_bytes(hr)],
            instruction=T.fill(T.pick(T.SR_INSTRUCTION, item), self.source.modality), response=T.fill(T.SR_RESPONSE, self.source.modality),
            meta={"width": w, "height": h, "sr_factor": f, "degradation": self.opt["degradation"]},
        )
