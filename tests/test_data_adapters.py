"""Each source kind on generated inputs: what records come out, and what gets rejected why."""

import io
import json

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from unimedvl.data.build_config import load_build_config
from unimedvl.data.builder import build
from unimedvl.data.schema import Record


def texture(seed, size=(192, 160)):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: size[0], : size[1]]
    img = 120 + 60 * np.sin(xx / (6 + seed % 5)) * np.cos(yy / 9) + rng.normal(0, 10, size)
    return np.clip(img, 0, 255).astype(np.uint8)


def run(tmp_path, sources, log_item_paths=True):
    cfg = {"salt": "adapter-test-salt", "seed": 0, "log_item_paths": log_item_paths, "sources": sources}
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(cfg))
    build(load_build_config(tmp_path / "build.yaml"), tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    rows = [r for s in manifest["shards"] for r in pq.read_table(tmp_path / "out" / s["file"]).to_pylist()]
    rejections = [json.loads(line) for f in sorted((tmp_path / "out" / "shards").glob("*.rejections.jsonl")) for line in f.read_text().splitlines()]
    return [Record.from_row(r) for r in rows], rejections


def img(b):
    return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))


def test_reports(tmp_path):
    (tmp_path / "r").mkdir()
    Image.fromarray(texture(1)).save(tmp_path / "r" / "a.png")
    Image.fromarray(texture(2)).save(tmp_path / "r" / "b.png")
    rows = [{"image": "a.png", "findings": "Small left pleural effusion.", "impression": "Left effusion.", "patient": "p1"},
            {"image": "b.png", "findings": "", "impression": ""}]
    (tmp_path / "r" / "reports.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    recs, rej = run(tmp_path, [{"name": "r", "kind": "reports", "path": "r", "modality": "CXR", "options": {"table": "reports.jsonl"}}])
    report = next(r for r in recs if r.task == "report")
    assert report.messages[1]["value"] == "Findings: Small left pleural effusion.\nImpression: Left effusion."
    assert next(r for r in recs if r.task == "t2i").captions == {"report": "Left effusion."}
    assert [(r["item"], r["reason"]) for r in rej] == [("b.png", "no_text")]


def test_segmentation_describes_location_and_size(tmp_path):
    (tmp_path / "s").mkdir()
    Image.fromarray(texture(3, (200, 200))).save(tmp_path / "s" / "ct.png")
    mask = np.zeros((200, 200), np.uint8)
    mask[10:40, 150:190] = 1  # upper right, 1200 px = 3%
    Image.fromarray(mask).save(tmp_path / "s" / "mask.png")
    Image.fromarray(np.zeros((200, 200), np.uint8)).save(tmp_path / "s" / "empty.png")
    (tmp_path / "s" / "masks.csv").write_text("image,mask,structure\nct.png,mask.png,kidney tumour\nct.png,empty.png,cyst\n")
    recs, rej = run(tmp_path, [{"name": "s", "kind": "segmentation", "path": "s", "modality": "CT"}])
    text = next(r for r in recs if r.task == "caption").messages[1]["value"]
    assert "medium-sized kidney tumour" in text and "upper right" in text and "3.0%" in text and "40 x 30 pixels" in text
    seg = next(r for r in recs if r.task == "seg")
    out = img(seg.output_images[0])[..., 0]
    assert set(np.unique(out)) == {0, 255} and (out == 255).sum() == 1200
    assert seg.instruction == "Segment the kidney tumour in this image."
    assert [r["reason"] for r in rej] == ["empty_mask"]


def test_rejections_never_name_the_files_an_item_read(tmp_path):
    """By default no file or folder name reaches the rejection log, also where the item is not a
    path (a segmentation row naming an image and a mask, a pair, a subject of several volumes)."""
    (tmp_path / "s").mkdir()
    Image.fromarray(texture(3, (64, 64))).save(tmp_path / "s" / "ct_doe_jane.png")
    (tmp_path / "s" / "masks.csv").write_text("image,mask,structure\nct_doe_jane.png,smith_john_mask.png,liver\n")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "pairs.csv").write_text("input,target,instruction\nroe_richard_he.png,roe_richard_ihc.png,Stain it.\n")
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "subjects.csv").write_text("subject,t2,flair\nsub-01,poe_edgar_t2.nii.gz,poe_edgar_flair.nii.gz\n")
    _, rej = run(tmp_path, [
        {"name": "s", "kind": "segmentation", "path": "s", "modality": "CT"},
        {"name": "p", "kind": "paired_images", "path": "p", "modality": "HIS"},
        {"name": "v", "kind": "paired_volumes", "path": "v", "modality": "MRI", "options": {"pairs": [["t2", "flair"]]}},
    ], log_item_paths=False)
    assert sorted(r["reason"] for r in rej) == ["unreadable"] * 3
    logged = json.dumps(rej)
    for name in ("doe_jane", "smith_john", "roe_richard", "poe_edgar", str(tmp_path)):
        assert name not in logged
    assert all("<item>" in r["detail"] for r in rej)


