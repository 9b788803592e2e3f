"""The dataset builder on real sample files (pydicom, nibabel/nilearn, scikit-image) and on
generated broken files."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
import yaml
from PIL import Image
from pydicom.data import get_testdata_file

from unimedvl.data.build_config import BuildConfigError, load_build_config
from unimedvl.data.builder import build
from unimedvl.data.schema import Record, arrow_schema

DICOMS = ["CT_small.dcm", "MR2_UNCR.dcm", "RG3_UNCR.dcm", "US1_UNCR.dcm", "MR_small.dcm"]
PHI_FIELDS = ["PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "StudyDate", "ReferringPhysicianName",
              "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "StationName"]


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width x height`` pixels (a decompression bomb)."""
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def make_sources(root: Path, with_broken: bool = True, with_volume: bool = True) -> Path:
    import nibabel as nib
    import skimage

    (root / "dcm").mkdir(parents=True)
    for name in DICOMS:
        shutil.copy(get_testdata_file(name), root / "dcm" / name)
    (root / "img").mkdir()
    data = Path(skimage.__file__).parent / "data"
    shutil.copy(data / "ihc.png", root / "img" / "ihc.png")
    shutil.copy(data / "retina.jpg", root / "img" / "retina.jpg")
    shutil.copy(data / "retina.jpg", root / "img" / "retina_again.jpg")  # an exact duplicate
    # patient groups of several items: both retina photos are one patient's, and the IHC tile belongs
    # to the patient of CT_small.dcm (PatientID 1CT1), a group across two sources
    labels = ["file,label,patient", "ihc.png,HER2 positive staining,1CT1", "retina.jpg,diabetic retinopathy,p2",
              "retina_again.jpg,diabetic retinopathy,p2"]
    (root / "nii").mkdir()
    if with_volume:
        from nibabel.testing import data_path

        shutil.copy(Path(data_path) / "example4d.nii.gz", root / "nii" / "example4d.nii.gz")
        rng = np.random.default_rng(0)
        vol = np.zeros((160, 160, 40), dtype=np.float32)
        yy, xx = np.mgrid[:160, :160]
        disc = ((yy - 80) ** 2 + (xx - 80) ** 2) < 60**2
        vol[disc] = 100 + 20 * rng.standard_normal((int(disc.sum()), 40))
        nib.save(nib.Nifti1Image(vol, np.eye(4)), root / "nii" / "phantom.nii.gz")
    if with_broken:
        (root / "dcm" / "truncated.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[:2000])
        nan_vol = np.ones((20, 20, 20), dtype=np.float32)
        nan_vol[3, 3, 3] = np.nan
        nib.save(nib.Nifti1Image(nan_vol, np.eye(4)), root / "nii" / "nan.nii.gz")
        (root / "img" / "empty.png").write_bytes(b"")
        (root / "img" / "bomb.png").write_bytes(png_claiming_size(30000, 30000))  # 900 M pixels declared
        labels += ["empty.png,normal,p4", "bomb.png,normal,p5"]
    (root / "img" / "labels.csv").write_text("\n".join(labels) + "\n")
    config = {
        "salt": "a-test-salt-value",
        "seed": 3,
        "log_item_paths": True,  # these tests check rejections by file name
        "items_per_shard": 2,
        "splits": {"test": 0.3},
        "sources": [
            {"name": "hospital", "kind": "dicom", "path": "dcm", "license": "pydicom test data"},
            {"name": "brain", "kind": "nifti", "path": "nii", "modality": "MRI",
             "options": {"description": "brain MRI", "tasks": ["caption", "t2i", "sr"], "slices_per_volume": 2}},
            {"name": "photos", "kind": "image_folder", "path": "img", "modality": "HIS"},
        ],
    }

    path = root / "build.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_records(out: Path) -> list[Record]:
    manifest = json.loads((out / "manifest.json").read_text())
    rows = []
    for shard in manifest["shards"]:
        rows += pq.read_table(out / shard["file"]).to_pylist()
    return [Record.from_row(r) for r in rows]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    config = make_sources(root / "src")
    summary = build(load_build_config(config), root / "out", workers=1)
    return root, config, summary


def rejections(out: Path) -> list[dict]:
    rows = []
    for f in sorted((out / "shards").glob("*.rejections.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines()]
    return rows + [json.loads(line) for line in (out / "duplicates.jsonl").read_text().splitlines()]


def test_counts_schema_and_card(built):
    root, _, summary = built
    out = root / "out"
    assert summary["finalized"] and summary["shards_built"] == summary["shards_total"]
    manifest = json.loads((out / "manifest.json").read_text())
    records = read_records(out)
    kept = [r for r in records if r.id not in set(manifest["excluded"])]
    fam = {f: sum(1 for r in kept if r.family == f) for f in ("understanding", "generation", "interleaved")}
    # DICOM: CT, MR2, RG3, US1 (MR_small is 64 px: too small) x (caption, modality VQA, t2i)
    # NIfTI: 2 slices of the phantom (the 4D example is 128x96x24 -> slices below 128 px are rejected)
    # photos: ihc + retina (retina_again is a duplicate) x (caption, closed VQA, open VQA, t2i)
    assert fam["interleaved"] == 2
    assert sum(1 for r in kept if r.source == "hospital") == 12
    assert sum(1 for r in kept if r.source == "photos") == 8
    assert manifest["num_kept"] == len(kept)
    for table in (pq.read_table(out / s["file"]) for s in manifest["shards"]):
        assert table.schema.remove_metadata() == arrow_schema().remove_metadata()
    sr = next(r for r in kept if r.task == "sr")
    lo, hi = (np.asarray(Image.open(io.BytesIO(b))) for b in (sr.input_images[0], sr.output_images[0]))
    assert hi.shape[0] == 4 * lo.shape[0] and hi.shape[1] == 4 * lo.shape[1]
    ct = next(r for r in kept if r.source == "hospital" and r.modality == "CT" and r.task == "t2i")
    assert ct.captions["caption"] == "A CT image." and ct.meta["dicom_modality"] == "CT"
    text = (out / "README.md").read_text()
    assert "| understanding | HIS | photos | 6 |" in text and "qc1/exact_duplicate" in text
    assert (out / "card" / "records_per_modality.png").is_file() and (out / "card" / "samples_CT.png").is_file()


def test_every_rejection_has_a_reason_and_broken_inputs_do_not_stop_the_build(built):
    out = built[0] / "out"
    by_item = {}
    for r in rejections(out):
        by_item.setdefault(r.get("item", r.get("id")), set()).add(r["reason"])
    assert by_item["truncated.dcm"] == {"unreadable"}
    assert by_item["nan.nii.gz"] == {"unreadable"}
    assert by_item["empty.png"] == {"unreadable"}
    assert by_item["bomb.png"] == {"unreadable"}
    assert by_item["MR_small.dcm"] == {"too_small"}
    dup = json.loads((out / "manifest.json").read_text())["rejections"]
    assert dup["qc1/exact_duplicate"] == 4  # the four records of retina_again.jpg


def test_no_phi_of_the_sample_dicoms_reaches_the_output(built):
    out = built[0] / "out"
    phi = set()
    for name in DICOMS:
        ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
        for field in PHI_FIELDS:
            value = str(ds.get(field, "") or "")
            if len(value) >= 4:
                phi.add(value)
                phi.update(p for p in value.split("^") if len(p) >= 4)
    assert "CompressedSamples^CT1" in phi and "1CT1" in phi
    blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file()]
    for r in read_records(out):  # decompressed Parquet content
        blobs.append(json.dumps(r.to_row(), default=lambda b: b.hex()).encode())
        blobs += r.input_images + r.output_images
    for value in phi:
        for blob in blobs:
            assert value.encode() not in blob, value


def test_splits_follow_patient_groups(built):
    records = read_records(built[0] / "out")
    splits, items, sources = {}, {}, {}
    for r in records:
        splits.setdefault(r.patient_group, set()).add(r.split)
        items.setdefault(r.patient_group, set()).add(r.item_hash)
        sources.setdefault(r.patient_group, set()).add(r.source)
    assert all(len(s) == 1 for s in splits.values())
    # the check has teeth: groups of several work items, one of them across two sources
    shared = [g for g, i in items.items() if len(i) > 1]
    assert len(shared) >= 2 and any(len(sources[g]) > 1 for g in shared)
    assert {r.split for r in records} == {"train", "test"}


def test_parallel_and_partitioned_builds_are_byte_identical(built, tmp_path):
    root, config, _ = built
    cfg = load_build_config(config)
    build(cfg, tmp_path / "w2", workers=2)
    a = build(cfg, tmp_path / "parts", num_partitions=2, partition=0)
    assert not a["finalized"]
    b = build(cfg, tmp_path / "parts", num_partitions=2, partition=1)
    assert b["finalized"]
    again = build(cfg, tmp_path / "parts")
    assert again["shards_built"] == 0 and again["shards_skipped"] == again["shards_total"]
    for other in ("w2", "parts"):
        for f in sorted((root / "out" / "shards").iterdir()):
            assert (tmp_path / other / "shards" / f.name).read_bytes() == f.read_bytes(), (other, f.name)
        assert (tmp_path / other / "manifest.json").read_bytes() == (root / "out" / "manifest.json").read_bytes()


def test_a_killed_build_resumes_to_the_same_bytes(built, tmp_path):
    root, config, _ = built
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "unimedvl", "data", "build", str(config), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("shards/*.done.json")):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    total = json.loads((root / "out" / "manifest.json").read_text())["shards"]
    done_at_kill = len(list((out / "shards").glob("*.done.json")))
    assert 0 < done_at_kill < len(total), "the build was not interrupted mid-way"
    assert not (out / "manifest.json").exists()
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"{done_at_kill} already complete" in result.stdout
    assert not list((out / "shards").glob(".*.partial"))
    for f in sorted((root / "out" / "shards").iterdir()):
        assert (out / "shards" / f.name).read_bytes() == f.read_bytes(), f.name


def test_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("salt: short\nsources: []\n")
    with pytest.raises(BuildConfigError, match="salt must be at least 8"):
        load_build_config(bad)
    bad.write_text("salt: long-enough-salt\nsources:\n  - {name: a, kind: dicom, path: x, colour: red}\n")
    with pytest.raises(BuildConfigError, match=r"sources\[0\]: unknown field\(s\) \['colour'\]"):
        load_build_config(bad)
    bad.write_text("salt: long-enough-salt\nsources:\n  - {name: a, kind: tiles, path: .}\n")
    with pytest.raises(ValueError, match="unknown kind 'tiles'"):
        build(load_build_config(bad), tmp_path / "o")


def test_rejection_logs_name_items_by_hash_and_locate_maps_them_back(tmp_path):
    """Archive paths can carry patient names: by default no file or folder name reaches the output."""
    from typer.testing import CliRunner

    from unimedvl.cli import app
    from unimedvl.data.locate import locate_items

    folder = tmp_path / "src" / "CompressedSamples^CT1"  # a folder named after the patient
    folder.mkdir(parents=True)
    shutil.copy(get_testdata_file("MR_small.dcm"), folder / "1CT1_CompressedSamples.dcm")  # too small: rejected
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "1CT1.dcm")
    (folder / "1CT1_broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"salt": "a-test-salt-value", "sources": [{"name": "h", "kind": "dicom", "path": "src"}]}))
    build(load_build_config(tmp_path / "b.yaml"), tmp_path / "out")
    rej = rejections(tmp_path / "out")
    assert len(rej) == 4 and all(re.fullmatch(r"h/[0-9a-f]{16}", r["item"]) for r in rej)
    for blob in (p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()):
        for name in (b"CompressedSamples", b"1CT1", b"broken"):
            assert name not in blob
    labels = sorted({r["item"] for r in rej})

    # the Python API: each label to its file; a label of no current item is reported missing
    unknown = "h/0000000000000000"
    found, missing = locate_items(tmp_path / "b.yaml", [*labels, unknown, "other-source/0123456789abcdef"])
    assert missing == sorted([unknown, "other-source/0123456789abcdef"])
    assert set(found) == set(labels)
    assert {p.name for p in found.values()} == {"1CT1_CompressedSamples.dcm", "1CT1_broken.dcm"}
    assert all(p.is_file() and p.parent == folder for p in found.values())
    assert locate_items(load_build_config(tmp_path / "b.yaml"), labels) == (found, [])  # a loaded config works alike
    with pytest.raises(BuildConfigError, match="no such build config"):
        locate_items(tmp_path / "none.yaml", labels)

    # the command prints found labels on stdout, missing ones on stderr
    result = CliRunner().invoke(app, ["data", "locate", str(tmp_path / "b.yaml"), *labels, unknown])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"{label}\t{path}" for label, path in found.items()]
    assert f"{unknown}\tnot found" in result.stderr
    result = CliRunner().invoke(app, ["data", "locate", str(tmp_path / "none.yaml"), *labels])
    assert result.exit_code == 2 and "no such build config" in result.output


def test_an_output_folder_is_never_mixed_between_configs(built, tmp_path):
    root, config, _ = built
    other = tmp_path / "other.yaml"
    doc = yaml.safe_load(config.read_text())
    doc["seed"] = 4
    other.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="holds a build of another config"):
        build(_with_base(other, config.parent), root / "out")


def _with_base(path, base):
    from unimedvl.data.build_config import parse_build_config

    return parse_build_config(yaml.safe_load(path.read_text()), base, str(path))
