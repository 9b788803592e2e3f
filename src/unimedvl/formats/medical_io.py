"""Read medical images into the 8-bit RGB arrays the model sees, with metadata but no identifiers.

* DICOM (pydicom): modality LUT / rescale slope and intercept, then a window - the file's own, a
  named preset or explicit ``(center, width)`` - with the DICOM linear VOI function
  (PS3.3 C.11.2.1.2); MONOCHROME1 is inverted after windowing; one frame of a multi-frame object
  (only that frame is decoded).  Colour objects go through pydicom's own colour functions:
  PALETTE COLOR (segmented palettes included) through ``apply_color_lut``, YBR_* through the
  decoder's RGB conversion or ``convert_color_space``; data deeper than 8 bits is scaled by its bit
  depth (never by its own range, which would change the colours).
* NIfTI (nibabel): reoriented to the closest canonical (RAS+) orientation, one slice along a chosen
  axis shown with superior/anterior at the top (neurological convention: the patient's right is on
  the image's right), intensities scaled between volume percentiles.  Only the shown slice is
  converted to float; the volume's shape is checked against :data:`MAX_VOLUME_VOXELS` from the
  header, before any voxel is decoded.  Percentiles of volumes over :data:`PERCENTILE_SAMPLE_VOXELS`
  voxels are taken over evenly spaced slices (``meta["percentile_sample"]`` says how many).
* PNG / TIFF / JPEG, 8 or 16 bit: 16-bit data is scaled by its own range, never clipped at 255.

Invalid values are refused with an error naming the file and the field, never turned into a black
image: a NaN/infinite or zero-width explicit window, a NaN/infinite/zero RescaleSlope or NaN/infinite
RescaleIntercept, NaN/infinite pixels (float TIFF, float DICOM, NIfTI voxels).  One documented
fallback: a file's *own* window that is unusable (width < 1, NaN, infinite) is ignored with a log
warning and the full (min-max) range is used, as when the file has no window; ``meta["window_ignored"]``
says why.  Log messages never carry pixel values or patient identifiers.

Every reader returns a :class:`MedicalImage`; every failure is a :class:`MedicalImageError` that
names the file and what was expected.  Metadata never carries patient identifiers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import contextlib
import logging
import math

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# (center, width) in Hounsfield units for CT.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
}
NIFTI_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
AXIS_CHOICES = (*NIFTI_AXES, "0", "1", "2")  # what --axis / ``axis=`` accept (names or RAS voxel axes)
MAX_PIXELS = 2 ** 27  # one decoded image (DICOM frame, NIfTI slice), checked from the header before decoding; a
# reader-level bound (large mammograms pass), callers such as the server apply their own lower limit on the result
MAX_VOLUME_VOXELS = 1024 * 1024 * 512  # a NIfTI volume, checked from its header before reading
PERCENTILE_SAMPLE_VOXELS = 4 * 1024 * 1024  # volumes above this: percentiles over evenly spaced slices
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


class ImageTooLargeError(MedicalImageError):
    """The header says the image (``limit == "max_pixels"``: a frame, slice or raster image) or the
    volume (``"max_voxels"``) is over the caller's limit; nothing was decoded."""

    def __init__(self, message: str, limit: str):
        super().__init__(message)
        self.limit = limit


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
        try:
            center, width = (float(v) for v in window)
        except (TypeError, ValueError):
            raise MedicalImageError(f"window must be a preset name or (center, width), got {window!r}") from None
        check_window(center, width)
        return (center, width), "explicit"
    if ds is not None and "WindowCenter" in ds and "WindowWidth" in ds:
        try:  # multi-valued windows: the first is the default one
            return (_first_value(ds.WindowCenter), _first_value(ds.WindowWidth)), "file"
        except (TypeError, ValueError, IndexError):
            pass
    return None, "min-max"


def check_window(center: float, width: float) -> None:
    """A :class:`MedicalImageError` unless ``center`` is finite and ``width`` finite and >= 1
    (the DICOM linear VOI function divides by ``width - 1``)."""
    if not math.isfinite(center):
        raise MedicalImageError(f"window center is {center}; expected a finite number")
    if not math.isfinite(width) or width < 1:
        raise MedicalImageError(f"window width is {width}; expected a finite number >= 1")


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


