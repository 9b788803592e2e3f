"""Turn what users pass as an image - a path, a PIL image, an array, a :class:`MedicalImage` - into
an 8-bit RGB PIL image, reading DICOM and NIfTI with the options of :mod:`unimedvl.formats.medical_io`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from ..image_transforms import to_rgb
from ..formats.medical_io import MedicalImage, MedicalImageError, is_nifti, read_medical_image

ImageInput = Union[str, Path, Image.Image, np.ndarray, MedicalImage]


@dataclass(frozen=True)
class ImageReadOptions:
    """How to read DICOM and NIfTI inputs (ignored for other formats)."""

    window: str | tuple[float, float] | None = None  # DICOM: preset name, (center, width) or the file's own
    frame: int = 0  # DICOM multi-frame: which frame
    axis: str = "axial"  # NIfTI: sagittal, coronal or axial
    slice_index: int | None = None  # NIfTI: slice along ``axis`` (default: the middle one)
    percentiles: tuple[float, float] = (0.5, 99.5)  # NIfTI: intensity range mapped to 0..255

    def reader_kwargs(self, path: Path) -> dict:
        """The options that differ from the defaults, checked against the file's kind."""
        default = ImageReadOptions()
        volume = {k: getattr(self, k) for k in ("axis", "slice_index", "percentiles") if getattr(self, k) != getattr(default, k)}
        dicom = {k: getattr(self, k) for k in ("window", "frame") if getattr(self, k) != getattr(default, k)}
        if is_nifti(path):
            if dicom:
                raise MedicalImageError(f"{path}: {sorted(dicom)} apply to DICOM files, not NIfTI volumes")
            return volume
        if volume:
            raise MedicalImageError(f"{path}: {sorted(volume)} apply to NIfTI volumes only")
        return dicom


def load_image_with_meta(image: ImageInput, options: ImageReadOptions = ImageReadOptions()) -> tuple[Image.Image, dict]:
    """An 8-bit RGB PIL image from any supported input, with the reader's metadata (modality,
    window, slice...; empty for PIL images and arrays)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise MedicalImageError(f"{path}: no such image file")
        image = read_medical_image(path, **options.reader_kwargs(path))
    if isinstance(image, MedicalImage):
        return image.to_pil(), dict(image.meta)
    if isinstance(image, Image.Image):
        return to_rgb(image), {}
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise MedicalImageError(
                f"an image array must be uint8 (got {image.dtype}); read 16-bit or float data with unimedvl.formats.medical_io"
            )
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4)):
            return to_rgb(Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[2] == 1 else image)), {}
        raise MedicalImageError(f"an image array must be HxW or HxWx{{1,3,4}}, got shape {image.shape}")
    raise TypeError(f"unsupported image input of type {type(image).__name__}")


def load_image(image: ImageInput, options: ImageReadOptions = ImageReadOptions()) -> Image.Image:
    """An 8-bit RGB PIL image from any supported input."""
    return load_image_with_meta(image, options)[0]
