"""``kind: dicom`` - DICOM files anywhere under a folder -> windowed 8-bit images with captions,
modality questions and text-to-image prompts.  Only pixels and generated text leave: no header
field is copied, the patient ID becomes a salted hash (DATA.md 5.2).

Example::

    - name: hospital-ct
      kind: dicom
      path: /archive/ct
      modality: auto              # from the DICOM Modality (CT, MR->MRI, CR/DX chest->CXR, US, ...)
      license: internal
      options:
        window: null              # the file's own window; or lung, mediastinum, bone, brain, abdomen
        frame: middle             # multi-frame objects: middle or first
        slices_per_series: 5      # series of single-frame files: this many slices, evenly spaced
        tasks: [caption, modality_vqa, t2i]

Series: single-frame files sharing a SeriesInstanceUID are ordered by the projection of their
ImagePositionPatient on the slice normal (from ImageOrientationPatient), not by InstanceNumber;
the outer 10% at each end are skipped and ``slices_per_series`` evenly spaced slices are kept
(``null`` keeps every file).  Files without position or series information stand alone.

Objects flagged ``BurnedInAnnotation YES`` are rejected (``burned_in_annotation``); with
``reject_possible_burned_in: true`` so are ultrasound, endoscopy and secondary-capture objects
that do not say (they usually carry text in the pixels).
"""

from __future__ import annotations

import re
from typing import Iterator

import numpy as np

from ...formats.medical_io import WINDOW_PRESETS, MedicalImageError, is_dicom, read_dicom, read_dicom_dataset
from .. import templates as T
from ..imaging import evenly_spaced, limit_size, png_bytes
from ..schema import Record, Rejection
from .base import Adapter, file_items

TASKS = ("caption", "modality_vqa", "t2i")
DICOM_MODALITY = {"CT": "CT", "MR": "MRI", "US": "Ultrasound", "OP": "CFP", "OPT": "OCT", "ES": "Endoscopy", "SM": "HIS", "XC": "Dermoscopy"}
LIKELY_BURNED_IN = {"US", "ES", "OT", "SC", "XC"}


def body_part(value) -> str:
    """A coded body part (e.g. ``CHEST``) as lower-case words; anything else is dropped."""
    text = str(value or "").strip()
    return text.lower().replace("_", " ") if re.fullmatch(r"[A-Z][A-Z _]{1,15}", text) else ""


def _slice_position(ds) -> float | None:
    try:
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
        position = np.array([float(v) for v in ds.ImagePositionPatient])
    except (AttributeError, TypeError, ValueError):
        return None
    normal = np.cross(orientation[:3], orientation[3:])
    return float(position @ normal)


def select_series_slices(files: list[str], path_of, per_series: int, edge_fraction: float = 0.1) -> list[str]:
    """Keep ``per_series`` evenly spaced slices of each series of single-frame files (ordered by
    position along the slice normal); other files pass through.  Returns sorted items."""
    import pydicom

    series: dict[str, list[tuple[float, str]]] = {}
    alone = []
    for item in files:
        try:
            ds = pydicom.dcmread(str(path_of(item)), stop_before_pixels=True)
        except Exception:
            alone.append(item)  # process() reports it
            continue
        uid, pos = str(ds.get("SeriesInstanceUID", "")), _slice_position(ds)
        if not uid or pos is None or int(ds.get("NumberOfFrames", 1) or 1) > 1:
            alone.append(item)
        else:
            series.setdefault(uid, []).append((pos, item))
    chosen = list(alone)
    for members in series.values():
        members.sort()
        if len(members) <= per_series:
            chosen += [m for _, m in members]
            continue
        edge = int(len(members) * edge_fraction)
        inner = members[edge : len(members) - edge] or members
        picks = evenly_spaced(inner, per_series)
        chosen += [m for _, m in dict.fromkeys(picks)]
    return sorted(chosen)