@contextlib.contextmanager
def _quiet_pydicom():
    """pydicom's decoders log each failing plugin with its traceback (``LOGGER.exception``); with a
    root handler configured (the CLI's) that traceback lands on stderr before our clean error.  The
    failure reaches the caller as an exception anyway, so pydicom's log is silenced while decoding."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _dicom_number(ds, keyword: str, path: Path) -> float | None:
    if keyword not in ds or ds[keyword].value in (None, ""):
        return None
    try:
        return _first_value(ds[keyword].value)
    except (TypeError, ValueError, IndexError):
        raise MedicalImageError(f"{path}: {keyword} is {ds[keyword].value!r}; expected a number") from None


def _check_rescale(ds, path: Path) -> None:
    slope, intercept = _dicom_number(ds, "RescaleSlope", path), _dicom_number(ds, "RescaleIntercept", path)
    if slope is not None and (not math.isfinite(slope) or slope == 0):
        raise MedicalImageError(f"{path}: RescaleSlope is {slope}; expected a finite, non-zero number")
    if intercept is not None and not math.isfinite(intercept):
        raise MedicalImageError(f"{path}: RescaleIntercept is {intercept}; expected a finite number")


def _file_window(ds, path: Path, meta: dict) -> tuple[float, float] | None:
    """The file's own window, or ``None`` (with a warning and ``meta["window_ignored"]``) when it is unusable."""
    win, _ = resolve_window(None, ds)
    if win is None:
        return None
    try:
        check_window(*win)
    except MedicalImageError as e:
        field_name = "WindowCenter" if "center" in str(e) else "WindowWidth"
        why = f"{field_name} is {win[0] if field_name == 'WindowCenter' else win[1]}"
        log.warning("%s: the file's window is unusable (%s); using the full intensity range", path, why)
        meta["window_ignored"] = why
        return None
    return win


def _to_u8_by_depth(arr: np.ndarray, bits: int) -> np.ndarray:
    """Integer colour data of ``bits`` bits scaled to 0..255 (a fixed scale: colours are preserved)."""
    if arr.dtype == np.uint8 and bits <= 8:
        return arr
    top = float(2 ** bits - 1)
    return np.round(np.clip(arr.astype(np.float64) / top, 0.0, 1.0) * 255.0).astype(np.uint8)


def _decode_frame(ds, path: Path, frame: int | None) -> tuple[np.ndarray, str]:
    """One frame (``None``: the single frame) decoded by pydicom, and its photometric
    interpretation after decoding (pydicom converts most YBR data to RGB itself)."""
    from pydicom.pixels import get_decoder

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        with _quiet_pydicom():
            decoder = get_decoder(syntax)
            arr, info = decoder.as_array(ds, index=frame)
    except Exception as e:  # truncated data, missing decoder plugin, garbage compressed data...
        first = str(e).strip().splitlines()
        raise MedicalImageError(f"{path}: cannot decode pixel data (transfer syntax {syntax or 'unknown'}): "
                                f"{' '.join(line.strip() for line in first)}") from None
    return arr, str(info.get("photometric_interpretation", ds.get("PhotometricInterpretation", "MONOCHROME2")))


def _dicom_colour(arr: np.ndarray, ds, photometric: str, path: Path) -> np.ndarray:
    """8-bit RGB of a colour frame through pydicom's colour functions."""
    from pydicom.pixels import apply_color_lut, convert_color_space

    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)
        except Exception as e:
            raise MedicalImageError(f"{path}: PALETTE COLOR without a usable palette ({type(e).__name__}: {e})") from None
        bits = 8 if rgb.dtype == np.uint8 else int(ds.RedPaletteColorLookupTableDescriptor[2])
        return _to_u8_by_depth(rgb, bits)
    if photometric.startswith("YBR"):
        try:
            arr = convert_color_space(arr, photometric, "RGB")
        except Exception as e:  # YBR_ICT/RCT/PARTIAL_*: only the decoders convert them
            raise MedicalImageError(f"{path}: cannot convert {photometric} pixel data to RGB ({type(e).__name__}: {e})") from None
    elif photometric not in ("RGB",):
        raise MedicalImageError(f"{path}: PhotometricInterpretation {photometric} is not supported for 3-sample data")
    return _to_u8_by_depth(arr, int(ds.get("BitsStored", 8 * arr.dtype.itemsize)))