def test_vqa_formats_group_questions_per_image(tmp_path):
    (tmp_path / "v" / "imgs").mkdir(parents=True)
    Image.fromarray(texture(4)).save(tmp_path / "v" / "imgs" / "xmlab1.jpg")
    qas = [{"img_name": "xmlab1", "question": "Which organ is abnormal?", "answer": "lung", "q_lang": "en", "modality": "CT"},
           {"img_name": "xmlab1", "question": "Is this a CT?", "answer": "yes", "q_lang": "en", "modality": "CT"},
           {"img_name": "xmlab1", "question": "哪个器官?", "answer": "肺", "q_lang": "zh", "modality": "CT"}]
    (tmp_path / "v" / "train.json").write_text(json.dumps(qas))
    recs, _ = run(tmp_path, [{"name": "slake", "kind": "vqa", "path": "v",
                              "options": {"format": "slake", "annotations": "train.json", "images_dir": "imgs", "language": "en"}}])
    (r,) = recs
    assert r.modality == "CT" and r.task == "vqa"
    assert [m["value"] for m in r.messages] == ["<image>\nWhich organ is abnormal?", "Lung", "Is this a CT?", "Yes"]


def test_paired_volumes_pair_the_same_slice_of_two_contrasts(tmp_path):
    (tmp_path / "p").mkdir()
    rng = np.random.default_rng(0)
    base = np.zeros((160, 160, 30), np.float32)
    yy, xx = np.mgrid[:160, :160]
    base[((yy - 80) ** 2 + (xx - 80) ** 2) < 55**2] = 1
    t2 = base * (100 + 10 * rng.standard_normal(base.shape)) + np.arange(30)[None, None, :]  # slice-dependent offset
    flair = base * 500 - t2
    nib.save(nib.Nifti1Image(t2.astype(np.float32), np.eye(4)), tmp_path / "p" / "s1_t2.nii.gz")
    nib.save(nib.Nifti1Image(flair.astype(np.float32), np.eye(4)), tmp_path / "p" / "s1_flair.nii.gz")
    nib.save(nib.Nifti1Image(t2[:, :, :20].astype(np.float32), np.eye(4)), tmp_path / "p" / "s2_flair.nii.gz")
    (tmp_path / "p" / "subjects.csv").write_text("subject,t2,flair\ns1,s1_t2.nii.gz,s1_flair.nii.gz\ns2,s1_t2.nii.gz,s2_flair.nii.gz\n")
    recs, rej = run(tmp_path, [{"name": "b", "kind": "paired_volumes", "path": "p", "modality": "MRI",
                                "options": {"pairs": [["t2", "flair"]], "names": {"t2": "T2-weighted", "flair": "FLAIR"}, "slices_per_volume": 3}}])
    assert len(recs) == 3 and {r.task for r in recs} == {"cross_modal"}
    r = recs[0]
    assert r.instruction == "Translate this T2-weighted MRI slice into the corresponding FLAIR slice."
    a, b = img(r.input_images[0])[..., 0].astype(float), img(r.output_images[0])[..., 0].astype(float)
    inside = base[:, :, 0].T[::-1, :] > 0
    assert np.corrcoef(a[inside], b[inside])[0, 1] < -0.9  # FLAIR here is the inverted T2: same slice, other contrast
    assert [(x["item"], x["reason"]) for x in rej] == [("s2", "not_registered")]


