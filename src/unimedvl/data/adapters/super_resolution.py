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

import numpy as np
from PIL import Image

from .. import templates as T
from ..imaging import as_rgb_u8, kspace_downsample, png_bytes
from ..schema import Record, Rejection
from .base import Adapter, files_under

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".dcm", ".nii", ".nii.gz")


class SuperResolutionAdapter(Adapter):
    kind = "super_resolution"
    options = {"factor": 4, "degradation": "kspace"}

    def __init__(self, source, ctx):
        super().__init__(source, ctx)
        if self.opt["degradation"] not in ("kspace", "bicubic"):
            raise ValueError(f"source {source.name!r}: degradation must be kspace or bicubic")

    def items(self) -> list[str]:
        root = self.source.path
        return [str(p.relative_to(root)) if root.is_dir() else p.name for p in files_under(root, IMAGE_SUFFIXES)]

    def process(self, item: str) -> Iterator[Record | Rejection]:
        path = self.source.path / item if self.source.path.is_dir() else self.source.path
        read = self.read_images(item, path)
        if isinstance(read, Rejection):
            yield read
            return
        f = int(self.opt["factor"])
        (hr,) = read
        h, w = (hr.shape[0] // f) * f, (hr.shape[1] // f) * f
        hr = hr[:h, :w]
        if self.opt["degradation"] == "kspace":
            lr = as_rgb_u8(kspace_downsample(hr.mean(axis=2).round().astype(np.uint8), f))
            hr = as_rgb_u8(hr.mean(axis=2).round().astype(np.uint8))
        else:
            lr = np.asarray(Image.fromarray(hr).resize((w // f, h // f), Image.BICUBIC, reducing_gap=2.0))
        group = self.patient_group(None, item)
        yield Record(
            id=self.record_id(item, "sr"), family="interleaved", task="sr", **self.provenance(group),
            input_images=[png_bytes(lr)], output_images=[png_bytes(hr)],
            instruction=T.fill(T.pick(T.SR_INSTRUCTION, item), self.source.modality), response=T.fill(T.SR_RESPONSE, self.source.modality),
            meta={"width": w, "height": h, "sr_factor": f, "degradation": self.opt["degradation"]},
        )
