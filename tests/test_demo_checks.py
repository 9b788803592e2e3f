"""The demo's held-out sets and checks: answer scoring, the image-statistics classifier, the split
they come from, and the build-config pieces they rely on (a source's fixed split, modality
questions and super-resolution pairs of labelled image folders)."""

import numpy as np
import pytest
from PIL import Image

from unimedvl.data.build_config import BuildConfigError, parse_build_config
from unimedvl.demo.checks import bicubic_baseline
from unimedvl.demo.heldout import SRPair, answered_modality, load_heldout
from unimedvl.demo.modality_classifier import ModalityClassifier


@pytest.mark.parametrize("answer, modality", [
    ("This is a OCT image.", "OCT"),  # not CT, although "ct" is inside "oct"
    ("This is a CT image.", "CT"),
    ("This is a chest X-ray image.", "CXR"),
    ("An MRI slice, not a CT.", "MRI"),  # the first named wins
    ("Ultrasound", "Ultrasound"),
    ("This is a medical image.", None),
    ("", None),
])
def test_answers_are_scored_by_the_modality_they_name(answer, modality):
    assert answered_modality(answer) == modality


def _disc(rng):
    yy, xx = np.mgrid[:64, :64]
    r = rng.uniform(14, 20)
    img = np.where(((yy - 32 + rng.uniform(-3, 3)) ** 2 + (xx - 32) ** 2 < r * r), 200, 10)[..., None].repeat(3, axis=2)
    return np.clip(img + rng.integers(0, 30, img.shape), 0, 255).astype(np.uint8)


def _red(rng):
    img = np.zeros((64, 64, 3), np.uint8)
    img[..., 0] = rng.integers(150, 255)
    img[..., 1] = rng.integers(20, 60)
    return img


def test_modality_classifier_separates_distinct_kinds_and_reports_agreement():
    rng = np.random.default_rng(0)
    train = {"A": [_disc(rng) for _ in range(6)], "B": [_red(rng) for _ in range(6)]}
    clf = ModalityClassifier(train)
    assert clf.modalities == ["A", "B"]
    test = {"A": [_disc(rng) for _ in range(4)], "B": [_red(rng) for _ in range(4)]}
    overall, per = clf.agreement(test)
    assert overall == 1.0 and per == {"A": 1.0, "B": 1.0}
    swapped, _ = clf.agreement({"A": test["B"], "B": test["A"]})
    assert swapped == 0.0
    with pytest.raises(ValueError):
        ModalityClassifier({})


def test_bicubic_baseline_scores_at_the_target_size():
    target = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))[..., None].repeat(3, axis=2)
    low = np.asarray(Image.fromarray(target).resize((16, 16), Image.BICUBIC))
    result = bicubic_baseline([SRPair("p", "MRI", "s", "x", low, target)])
    assert result["outputs"][0].shape == target.shape
    assert result["psnr"] > 30  # a smooth ramp survives 4x bicubic almost exactly
    noisy = np.random.default_rng(0).integers(0, 256, target.shape, dtype=np.uint8)
    worse = bicubic_baseline([SRPair("p", "MRI", "s", "x", np.asarray(Image.fromarray(noisy).resize((16, 16))), noisy)])
    assert worse["psnr"] < result["psnr"] - 15


def test_heldout_sets_come_from_the_test_split_only(demo_dataset):
    import json

    import pyarrow.parquet as pq

    held = load_heldout(demo_dataset)
    manifest = json.loads((demo_dataset / "manifest.json").read_text())
    rows = {r["id"]: r for s in manifest["shards"] for r in pq.read_table(demo_dataset / s["file"], columns=["id", "split", "task"]).to_pylist()}
    assert held.questions and held.sr_pairs and held.prompts
    assert all(rows[q.id]["split"] == "test" for q in held.questions)
    assert all(rows[p.id]["split"] == "test" and rows[p.id]["task"] == "sr" for p in held.sr_pairs)
    assert any(p.source == "mni152-t1" for p in held.sr_pairs)  # the held-out brain volume
    for p in held.sr_pairs:
        assert p.target.shape[0] == 4 * p.low.shape[0]
    assert all(answered_modality(q.reference) == q.modality for q in held.questions)
    assert held.train_modalities and set(held.train_images) >= {"CXR", "OCT"}


def _config(split):
    return {"salt": "a-long-salt", "sources": [{"name": "s", "kind": "image_folder", "path": ".", "modality": "CXR", "split": split}]}


def test_a_source_can_be_held_out_whole(tmp_path):
    from unimedvl.data.adapters.image_folder import ImageFolderAdapter

    (tmp_path / "labels.csv").write_text("file,label\n")
    cfg = parse_build_config(_config("test"), tmp_path)
    assert cfg.sources[0].split == "test"
    adapter = ImageFolderAdapter(cfg.sources[0], cfg.context)
    assert {adapter.split_for(f"group{i}") for i in range(50)} == {"test"}
    auto = ImageFolderAdapter(parse_build_config(_config("auto"), tmp_path).sources[0], cfg.context)
    assert {auto.split_for(f"group{i}") for i in range(200)} == {"train", "test"}
    with pytest.raises(BuildConfigError, match="split must be one of"):
        parse_build_config(_config("holdout"), tmp_path)


def test_image_folder_gives_modality_questions_and_sr_pairs(tmp_path):
    from unimedvl.data.adapters.base import BuildContext, SourceConfig
    from unimedvl.data.adapters.image_folder import ImageFolderAdapter

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (130, 66), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("file,label\na.png,a focal opacity\n")
    source = SourceConfig("s", "image_folder", tmp_path, "OCT", options={"tasks": ["modality_vqa", "sr"]})
    records = list(ImageFolderAdapter(source, BuildContext(salt="a-long-salt")).process("a.png"))
    by_task = {r.task: r for r in records}
    assert set(by_task) == {"vqa", "sr"}
    assert by_task["vqa"].messages[1]["value"] == "This is a OCT image."
    from unimedvl.data.imaging import decode_png

    low, high = decode_png(by_task["sr"].input_images[0]), decode_png(by_task["sr"].output_images[0])
    assert high.shape[:2] == (128, 64) and low.shape[:2] == (32, 16)
    assert by_task["sr"].split == by_task["vqa"].split  # one image, one patient group
    with pytest.raises(ValueError, match="sr_degradation"):
        ImageFolderAdapter(SourceConfig("s", "image_folder", tmp_path, "OCT", options={"sr_degradation": "blur"}), BuildContext(salt="a-long-salt"))


def test_nifti_foreground_box_crops_in_plane_only():
    from unimedvl.data.adapters.nifti import foreground_box

    data = np.zeros((100, 80, 30))
    data[40:60, 10:30, 5:25] = 1.0
    box = foreground_box(data, axis=2, margin=0.05)
    assert box[2] == slice(None)
    assert box[0] == slice(35, 65) and box[1] == slice(6, 34)
    assert foreground_box(np.zeros((4, 4, 4)), axis=0) == (slice(None),) * 3
