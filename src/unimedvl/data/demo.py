"""The embedded demo corpus: a small real dataset built offline from the medical files that
installable packages ship, plus procedural stand-ins for the modalities none ships.

    unimedvl data demo --out DIR        # DIR/sources/, DIR/build.yaml, DIR/dataset/

Real files: pydicom/pydicom-data DICOMs (CT, MR, CR chest in MONOCHROME1, CR extremity,
ultrasound including colour, and a 64-px MR), the MNI152 T1
template shipped with nilearn and the echo-planar brain volume shipped with nibabel (slices,
modality questions and 4x super-resolution pairs; each volume is one patient group), scikit-image's fundus
photograph (CFP) and IHC tile (HIS; hematoxylin-only -> IHC staining pairs made by colour
deconvolution of the tile itself), and where Debian's insighttoolkit5-examples is installed (or
``UNIMEDVL_ITK_EXAMPLES_DATA`` names its Data folder) its real T1 and proton-density brain slices
(4x super-resolution and a T1 -> PD translation pair). Procedural: chest X-ray, OCT, endoscopy, ultrasound and
dermoscopy images with a label-defining feature (with modality questions, and 4x
super-resolution pairs of the greyscale ones), and chest X-ray counterfactual pairs with an
explanation. Sources whose package is not installed are skipped and reported.

Images are stored at most ``max_side`` (default 64) pixels long: the scale the demo model works
at, so a super-resolution pair is a 16-pixel input and its 64-pixel target; quality control's
minimum side is three quarters of it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .layout import DatasetLayout
from .procedural import GENERATORS, counterfactual_pair

DEMO_DICOMS = [
    "CT_small.dcm", "693_UNCR.dcm", "explicit_VR-UN.dcm", "MR2_UNCR.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm", "examples_overlay.dcm",
    "emri_small.dcm", "RG1_UNCR.dcm", "RG3_UNCR.dcm", "US1_UNCR.dcm", "OBXXXX1A.dcm", "examples_ybr_color.dcm", "MR_small.dcm",
]
SALT = "unimedvl-demo-corpus"
# Debian's insighttoolkit5-examples ships real MR slices; used where installed.
ITK_DATA_DIRS = [Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")]
ITK_SLICES = {"t1.png": "BrainT1Slice.png", "pd.png": "BrainProtonDensitySlice.png", "sagittal.png": "BrainMidSagittalSlice.png"}  # the demo has no real patients; a real build keeps its salt private


def _save(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def stage_dicoms(dst: Path) -> list[str]:
    from pydicom.data import get_testdata_file

    dst.mkdir(parents=True, exist_ok=True)
    staged = []
    for name in DEMO_DICOMS:
        path = get_testdata_file(name)
        if path:
            shutil.copy(path, dst / name)
            staged.append(name)
    return staged


def stage_package_file(package: str, relative: str, dst: Path, name: str) -> bool:
    """Copy ``relative`` (a file the installed ``package`` ships) to ``dst/name``; ``False`` if the
    package or the file is not there."""
    import importlib

    try:
        module = importlib.import_module(package)
    except ImportError:
        return False
    src = Path(module.__file__).parent / relative
    if not src.is_file():
        return False
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst / name)
    return True


def stage_mni(dst: Path) -> bool:
    """nilearn's MNI152 T1 template volume."""
    return stage_package_file("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", dst, "mni152_t1.nii.gz")


def stage_nibabel(dst: Path) -> bool:
    """nibabel's example echo-planar brain volume (128 x 96 x 24, first of its two time points)."""
    return stage_package_file("nibabel", "tests/data/example4d.nii.gz", dst, "epi_brain.nii.gz")