def read_dicom(path: str | Path, window: str | tuple[float, float] | None = None, frame: int = 0, dataset=None,
               max_pixels: int | None = MAX_PIXELS) -> MedicalImage:
    """One frame of a DICOM file as 8-bit RGB.  ``window``: ``None`` (the file's, else min-max), a
    preset name (:data:`WINDOW_PRESETS`) or ``(center, width)`` in modality units (HU for CT).
    ``dataset``: the file already read with ``pydicom.dcmread`` (it is then not read again).
    Only the asked frame is decoded; frames over ``max_pixels`` are refused before decoding."""
    from pydicom.pixels import apply_modality_lut

    path = Path(path)
    ds = dataset if dataset is not None else read_dicom_dataset(path)
    if "PixelData" not in ds:
        raise MedicalImageError(f"{path}: the DICOM object has no pixel data (PixelData element missing)")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if n_frames > 1:
        if not 0 <= frame < n_frames:
            raise MedicalImageError(f"{path}: frame {frame} requested but the file has {n_frames} frames (0..{n_frames - 1})")
    elif frame != 0:
        raise MedicalImageError(f"{path}: frame {frame} requested but the file has a single frame")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if max_pixels is not None and rows * cols > max_pixels:
        raise ImageTooLargeError(f"{path}: a frame of {rows}x{cols} = {rows * cols} pixels exceeds the limit of {max_pixels} pixels",
                                 "max_pixels")
    if window is not None:  # a bad explicit window is refused before decoding
        try:
            win, source = resolve_window(window, ds)
        except MedicalImageError as e:
            raise MedicalImageError(f"{path}: {e}") from None
    arr, decoded_photometric = _decode_frame(ds, path, frame if n_frames > 1 else None)
    if n_frames > 1 and arr.ndim == (4 if int(ds.get("SamplesPerPixel", 1)) > 1 else 3):
        arr = arr[0]  # decoders may keep a frame axis of length 1
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
    if arr.ndim == 3 or decoded_photometric == "PALETTE COLOR":  # colour: ultrasound, photographs, palettes
        meta["window"] = None
        if decoded_photometric != photometric:
            meta["decoded_as"] = decoded_photometric
        return MedicalImage(np.ascontiguousarray(_dicom_colour(arr, ds, decoded_photometric, path)), meta)

    _check_rescale(ds, path)
    values = apply_modality_lut(arr, ds).astype(np.float64)
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise MedicalImageError(f"{path}: {bad} pixel values are NaN/infinite after the modality LUT; expected finite values")
    if window is None:
        win = _file_window(ds, path, meta)
        source = "file"
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
    (scl_slope/inter applied), with its voxel size in mm.  NaN/infinite voxels are an error.
    Loads the whole volume: :func:`read_nifti` reads only the slice it shows."""
    import nibabel as nib

    path = Path(path)
    img, ornt, shape = _open_nifti(path, volume, MAX_VOLUME_VOXELS)
    try:
        canonical = nib.as_closest_canonical(img)
        data = np.asarray(canonical.dataobj, dtype=np.float64)
    except Exception as e:
        raise MedicalImageError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    if data.ndim == 4:
        data = data[..., volume]
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise MedicalImageError(f"{path}: the volume contains {bad} NaN/infinite voxels")
    return data, [float(v) for v in canonical.header.get_zooms()[:3]]


def _open_nifti(path: Path, volume: int, max_voxels: int | None):
    """The image (data not read), its orientation to RAS (``io_orientation``) and its 3D shape on
    disk, after checking the shape, the volume index and ``max_voxels`` from the header alone."""
    import nibabel as nib
    from nibabel.orientations import io_orientation

    try:
        img = nib.load(str(path))
        shape = tuple(int(n) for n in img.shape)
        ornt = io_orientation(img.affine)
    except Exception as e:
        raise MedicalImageError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
    if len(shape) == 4:
        if not 0 <= volume < shape[3]:
            raise MedicalImageError(f"{path}: volume {volume} requested but the file has {shape[3]} volumes")
    elif len(shape) != 3:
        raise MedicalImageError(f"{path}: expected a 3D (or 4D) volume, got shape {list(shape)}")
    elif volume != 0:
        raise MedicalImageError(f"{path}: volume {volume} requested but the file holds a single 3D volume")
    voxels = shape[0] * shape[1] * shape[2]
    if max_voxels is not None and voxels > max_voxels:
        raise ImageTooLargeError(f"{path}: the volume's shape {list(shape[:3])} has {voxels} voxels, over the limit of "
                                 f"{max_voxels} voxels; nothing was decoded", "max_voxels")
    if np.isnan(ornt).any():
        raise MedicalImageError(f"{path}: the affine has no usable orientation (degenerate axes)")
    return img, ornt.astype(int), shape[:3]


def _read_ras_plane(img, ornt: np.ndarray, shape: tuple[int, int, int], ras_axis: int, index: int, volume: int) -> np.ndarray:
    """``np.take(canonical, index, axis=ras_axis)`` of the RAS-reoriented volume, read from disk as
    one slab (nibabel's ``dataobj`` slicing), never the whole volume; float64, scaling applied."""
    disk_axis = int(np.nonzero(ornt[:, 0] == ras_axis)[0][0])
    disk_index = index if ornt[disk_axis, 1] == 1 else shape[disk_axis] - 1 - index
    slicer: list = [slice(None)] * 3
    slicer[disk_axis] = disk_index
    if len(img.shape) == 4:
        slicer.append(volume)
    plane = np.asarray(img.dataobj[tuple(slicer)], dtype=np.float64)
    kept = [a for a in range(3) if a != disk_axis]  # the plane's axes, in disk order
    for i, a in enumerate(kept):
        if ornt[a, 1] == -1:
            plane = np.flip(plane, axis=i)
    if ornt[kept[0], 0] > ornt[kept[1], 0]:  # put the plane's axes in RAS order
        plane = plane.T
    return plane


def nifti_plane(data: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Slice ``index`` along RAS voxel ``axis``, rows from superior/anterior (top) down."""
    return np.take(data, index, axis=axis).T[::-1, :]


def _nifti_axis(path: Path, axis: str | int) -> int:
    ax = axis
    if isinstance(axis, str):
        key = axis.strip().lower()
        ax = NIFTI_AXES.get(key, int(key) if key in ("0", "1", "2") else None)
    if isinstance(ax, bool) or ax not in (0, 1, 2):
        raise MedicalImageError(f"{path}: axis must be one of {list(NIFTI_AXES)} or 0/1/2, got {axis!r}")
    return int(ax)


def read_nifti(
    path: str | Path,
    axis: str | int = "axial",
    slice_index: int | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    volume: int = 0,
    max_voxels: int | None = MAX_VOLUME_VOXELS,
    max_pixels: int | None = MAX_PIXELS,
) -> MedicalImage:
    """One slice of a NIfTI volume in canonical (RAS+) orientation as 8-bit RGB.

    ``axis``: ``axial``/``coronal``/``sagittal`` or 0/1/2 (``"0"``/``"1"``/``"2"``) in RAS voxel
    axes; ``slice_index`` defaults to the middle slice; intensities are scaled between the volume's
    ``percentiles`` (over evenly spaced slices for volumes over :data:`PERCENTILE_SAMPLE_VOXELS`).
    The shape is checked against ``max_voxels`` (and the slice against ``max_pixels``) from the
    header, before any data is decoded; then only the needed slices are read.
    """
    path = Path(path)
    img, ornt, shape = _open_nifti(path, volume, max_voxels)
    ax = _nifti_axis(path, axis)
    ras_shape = [0, 0, 0]
    zooms_disk = [float(v) for v in img.header.get_zooms()[:3]]
    zooms = [0.0, 0.0, 0.0]
    for d in range(3):
        ras_shape[int(ornt[d, 0])] = shape[d]
        zooms[int(ornt[d, 0])] = zooms_disk[d]
    n = ras_shape[ax]
    index = n // 2 if slice_index is None else slice_index
    if not 0 <= index < n:
        raise MedicalImageError(f"{path}: slice {index} requested along axis {ax} of {n} slices")
    plane_pixels = shape[0] * shape[1] * shape[2] // n
    if max_pixels is not None and plane_pixels > max_pixels:
        raise ImageTooLargeError(f"{path}: a slice along axis {ax} has {plane_pixels} pixels, over the limit of {max_pixels} pixels",
                                 "max_pixels")
    try:
        plane = _read_ras_plane(img, ornt, shape, ax, index, volume)
        lo, hi, sample = _volume_percentiles(img, shape, volume, percentiles, path)
    except MedicalImageError:
        raise
    except Exception as e:  # truncated or corrupt data
        raise MedicalImageError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    if not np.isfinite(plane).all():
        raise MedicalImageError(f"{path}: slice {index} along axis {ax} contains {int(np.count_nonzero(~np.isfinite(plane)))} NaN/infinite voxels")
    plane = plane.T[::-1, :]  # rows from superior/anterior (top) down
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
    if sample is not None:
        meta["percentile_sample"] = sample
    return MedicalImage(_u8_to_rgb(scale_to_u8(plane, lo, hi)), meta)


def _volume_percentiles(img, shape, volume: int, percentiles, path: Path):
    """The volume's percentiles, read slice by slice along the last disk axis (the contiguous one):
    every slice up to :data:`PERCENTILE_SAMPLE_VOXELS` voxels, else evenly spaced slices within that
    budget (then a description of the sample).  NaN/infinite voxels met are an error."""
    nz = shape[2]
    per_slice = shape[0] * shape[1]
    if per_slice * nz <= PERCENTILE_SAMPLE_VOXELS:
        picks, sample = list(range(nz)), None
    else:
        k = max(1, min(nz, PERCENTILE_SAMPLE_VOXELS // max(per_slice, 1)))
        picks = sorted({int(round(v)) for v in np.linspace(0, nz - 1, k)})
        sample = f"{len(picks)} of {nz} slices along the stored third axis"
    extra = (volume,) if len(img.shape) == 4 else ()
    if sample is None:
        values = np.asarray(img.dataobj[(slice(None), slice(None), slice(None), *extra)], dtype=np.float64)
    else:
        values = np.empty((shape[0], shape[1], len(picks)))
        for i, z in enumerate(picks):  # one stored slice at a time
            values[..., i] = img.dataobj[(slice(None), slice(None), z, *extra)]
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        where = "the volume" if sample is None else f"the sampled slices ({sample})"
        raise MedicalImageError(f"{path}: {where} contains {bad} NaN/infinite voxels")
    # the sample is a fresh array (partitioned in place, not copied) unless a reader handed back a view
    lo, hi = np.percentile(values, percentiles, overwrite_input=bool(values.flags.owndata and values.flags.writeable))
    return lo, hi, sample


# ---- ordinary images -------------------------------------------------------------------------


EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"}


def read_raster(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> MedicalImage:
    """PNG / TIFF / JPEG.  8-bit images (grey, palette, RGB, with or without alpha) are converted to
    RGB as they are; deeper data (16-bit, 32-bit, float) is scaled from its own min..max to 0..255,
    never clipped at 255.  Images over ``max_pixels`` are refused from the header, before decoding."""
    from ..image_transforms import to_rgb

    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                raise ImageTooLargeError(f"{path}: the image has {w}x{h} = {w * h} pixels, over the limit of {max_pixels} pixels",
                                         "max_pixels")
            im.load()
            mode = im.mode
            if mode in EIGHT_BIT_MODES:
                rgb, deep = np.asarray(to_rgb(im)), None
            else:
                rgb, deep = None, np.asarray(im).astype(np.float64)
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own bound, met before ours: its message has the pixel count
        raise ImageTooLargeError(f"{path}: {e}", "max_pixels") from None
    except Exception as e:
        raise MedicalImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    meta: dict[str, Any] = {"format": path.suffix.lower().lstrip(".") or "image", "source_mode": mode}
    if deep is None:
        meta["bit_depth"] = 8
        return MedicalImage(rgb, meta)
    bad = int(np.count_nonzero(~np.isfinite(deep)))
    if bad:  # min-max scaling would turn the whole image black: refused, as NaN voxels in NIfTI
        raise MedicalImageError(f"{path}: {bad} pixel values are NaN/infinite; expected finite values")
    meta["bit_depth"] = 32 if mode in ("I", "F") else 16
    meta["intensity_range"] = [float(deep.min()), float(deep.max())]
    if deep.ndim == 3:  # deep multi-channel: one range for all channels
        return MedicalImage(np.round(_minmax(deep[..., :3]) * 255).astype(np.uint8), meta)
    return MedicalImage(_gray_to_rgb(_minmax(deep)), meta)


def read_medical_image(path: str | Path, *, max_pixels: int | None = MAX_PIXELS, max_voxels: int | None = MAX_VOLUME_VOXELS,
                       **options) -> MedicalImage:
    """Dispatch on the file: DICOM (by suffix or the ``DICM`` preamble), NIfTI, else a raster image.
    ``max_pixels`` bounds the decoded image (frame, slice or raster image) and ``max_voxels`` a NIfTI
    volume, both checked from the header (:class:`ImageTooLargeError`)."""
    path = Path(path)
    if not path.is_file():
        raise MedicalImageError(f"{path}: no such file")
    if is_nifti(path):
        return read_nifti(path, max_voxels=max_voxels, max_pixels=max_pixels, **options)
    if is_dicom(path):
        return read_dicom(path, max_pixels=max_pixels, **options)
    if options:
        raise MedicalImageError(f"{path}: options {sorted(options)} apply to DICOM/NIfTI only")
    return read_raster(path, max_pixels=max_pixels)