class DicomAdapter(Adapter):
    kind = "dicom"
    requires_modality = False
    options = {"window": None, "frame": "middle", "tasks": list(TASKS), "reject_possible_burned_in": False, "slices_per_series": 5}
    nullable_options = frozenset({"slices_per_series"})

    def __init__(self, source, ctx):
        super().__init__(source, ctx)
        window = source.options.get("window")
        if isinstance(window, str) and window.lower() not in WINDOW_PRESETS:
            raise ValueError(f"source {source.name!r} (kind dicom): options.window must be null (the file's own window), one of "
                             f"{list(WINDOW_PRESETS)} or [center, width], got {window!r}")
        if window is not None and not isinstance(window, str) and not (
                isinstance(window, (list, tuple)) and len(window) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in window) and window[1] >= 1):
            raise ValueError(f"source {source.name!r} (kind dicom): options.window must be null, one of {list(WINDOW_PRESETS)} "
                             f"or [center, width] with width >= 1, got {window!r}")

    def items(self) -> list[str]:
        files = [item for item in file_items(self.source.path) if is_dicom(self.path_of(item))]
        if self.opt["slices_per_series"] is None:
            return files
        return select_series_slices(files, self.path_of, int(self.opt["slices_per_series"]))

    def process(self, item: str) -> Iterator[Record | Rejection]:
        path = self.path_of(item)
        try:  # read once: the header checks below, then the pixels (decoded only when used)
            ds = read_dicom_dataset(path)
        except MedicalImageError as e:
            yield self.reject(item, "unreadable", str(e), paths=[path])
            return
        burned = str(ds.get("BurnedInAnnotation", "")).upper()
        dicom_modality = str(ds.get("Modality", "")).upper()
        if burned == "YES":
            yield self.reject(item, "burned_in_annotation", "the object says it has burned-in annotation")
            return
        if self.opt["reject_possible_burned_in"] and not burned and dicom_modality in LIKELY_BURNED_IN:
            yield self.reject(item, "possible_burned_in_text", f"{dicom_modality} object without a BurnedInAnnotation flag")
            return
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        frame = n_frames // 2 if (self.opt["frame"] == "middle" and n_frames > 1) else 0
        try:
            image = read_dicom(path, window=self.opt["window"], frame=frame, dataset=ds)
        except MedicalImageError as e:
            yield self.reject(item, "unreadable", str(e), paths=[path])
            return
        part = body_part(ds.get("BodyPartExamined"))
        modality = self.source.modality
        if modality == "auto":
            modality = DICOM_MODALITY.get(dicom_modality, "Other")
            if dicom_modality in ("CR", "DX") and part in ("chest", ""):
                modality = "CXR"
        group = self.patient_group(str(ds.get("PatientID", "") or ""), item)
        pixels = limit_size(image.pixels, self.ctx.max_side)
        png = png_bytes(pixels)
        name = T.MODALITY_NAMES[modality]
        description = f"{name} image of the {part}" if part and modality != "CXR" else f"{name} image"
        caption = f"A {description}."
        meta = {"width": pixels.shape[1], "height": pixels.shape[0], "dicom_modality": dicom_modality, "body_part": part,
                "window": image.meta.get("window"), "frame": frame, "num_frames": n_frames,
                "photometric_interpretation": image.meta.get("photometric_interpretation")}
        base = dict(**self.provenance(group, modality), meta=meta)
        tasks = self.opt["tasks"]
        if "caption" in tasks:
            yield Record(id=self.record_id(item, "caption"), family="understanding", task="caption", input_images=[png],
                         messages=[{"from": "human", "value": "<image>\nDescribe this image."}, {"from": "gpt", "value": caption}], **base)
        if "modality_vqa" in tasks:
            yield Record(id=self.record_id(item, "modality_vqa"), family="understanding", task="vqa", input_images=[png],
                         messages=[{"from": "human", "value": "<image>\n" + T.pick(T.MODALITY_QUESTION, item)},
                                   {"from": "gpt", "value": f"This is a {description}."}], **base)
        if "t2i" in tasks:
            yield Record(id=self.record_id(item, "t2i"), family="generation", task="t2i", output_images=[png],
                         captions={"caption": caption, "prompt": f"Generate a {description}."}, **base)