def stage_skimage(fundus_dir: Path, pairs_dir: Path, his_dir: Path) -> bool:
    try:
        import skimage
        from skimage.color import hed2rgb, rgb2hed
    except ImportError:
        return False
    data = Path(skimage.__file__).parent / "data"
    retina = np.asarray(Image.open(data / "retina.jpg").convert("RGB"))
    h, w = retina.shape[:2]
    rows = ["file,label,patient"]  # the crops show one eye: one patient group, one split
    crops = {"whole.png": retina, "upper_left.png": retina[: h // 2, : w // 2], "upper_right.png": retina[: h // 2, w // 2 :],
             "lower_left.png": retina[h // 2 :, : w // 2], "lower_right.png": retina[h // 2 :, w // 2 :]}
    for name, px in crops.items():
        _save(px, fundus_dir / name)
        rows.append(f"{name},the retina with its vessels" + (" and optic disc" if name == "whole.png" else "") + ",skimage-retina")
    (fundus_dir / "labels.csv").write_text("\n".join(rows) + "\n")

    ihc = np.asarray(Image.open(data / "ihc.png").convert("RGB"))
    hed = rgb2hed(ihc)
    hematoxylin = (np.clip(hed2rgb(np.stack([hed[..., 0], np.zeros_like(hed[..., 0]), np.zeros_like(hed[..., 0])], -1)), 0, 1) * 255).astype(np.uint8)
    # tiles of one slide: one patient group, shared by the pairs and the plain tiles (no leakage)
    pairs = ["input,target,instruction,response,patient"]
    size = ihc.shape[0] // 2
    for i in range(2):
        for j in range(2):
            tile = (slice(i * size, (i + 1) * size), slice(j * size, (j + 1) * size))
            _save(hematoxylin[tile], pairs_dir / f"h_{i}{j}.png")
            _save(ihc[tile], pairs_dir / f"ihc_{i}{j}.png")
            pairs.append(f"h_{i}{j}.png,ihc_{i}{j}.png,Stain this hematoxylin tile as the matching HER2 immunohistochemistry (DAB) slide.,"
                         "Here is the tile with DAB immunohistochemical staining.,skimage-ihc")
    (pairs_dir / "pairs.csv").write_text("\n".join(pairs) + "\n")
    rows = ["file,label,patient"]
    for i in range(2):
        for j in range(2):
            _save(ihc[i * size : (i + 1) * size, j * size : (j + 1) * size], his_dir / f"ihc_{i}{j}.png")
            rows.append(f"ihc_{i}{j}.png,immunohistochemical DAB staining of tumour cells,skimage-ihc")
    (his_dir / "labels.csv").write_text("\n".join(rows) + "\n")
    return True


def itk_data_dir() -> Path | None:
    """The first folder holding every ITK example slice: those named in ``UNIMEDVL_ITK_EXAMPLES_DATA``
    (``os.pathsep``-separated), then ``ITK_DATA_DIRS``; ``None`` where none does."""
    import os

    dirs = [Path(d) for d in os.environ.get("UNIMEDVL_ITK_EXAMPLES_DATA", "").split(os.pathsep) if d] + ITK_DATA_DIRS
    return next((d for d in dirs if all((d / f).is_file() for f in ITK_SLICES.values())), None)


def stage_itk(sr_dir: Path, pair_dir: Path) -> bool:
    """Real MR slices of the ITK examples: 4x super-resolution pairs and a T1 -> proton-density pair."""
    data = itk_data_dir()
    if data is None:
        return False
    for name, src in ITK_SLICES.items():
        _save(np.asarray(Image.open(data / src).convert("L")), sr_dir / name)
    pair_dir.mkdir(parents=True, exist_ok=True)
    for name in ("t1.png", "pd.png"):
        shutil.copy(sr_dir / name, pair_dir / name)
    (pair_dir / "pairs.csv").write_text(
        "input,target,instruction,response,patient\n"
        "t1.png,pd.png,Translate this T1-weighted brain MRI slice into the corresponding proton-density-weighted slice.,"
        "Here is the synthesized proton-density MRI slice.,itk-brain\n"
    )
    return True


def stage_procedural(root: Path, per_label: int) -> list[str]:
    made = []
    for m_index, (modality, (gen, normal, finding)) in enumerate(GENERATORS.items()):
        folder = root / modality.lower()
        rows = ["file,label"]
        for k in range(per_label):
            for has, label in ((False, normal), (True, finding)):
                name = f"{'finding' if has else 'normal'}_{k:02d}.png"
                _save(gen(np.random.default_rng([k, int(has), m_index]), has), folder / name)
                rows.append(f"{name},{label}")
        (folder / "labels.csv").write_text("\n".join(rows) + "\n")
        made.append(modality)
    cf = root / "cxr_counterfactual"
    pairs = ["input,target,instruction,response"]
    for k in range(per_label):
        before, after = counterfactual_pair(1000 + k)
        _save(before, cf / f"before_{k:02d}.png")
        _save(after, cf / f"after_{k:02d}.png")
        pairs.append(f"before_{k:02d}.png,after_{k:02d}.png,Show how this chest X-ray would look if a focal lung opacity developed.,"
                     "A new focal opacity has appeared in one lung; the rest of the radiograph is unchanged.")
    (cf / "pairs.csv").write_text("\n".join(pairs) + "\n")
    return made


GREYSCALE_PROCEDURAL = ("CXR", "OCT", "Ultrasound")  # these also give super-resolution pairs


def demo_config(have: dict, max_side: int = 64) -> dict:
    src = "sources"
    sources = [{"name": "pydicom-samples", "kind": "dicom", "path": f"{src}/dicom", "license": "pydicom / pydicom-data test files (MIT)",
                "options": {"tasks": ["caption", "modality_vqa", "t2i"]}}]
    volume_tasks = ["caption", "modality_vqa", "t2i", "sr"]
    if have["mni"]:
        sources.append({"name": "mni152-t1", "kind": "nifti", "path": f"{src}/nifti", "modality": "MRI", "license": "MNI ICBM152 (nilearn)",
                        "split": "test",  # the held-out brain volume: the demo's MRI questions and SR are scored on it
                        "options": {"description": "T1-weighted brain MRI", "slices_per_volume": 8, "tasks": volume_tasks,
                                    "crop_foreground": True}})
    if have.get("nibabel"):
        sources.append({"name": "nibabel-epi", "kind": "nifti", "path": f"{src}/nibabel", "modality": "MRI",
                        "license": "nibabel test data (MIT)", "split": "train",
                        "options": {"description": "echo-planar brain MRI", "slices_per_volume": 16, "tasks": volume_tasks,
                                    "crop_foreground": True}})
    if have["skimage"]:
        sources += [
            {"name": "skimage-fundus", "kind": "image_folder", "path": f"{src}/fundus", "modality": "CFP", "license": "scikit-image data (CC0/BSD)",
             "options": {"tasks": ["caption", "t2i"]}},
            {"name": "skimage-ihc", "kind": "image_folder", "path": f"{src}/ihc_tiles", "modality": "HIS", "license": "scikit-image data (CC0/BSD)",
             "options": {"tasks": ["caption", "t2i"]}},
            {"name": "skimage-ihc-pairs", "kind": "paired_images", "path": f"{src}/ihc_pairs", "modality": "HIS", "license": "scikit-image data (CC0/BSD)",
             "options": {"task": "ihc_staining"}},
        ]
    if have["itk"]:
        sources += [
            {"name": "itk-mr-slices", "kind": "super_resolution", "path": f"{src}/itk_slices", "modality": "MRI",
             "license": "ITK examples (Apache-2.0)", "options": {"degradation": "kspace"}},
            {"name": "itk-t1-to-pd", "kind": "paired_images", "path": f"{src}/itk_pairs", "modality": "MRI",
             "license": "ITK examples (Apache-2.0)", "options": {"task": "cross_modal"}},
        ]
    for modality in have["procedural"]:
        tasks = ["caption", "closed_vqa", "open_vqa", "t2i", "modality_vqa"] + (["sr"] if modality in GREYSCALE_PROCEDURAL else [])
        sources.append({"name": f"procedural-{modality.lower()}", "kind": "image_folder", "path": f"{src}/procedural/{modality.lower()}",
                        "modality": modality, "license": "procedural (generated, not medical data)", "options": {"tasks": tasks}})
    sources.append({"name": "procedural-cxr-counterfactual", "kind": "paired_images", "path": f"{src}/procedural/cxr_counterfactual",
                    "modality": "CXR", "license": "procedural (generated, not medical data)", "options": {"task": "counterfactual"}})
    return {"salt": SALT, "seed": 0, "splits": {"val": 0.0, "test": 0.2}, "items_per_shard": 16, "max_side": max_side,
            "qc": {"min_side": min(128, max_side * 3 // 4)}, "sources": sources}


def stage_demo(out: str | Path, per_label: int = 12, max_side: int = 64) -> tuple[Path, dict]:
    """Write the demo sources and ``build.yaml`` under ``out``; returns the config path and what was found."""
    import yaml

    out = Path(out)
    src = out / "sources"
    have = {
        "dicoms": stage_dicoms(src / "dicom"),
        "mni": stage_mni(src / "nifti"),
        "nibabel": stage_nibabel(src / "nibabel"),
        "skimage": stage_skimage(src / "fundus", src / "ihc_pairs", src / "ihc_tiles"),
        "procedural": stage_procedural(src / "procedural", per_label),
        "itk": stage_itk(src / "itk_slices", src / "itk_pairs"),
    }
    config = out / "build.yaml"
    config.write_text(yaml.safe_dump(demo_config(have, max_side), sort_keys=False))
    return config, have


def demo_layout(out: str | Path) -> DatasetLayout:
    """The dataset a demo run in ``out`` builds (``out/dataset``)."""
    return DatasetLayout(Path(out) / "dataset")


def build_demo_dataset(out: str | Path, *, per_label: int = 12, max_side: int = 64, workers: int = 1) -> dict:
    """Stage the demo sources under ``out`` and build ``out/dataset`` (resumable: complete shards are
    reused; a dataset built from another demo configuration is rebuilt).  Returns the build summary
    plus ``manifest`` and ``missing`` (sources skipped because their package is not installed)."""
    import json

    from .build_config import load_build_config
    from .builder import build

    out = Path(out)
    config, have = stage_demo(out, per_label=per_label, max_side=max_side)
    missing = [name for name, key in (("nilearn (MNI152 T1)", "mni"), ("nibabel (EPI volume)", "nibabel"),
                                      ("scikit-image (fundus, IHC)", "skimage")) if not have.get(key)]
    cfg = load_build_config(config)
    dataset = demo_layout(out)
    rebuilt = dataset.build_info.is_file() and json.loads(dataset.build_info.read_text()).get("fingerprint") != cfg.fingerprint()
    if rebuilt:
        shutil.rmtree(dataset.root)
    summary = build(cfg, dataset.root, workers=workers)
    manifest = dataset.read_manifest()
    return {**summary, "manifest": manifest, "missing": missing, "rebuilt": rebuilt}
