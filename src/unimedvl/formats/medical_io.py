"""Read medical images into the 8-bit RGB arrays the model sees, with metadata but no identifiers.

* DICOM (pydicom): modality LUT / rescale slope and intercept, then a window - the file's own, a
  named preset or explicit ``(center, width)`` - with the DICOM linear VOI function
  (PS3.3 C.11.2.1.2); MONOCHROME1 is inverted after windowing; one frame of a multi-frame object.
* NIfTI (nibabel): reoriented to the closest canonical (RAS+) orientation, one slice along a chosen
  axis shown with superior/anterior at the top (neurological convention: the patient's right is on
  the image's right), intensities scaled between volume percentiles.
* PNG / TIFF / JPEG, 8 or 16 bit: 16-bit data is scaled by its own range, never clipped at 255.

Every reader returns a :class:`MedicalImage`; every failure is a :class:`MedicalImageError` that
names the file and what was expected.  Metadata never carries patient identifiers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# (center, width) in Hounsfield units for CT.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
}
NIFTI_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
IMAGE_SUFFIXES = RASTER_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES  # every file read_medical_image takes by name


def is_nifti(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def is_dicom(path: str | Path) -> bool:
    """A DICOM file by its suffix or, without one, by the ``DICM`` preamble."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


class MedicalImageError(ValueError):
    """A medical image cannot be read as asked; the message names the file."""


@dataclass
class MedicalImage:
    pixels: np.ndarray  # [H, W, 3] uint8, what the model sees
    meta: dict[str, Any] = field(default_factory=dict)  # modality, window, slice... never identifiers

    def to_pil(self) -> Image.Image:
        return Image.fromarray(self.pixels)


def scale_to_u8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``values`` mapped from ``[lo, hi]`` to 0..255 (clipped, rounded); all 0 when ``hi <= lo``."""
    scaled = np.zeros(values.shape) if hi <= lo else (values - lo) / (hi - lo)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def _u8_to_rgb(gray_u8: np.ndarray) -> np.ndarray:
    return np.repeat(gray_u8[:, :, None], 3, axis=2)


def _gray_to_rgb(gray01: np.ndarray) -> np.ndarray:
    return _u8_to_rgb(scale_to_u8(gray01, 0.0, 1.0))


def resolve_window(window: str | tuple[float, float] | None, ds=None) -> tuple[tuple[float, float] | None, str]:
    """``(center, width)`` and where it came from: a preset name, explicit values, or the file."""
    if isinstance(window, str):
        key = window.lower()
        if key not in WINDOW_PRESETS:
            raise MedicalImageError(f"unknown window preset {window!r}; known: {', '.join(WINDOW_PRESETS)}")
        return WINDOW_PRESETS[key], f"preset:{key}"
    if window is not None:
        center, width = (float(v) for v in window)
        if width < 1:
            raise MedicalImageError(f"window width must be >= 1, got {width}")
        return (center, width), "explicit"
    if ds is not None and "WindowCenter" in ds and "WindowWidth" in ds:
        try:  # multi-valued windows: the first is the default one
            return (_first_value(ds.WindowCenter), _first_value(ds.WindowWidth)), "file"
        except (TypeError, ValueError, IndexError):
            pass
    return None, "min-max"


def _first_value(v) -> float:
    return float(v[0]) if hasattr(v, "__len__") and not isinstance(v, (str, bytes)) else float(v)


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear VOI function, output in [0, 1]."""
    y = ((values - (center - 0.5)) / (width - 1.0)) + 0.5
    return np.clip(y, 0.0, 1.0)


def _minmax(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    return np.zeros_like(values, dtype=np.float64) if hi <= lo else (values - lo) / (hi - lo)


# ---- DICOM -----------------------------------------------------------------------------------


def read_dicom(path: str | Path, window: str | tuple[float, float] | None = None, frame: int = 0, dataset=None) -> MedicalImage:
    """One frame of a DICOM file as 8-bit RGB.  ``window``: ``None`` (the file's, else min-max), a
    preset name (:data:`WINDOW_PRESETS`) or ``(center, width)`` in modality units (HU for CT).
    ``dataset``: the file already read with ``pydicom.dcmread`` (it is then not read again)."""
    from pydicom.pixels import apply_modality_lut

    path = Path(path)
    ds = dataset if dataset is not None else read_dicom_dataset(path)
    if "PixelData" not in ds:
        raise MedicalImageError(f"{path}: the DICOM object has no pixel data (PixelData element missing)")
    try:
        arr = ds.pixel_array
    except Exception as e:  # truncated data, missing decoder plugin, ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise MedicalImageError(f"{path}: cannot decode pixel data (transfer syntax {syntax}): {e}") from e
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    samples = int(ds.get("SamplesPerPixel", 1))
    if n_frames > 1:
        if not 0 <= frame < n_frames:
            raise MedicalImageError(f"{path}: frame {frame} requested but the file has {n_frames} frames (0..{n_frames - 1})")
        arr = arr[frame]
    elif frame != 0:
        raise MedicalImageError(f"{path}: frame {frame} requested but the file has a single frame")
    meta: dict[str, Any] = {
        "format": "dicom",
        "modality": str(ds.get("Modality", "")),
        "photometric_interpretation": photometric,
        "frame": frame,
        "num_frames": n_frames,
        "rows": int(arr.shape[0]),
        "columns": int(arr.shape[1]),
    }
    if "PixelSpacing" in ds:
        meta["pixel_spacing_mm"] = [float(v) for v in ds.PixelSpacing]
    if samples == 3:  # colour (ultrasound, photographs): pydicom already returns RGB
        meta["window"] = None
        rgb = arr if arr.dtype == np.uint8 else np.round(_minmax(arr.astype(np.float64)) * 255).astype(np.uint8)
        return MedicalImage(np.ascontiguousarray(rgb), meta)

    values = apply_modality_lut(arr, ds).astype(np.float64)
    win, source = resolve_window(window, ds)
    gray = _minmax(values) if win is None else apply_window(values, *win)
    if photometric == "MONOCHROME1":  # low values are bright: invert after windowing
        gray = 1.0 - gray
    meta["window"] = None if win is None else {"center": win[0], "width": win[1], "source": source}
    return MedicalImage(_gray_to_rgb(gray), meta)


def read_dicom_dataset(path: str | Path):
    """``pydicom.dcmread`` of a whole file (pixel data decoded only when used), with a
    :class:`MedicalImageError` naming the file when it is not DICOM."""
    import pydicom

    try:
        return pydicom.dcmread(str(path))
    except Exception as e:  # pydicom raises many types for damaged files
        raise MedicalImageError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e})") from e


