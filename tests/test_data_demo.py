"""The embedded demo corpus: every modality and task family, from packaged files, reproducibly."""

import json
import os
import subprocess
import sys
from io import BytesIO

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unimedvl.data.demo import itk_data_dir
from unimedvl.data.schema import Record

EIGHT = {"CXR", "CT", "MRI", "Ultrasound", "HIS", "CFP", "OCT", "Endoscopy"}


def _build(out, hashseed):
    env = {**os.environ, "PYTHONHASHSEED": str(hashseed)}
    r = subprocess.run([sys.executable, "-m", "unimedvl", "data", "demo", "--out", str(out), "--per-label", "3"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    _build(out / "a", 1)
    return out


def records(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    excluded = set(manifest["excluded"])
    rows = [r for s in manifest["shards"] for r in pq.read_table(dataset / s["file"]).to_pylist()]
    return [Record.from_row(r) for r in rows if r["id"] not in excluded], manifest


def img(b):
    return np.asarray(Image.open(BytesIO(b)).convert("RGB"))


def test_demo_covers_every_modality_and_family(demo):
    recs, manifest = records(demo / "a" / "dataset")
    assert {r.family for r in recs} == {"understanding", "generation", "interleaved"}
    assert EIGHT <= {r.modality for r in recs}
    assert EIGHT <= {r.modality for r in recs if r.family == "generation"}
    tasks = {r.task for r in recs if r.family == "interleaved"}
    assert {"sr", "ihc_staining", "counterfactual"} <= tasks
    # 4x super-resolution pairs at the demo's 64-pixel scale: the real MNI152 T1 volume is held out
    # whole (its source's split is test), nibabel's EPI volume trains; the greyscale procedural ones split by item
    sr = [r for r in recs if r.task == "sr"]
    assert {r.source for r in sr} >= {"mni152-t1", "nibabel-epi", "procedural-cxr", "procedural-oct", "procedural-ultrasound"}
    assert {r.split for r in recs if r.source == "mni152-t1"} == {"test"} and {r.split for r in recs if r.source == "nibabel-epi"} == {"train"}
    for r in sr:
        lo, hi = img(r.input_images[0]), img(r.output_images[0])
        assert hi.shape[:2] == (4 * lo.shape[0], 4 * lo.shape[1]) and max(hi.shape[:2]) <= 64
    # every image-bearing modality has "which kind of image" questions, answered with its name
    modality_q = [r for r in recs if r.family == "understanding" and "kind of medical image" in r.messages[0]["value"]
                  or (r.messages and "imaging modality" in r.messages[0]["value"])]
    assert {"CXR", "CT", "MRI", "Ultrasound", "OCT", "Endoscopy", "Dermoscopy"} <= {r.modality for r in modality_q}
    # the MONOCHROME1 chest radiograph is there, as a chest X-ray
    cxr = [r for r in recs if r.source == "pydicom-samples" and r.modality == "CXR"]
    assert cxr and cxr[0].meta["photometric_interpretation"] == "MONOCHROME1"
    # a counterfactual changes a small region and leaves the rest of the image as it was
    cf = next(r for r in recs if r.task == "counterfactual")
    before, after = img(cf.input_images[0]), img(cf.output_images[0])
    changed = (before != after).any(axis=2).mean()
    assert 0.01 < changed < 0.3 and cf.response
    # images too narrow for the demo's scale (a short side under 48 px once the long side is 64) were rejected
    assert set(manifest["rejections"]) == {"qc1/too_small"}
    assert (demo / "a" / "dataset" / "card" / "samples_OCT.png").is_file()


def test_demo_is_reproducible_across_processes(demo):
    _build(demo / "b", 2)
    a, b = demo / "a" / "dataset" / "shards", demo / "b" / "dataset" / "shards"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for f in a.iterdir():
        assert (b / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.skipif(itk_data_dir() is None, reason="Debian's insighttoolkit5-examples is not installed")
def test_demo_uses_the_itk_mr_slices_where_installed(demo):
    recs, _ = records(demo / "a" / "dataset")
    itk = [r for r in recs if r.source.startswith("itk-")]
    assert {r.task for r in itk} == {"sr", "cross_modal"}
    pair = next(r for r in itk if r.task == "cross_modal")
    t1, pd = img(pair.input_images[0])[..., 0].astype(float), img(pair.output_images[0])[..., 0].astype(float)
    assert t1.shape == pd.shape == (64, 53)  # 217 x 181, stored at the demo's 64-pixel scale
    brain = (t1 > 20) & (pd > 20)
    assert np.corrcoef(t1[brain], pd[brain])[0, 1] < 0.9  # two contrasts of one slice, not one image twice
