"""`unimedvl demo` end to end at the reduced `smoke` scale: every stage stays wired (corpus, autoencoder
step, three curriculum stages, export, held-out checks, report), the run resumes, and the trained
model becomes the default of the inference commands."""

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from unimedvl.cli import app

REQUIRED = ["modality_accuracy", "untrained_modality_accuracy", "chance_modality_accuracy", "sr_psnr", "untrained_sr_psnr",
            "bicubic_sr_psnr", "sr_ssim", "t2i_agreement", "untrained_t2i_agreement", "wall_time_s"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-run")
    home = root / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNIMEDVL_HOME", str(home))
        mp.delenv("UNIMEDVL_MODEL", raising=False)
        result = CliRunner().invoke(app, ["demo", "--out", str(root / "run"), "--preset", "smoke", "--register-default"])
    assert result.exit_code == 0, result.output
    return root / "run", home, result.output


def test_demo_writes_metrics_with_every_baseline(smoke):
    out, _, output = smoke
    m = json.loads((out / "metrics.json").read_text())
    for key in REQUIRED:
        assert isinstance(m[key], (int, float)), key
    for key in ("modality_accuracy", "untrained_modality_accuracy", "t2i_agreement", "untrained_t2i_agreement", "sr_ssim"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["chance_modality_accuracy"] == pytest.approx(1 / len(m["modality_options"]))
    assert m["chance_t2i_agreement"] < 0.5 and m["modality_questions"] == 6 and m["sr_pairs"] == 2
    # the untrained model's super-resolution is noise-like: bicubic upsampling is far better
    assert m["bicubic_sr_psnr"] > m["untrained_sr_psnr"] + 3
    from unimedvl.demo import demo_preset
    from unimedvl.demo.runner import scaled_plan
    from unimedvl.training.plan import load_plan

    full = load_plan("demo")
    smoke_plan = scaled_plan(full, demo_preset("smoke").steps_scale)
    assert m["plan"]["stages"] == {s.name: s.steps for s in smoke_plan.stages}
    assert all(0 < a.steps < b.steps for a, b in zip(smoke_plan.stages, full.stages))
    assert "modality questions:" in output and "report:" in output


def test_held_out_questions_never_met_in_training(smoke):
    import pyarrow.parquet as pq

    out, _, _ = smoke
    manifest = json.loads((out / "dataset" / "manifest.json").read_text())
    rows = [r for s in manifest["shards"] for r in pq.read_table(out / "dataset" / s["file"], columns=["id", "split", "patient_group"]).to_pylist()]
    split_of = {r["id"]: r["split"] for r in rows}
    train_groups = {r["patient_group"] for r in rows if r["split"] == "train"}
    test_groups = {r["patient_group"] for r in rows if r["split"] == "test"}
    assert not train_groups & test_groups
    # every scored question and super-resolution pair is a test-split record
    for name in ("trained_vqa", "untrained_vqa", "trained_sr", "untrained_sr", "bicubic_sr"):
        items = [json.loads(line) for line in (out / "evaluation" / f"{name}.jsonl").read_text().splitlines()]
        assert items and {split_of[i["id"]] for i in items} == {"test"}, name


def test_report_shows_every_section_with_existing_pictures(smoke):
    out, _, _ = smoke
    page = (out / "report.html").read_text()
    for heading in ("Results on held-out data", "generated images per modality", "4x super-resolution", "closed modality questions",
                    "Observation: the demo corpus", "Knowledge: autoencoder step and curriculum"):
        assert heading in page, heading
    assert "tiny" in page and "minutes on a CPU" in page  # the honest statement
    pictures = re.findall(r'<img src="([^"]+)"', page)
    assert len(pictures) >= 8
    for rel in pictures:
        assert (out / rel).is_file(), rel
    assert {"report_files/t2i_grid.png", "report_files/sr_grid.png", "train/autoencoder/reconstructions.png",
            "train/plots/loss_foundation.png", "train/plots/loss_unified.png"} <= set(pictures)


def test_exported_model_is_official_layout_at_the_demo_scale(smoke):
    from unimedvl.inference import UniMedVLPipeline

    out, _, _ = smoke
    for name in ("ema.safetensors", "model.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json", "vocab.json"):
        assert (out / "model" / name).is_file(), name
    pipe = UniMedVLPipeline.from_pretrained(out / "model", dtype="fp32")
    assert pipe.default_image_size == 64 and pipe.generation_size(200, 100) == (64, 32)
    ae = json.loads((out / "model" / "ae_config.json").read_text())
    done = json.loads((out / "train" / "autoencoder" / "done.json").read_text())
    assert ae["scale_factor"] == pytest.approx(done["scale_factor"]) and ae["scale_factor"] != 0.3611  # fitted, not FLUX's


def test_rerun_resumes_without_training_again(smoke, tmp_path):
    out, home, _ = smoke
    metrics_rows = (out / "train" / "metrics.jsonl").read_text()
    ae_done = (out / "train" / "autoencoder" / "done.json").stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNIMEDVL_HOME", str(tmp_path / "other-home"))
        result = CliRunner().invoke(app, ["demo", "--out", str(out), "--preset", "smoke"])
    assert result.exit_code == 0, result.output
    assert (out / "train" / "metrics.jsonl").read_text() == metrics_rows  # no step redone
    assert (out / "train" / "autoencoder" / "done.json").stat().st_mtime_ns == ae_done
    assert not (tmp_path / "other-home").exists()  # the smoke preset registers nothing unless asked


def test_inference_commands_default_to_the_demo_model(smoke, monkeypatch, tmp_path):
    out, home, _ = smoke
    monkeypatch.setenv("UNIMEDVL_HOME", str(home))
    monkeypatch.delenv("UNIMEDVL_MODEL", raising=False)
    pointer = json.loads((home / "default_model.json").read_text())
    assert Path(pointer["model"]) == (out / "model").resolve()
    image = next((out / "sources" / "procedural" / "cxr").glob("*.png"))
    result = CliRunner().invoke(app, ["ask", str(image), "-q", "Which kind of medical image is this?", "--dtype", "fp32",
                                      "--temperature", "0", "--max-new-tokens", "8", "--no-stream"])
    assert result.exit_code == 0, result.output
    assert f"using {(out / 'model').resolve()}" in result.output and "--model DIR for the official weights" in result.output
    png = tmp_path / "drawn.png"
    result = CliRunner().invoke(app, ["generate", "Generate a chest X-ray image.", "-o", str(png), "--dtype", "fp32", "--steps", "3"])
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert Image.open(png).size == (64, 64)  # the demo model's own scale, not 1024


def test_inference_commands_without_any_model_say_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("UNIMEDVL_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("UNIMEDVL_MODEL", raising=False)
    result = CliRunner().invoke(app, ["generate", "a chest X-ray", "-o", str(tmp_path / "x.png")])
    assert result.exit_code != 0
    assert "no --model given" in result.output and "unimedvl demo" in result.output
