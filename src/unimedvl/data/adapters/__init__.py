"""Source adapters, selected by ``kind:`` in a build config."""

from __future__ import annotations

from .base import Adapter, BuildContext, SourceConfig
from .dicom import DicomAdapter
from .image_folder import ImageFolderAdapter
from .nifti import NiftiAdapter
from .paired_images import PairedImagesAdapter
from .paired_volumes import PairedVolumesAdapter
from .reports import ReportsAdapter
from .segmentation import SegmentationAdapter
from .super_resolution import SuperResolutionAdapter
from .vqa import VqaAdapter

ADAPTERS: dict[str, type[Adapter]] = {a.kind: a for a in (
        ImageFolderAdapter, DicomAdapter, NiftiAdapter, PairedImagesAdapter, PairedVolumesAdapter, ReportsAdapter,
        SegmentationAdapter, SuperResolutionAdapter, VqaAdapter,
    )}


def make_adapter(source: SourceConfig, ctx: BuildContext) -> Adapter:
    if source.kind not in ADAPTERS:
        raise ValueError(f"source {source.name!r}: unknown kind {source.kind!r}; known: {sorted(ADAPTERS)}")
    return ADAPTERS[source.kind](source, ctx)


__all__ = ["ADAPTERS", "Adapter", "BuildContext", "SourceConfig", "make_adapter"]