def test_super_resolution_pairs(tmp_path):
    (tmp_path / "h").mkdir()
    Image.fromarray(texture(5, (258, 258))).save(tmp_path / "h" / "x.png")
    for degradation in ("kspace", "bicubic"):
        sub = tmp_path / degradation
        sub.mkdir()
        recs, _ = run(sub, [{"name": "sr", "kind": "super_resolution", "path": str(tmp_path / "h"), "modality": "MRI",
                             "options": {"degradation": degradation}}])
        (r,) = recs
        lo, hi = img(r.input_images[0]), img(r.output_images[0])
        assert hi.shape[:2] == (256, 256) and lo.shape[:2] == (64, 64)
        # the low-resolution image is the high-resolution one, blurred and shrunk
        small = np.asarray(Image.fromarray(hi).resize((64, 64), Image.BOX)).astype(float)
        assert np.abs(small - lo).mean() < 12


def test_unknown_options_are_named(tmp_path):
    (tmp_path / "h").mkdir()
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['factr'\]"):
        run(tmp_path, [{"name": "sr", "kind": "super_resolution", "path": "h", "modality": "MRI", "options": {"factr": 4}}])


def test_dicom_series_keep_evenly_spaced_slices_by_position(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    from unimedvl.data.adapters import make_adapter
    from unimedvl.data.adapters.base import BuildContext, SourceConfig

    (tmp_path / "series").mkdir()
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uid = generate_uid()
    rng = np.random.default_rng(0)
    z_of = {}
    for k, instance in enumerate(rng.permutation(20)):  # instance numbers do not follow position
        ds = template.copy()
        ds.SeriesInstanceUID = uid
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(k * 2.5)]
        ds.InstanceNumber = int(instance) + 1
        name = f"img{int(instance):03d}.dcm"
        z_of[name] = k * 2.5
        ds.save_as(tmp_path / "series" / name)
    adapter = make_adapter(SourceConfig("s", "dicom", tmp_path / "series", options={"slices_per_series": 4}), BuildContext(salt="x" * 10))
    zs = sorted(z_of[i] for i in adapter.items())
    assert zs == [5.0, 17.5, 30.0, 42.5]  # 20 slices, 2 skipped at each end, 4 evenly spaced over the 16 left
    every = make_adapter(SourceConfig("s", "dicom", tmp_path / "series", options={"slices_per_series": None}), BuildContext(salt="x" * 10))
    assert len(every.items()) == 20


def test_text_that_contradicts_the_modality_label_is_rejected(tmp_path):
    from unimedvl.data.qc import check_agreement
    from unimedvl.data.schema import Record as R

    def rec(modality, answer, question="<image>\nWhat is shown?"):
        return R(id="x", family="understanding", task="vqa", modality=modality, source="s", license="l", patient_group="g",
                 messages=[{"from": "human", "value": question}, {"from": "gpt", "value": answer}])

    assert check_agreement(rec("MRI", "An axial CT of the abdomen.")) == ("modality_text_mismatch", "labelled MRI but the text names CT")
    assert check_agreement(rec("MRI", "A T2-weighted MRI; unlike CT it shows oedema.")) is None  # names its own modality too
    assert check_agreement(rec("CT", "No.", question="<image>\nIs this an MRI?")) is None  # questions are not checked
    assert check_agreement(rec("CXR", "The chest X-ray shows cardiomegaly.")) is None
    assert check_agreement(rec("Other", "A CT image.")) is None

    (tmp_path / "r").mkdir()
    Image.fromarray(texture(7)).save(tmp_path / "r" / "a.png")
    (tmp_path / "r" / "reports.csv").write_text("image,findings,impression\na.png,CT of the abdomen shows a liver lesion.,Liver lesion.\n")
    recs, rej = run(tmp_path, [{"name": "r", "kind": "reports", "path": "r", "modality": "MRI"}])
    assert [(r["stage"], r["reason"]) for r in rej] == [("qc2", "modality_text_mismatch")]
    assert [r.task for r in recs] == ["t2i"]  # the impression alone names no modality