# ---- NIfTI -----------------------------------------------------------------------------------


def load_nifti_volume(path: str | Path, volume: int = 0) -> tuple[np.ndarray, list[float]]:
    """A NIfTI volume reoriented to the closest canonical (RAS+) frame, as float64 ``[x, y, z]``
    (scl_slope/inter applied), with its voxel size in mm.  NaN/infinite voxels are an error."""
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(img.dataobj, dtype=np.float64)
    except Exception as e:
        raise MedicalImageError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    if data.ndim == 4:
        if not 0 <= volume < data.shape[3]:
            raise MedicalImageError(f"{path}: volume {volume} requested but the file has {data.shape[3]} volumes")
        data = data[..., volume]
    if data.ndim != 3:
        raise MedicalImageError(f"{path}: expected a 3D (or 4D) volume, got shape {list(data.shape)}")
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise MedicalImageError(f"{path}: the volume contains {bad} NaN/infinite voxels")
    return data, [float(v) for v in img.header.get_zooms()[:3]]


def nifti_plane(data: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Slice ``index`` along RAS voxel ``axis``, rows from superior/anterior (top) down."""
    return np.take(data, index, axis=axis).T[::-1, :]


def read_nifti(
    path: str | Path,
    axis: str | int = "axial",
    slice_index: int | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    volume: int = 0,
) -> MedicalImage:
    """One slice of a NIfTI volume in canonical (RAS+) orientation as 8-bit RGB.

    ``axis``: ``axial``/``coronal``/``sagittal`` or 2/1/0 in RAS voxel axes; ``slice_index``
    defaults to the middle slice; intensities are scaled between the volume's ``percentiles``.
    """
    path = Path(path)
    data, zooms = load_nifti_volume(path, volume)
    ax = NIFTI_AXES.get(axis, axis) if isinstance(axis, str) else axis
    if ax not in (0, 1, 2):
        raise MedicalImageError(f"{path}: axis must be one of {list(NIFTI_AXES)} or 0/1/2, got {axis!r}")
    n = data.shape[ax]
    index = n // 2 if slice_index is None else slice_index
    if not 0 <= index < n:
        raise MedicalImageError(f"{path}: slice {index} requested along axis {ax} of {n} slices")
    plane = nifti_plane(data, ax, index)
    lo, hi = np.percentile(data, percentiles)
    meta = {
        "format": "nifti",
        "orientation": "RAS",
        "axis": ax,
        "slice_index": int(index),
        "num_slices": int(n),
        "percentiles": list(percentiles),
        "intensity_range": [float(lo), float(hi)],
        "voxel_size_mm": zooms,
    }
    return MedicalImage(_u8_to_rgb(scale_to_u8(plane, lo, hi)), meta)


# ---- ordinary images -------------------------------------------------------------------------


EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"}


def read_raster(path: str | Path) -> MedicalImage:
    """PNG / TIFF / JPEG.  8-bit images (grey, palette, RGB, with or without alpha) are converted to
    RGB as they are; deeper data (16-bit, 32-bit, float) is scaled from its own min..max to 0..255,
    never clipped at 255."""
    from ..image_transforms import to_rgb

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in EIGHT_BIT_MODES:
                rgb, deep = np.asarray(to_rgb(im)), None
            else:
                rgb, deep = None, np.asarray(im).astype(np.float64)
    except Exception as e:
        raise MedicalImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    meta: dict[str, Any] = {"format": path.suffix.lower().lstrip(".") or "image", "source_mode": mode}
    if deep is None:
        meta["bit_depth"] = 8
        return MedicalImage(rgb, meta)
    meta["bit_depth"] = 32 if mode in ("I", "F") else 16
    meta["intensity_range"] = [float(deep.min()), float(deep.max())]
    if deep.ndim == 3:  # deep multi-channel: one range for all channels
        return MedicalImage(np.round(_minmax(deep[..., :3]) * 255).astype(np.uint8), meta)
    return MedicalImage(_gray_to_rgb(_minmax(deep)), meta)


def read_medical_image(path: str | Path, **options) -> MedicalImage:
    """Dispatch on the file: DICOM (by suffix or the ``DICM`` preamble), NIfTI, else a raster image."""
    path = Path(path)
    if not path.is_file():
        raise MedicalImageError(f"{path}: no such file")
    if is_nifti(path):
        return read_nifti(path, **options)
    if is_dicom(path):
        return read_dicom(path, **options)
    if options:
        raise MedicalImageError(f"{path}: options {sorted(options)} apply to DICOM/NIfTI only")
    return read_raster(path)
