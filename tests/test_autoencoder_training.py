"""The autoencoder step of a plan: training on a dataset's images, the fitted latent factors, reuse
of a finished step, and the plan sections that drive it."""

import json

import numpy as np
import pytest
import torch

from unimedvl.config import AutoencoderConfig, UniMedVLConfig
from unimedvl.image_transforms import ImageTransform, normalize_u8
from unimedvl.model.autoencoder import Autoencoder
from unimedvl.training.plan import AutoencoderPlan
from unimedvl.training.autoencoder import (dataset_images, load_trained_autoencoder, reconstruction_psnr,
                                           train_autoencoder)
from unimedvl.training.plan import PlanError, parse_plan

VAE = ImageTransform(64, 32, 16)


@pytest.fixture(scope="module")
def trained(demo_dataset, tmp_path_factory):
    torch.manual_seed(0)
    ae = Autoencoder(UniMedVLConfig.from_preset("tiny").ae)
    images = dataset_images(demo_dataset, VAE, 64)
    before = reconstruction_psnr(ae, images)
    out = tmp_path_factory.mktemp("ae")
    result = train_autoencoder(ae, demo_dataset, out, AutoencoderPlan(steps=40, batch_size=8, crop=32, lr=2e-3, warmup_steps=5), VAE, seed=1)
    return ae, out, result, images, before


def test_training_improves_reconstruction(trained):
    ae, out, result, images, before = trained
    assert result.recon_psnr > before + 2  # dB, on the same train images (40 steps: about +2.8)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and np.mean([r["loss"] for r in rows[-5:]]) < np.mean([r["loss"] for r in rows[:5]])
    assert (out / "reconstructions.png").is_file() and (out / "done.json").is_file()


def test_latent_factors_standardise_the_latents(trained):
    ae, _, result, images, _ = trained
    assert ae.cfg.scale_factor == pytest.approx(result.scale_factor) and ae.cfg.shift_factor == pytest.approx(result.shift_factor)
    with torch.no_grad():
        latents = torch.cat([ae.encode(normalize_u8(px)[None]).flatten() for px in images])
    assert abs(float(latents.mean())) < 5e-3 and float(latents.std(unbiased=False)) == pytest.approx(1.0, abs=5e-3)


def test_finished_step_loads_into_a_fresh_autoencoder(trained):
    ae, out, result, images, _ = trained
    fresh = Autoencoder(UniMedVLConfig.from_preset("tiny").ae)
    info = load_trained_autoencoder(fresh, out)
    assert info["steps"] == 40 and fresh.cfg.scale_factor == pytest.approx(result.scale_factor)
    for (k, a), (_, b) in zip(ae.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k
    assert load_trained_autoencoder(fresh, out / "missing") is None
    other = Autoencoder(AutoencoderConfig(ch=64))
    with pytest.raises(ValueError, match="widths"):
        load_trained_autoencoder(other, out)


def test_interrupted_step_is_not_taken_for_finished(trained, tmp_path):
    _, out, _, _, _ = trained
    for name in ("ae.safetensors", "ae_config.json"):
        (tmp_path / name).write_bytes((out / name).read_bytes())  # weights written, done.json never was
    assert load_trained_autoencoder(Autoencoder(UniMedVLConfig.from_preset("tiny").ae), tmp_path) is None


def test_trainer_runs_the_plan_autoencoder_step_once(demo_dataset, tmp_path):
    from unimedvl.model import UniMedVL
    from unimedvl.tokenizer import BUNDLED_TINY_TOKENIZER, Tokenizer
    from unimedvl.training.trainer import Trainer

    doc = {"name": "t", "preset": "tiny", "seed": 0,
           "autoencoder": {"steps": 3, "batch_size": 2, "crop": 16},
           "inference": {"understanding_vit": [56, 28, 14, 3136], "generation_vit": [56, 28, 14], "generation_vae": [64, 32, 16], "image_size": 64},
           "defaults": {"tokens_per_batch": 600, "max_tokens_per_sample": 600, "vae_transform": [64, 32, 16], "vit_transform": [56, 28, 14, 3136]},
           "stages": [{"name": "s", "steps": 1, "mixture": {"understanding": 1, "generation": 1}}]}
    plan = parse_plan(doc)
    tok = Tokenizer(BUNDLED_TINY_TOKENIZER)
    model = UniMedVL.from_config(UniMedVLConfig.from_preset("tiny"), seed=0)
    Trainer(plan, demo_dataset, tmp_path, model=model, tokenizer=tok).run()
    done = tmp_path / "autoencoder" / "done.json"
    assert done.is_file() and model.config.transforms.image_size == 64
    assert model.config.ae.scale_factor == pytest.approx(json.loads(done.read_text())["scale_factor"])
    stamp = done.stat().st_mtime_ns
    again = UniMedVL.from_config(UniMedVLConfig.from_preset("tiny"), seed=0)
    Trainer(plan, demo_dataset, tmp_path, model=again, tokenizer=tok).run(resume=True)
    assert done.stat().st_mtime_ns == stamp  # reused, not retrained
    for (k, a), (_, b) in zip(model.vae_model.state_dict().items(), again.vae_model.state_dict().items()):
        assert torch.equal(a, b), k
    # the checkpoint records the fitted factors and the inference transforms
    from unimedvl.formats.checkpoint import read_config
    from unimedvl.training.export import resolve_checkpoint

    cfg = read_config(resolve_checkpoint(tmp_path))
    assert cfg.ae.scale_factor == pytest.approx(model.config.ae.scale_factor) and cfg.transforms.generation_vae == (64, 32, 16)


@pytest.mark.parametrize("section, message", [
    ({"autoencoder": {"steps": 0}}, "positive"),
    ({"autoencoder": {"steps": 10, "colour": 1}}, "autoencoder takes"),
    ({"autoencoder": {"steps": "many"}}, "autoencoder.steps must be int"),
    ({"inference": {"understanding_vit": [56, 100, 14]}}, "min <= max"),
    ({"inference": {"size": 64}}, "image_transforms takes"),
])
def test_plan_sections_are_checked(section, message):
    doc = {"name": "t", "stages": [{"name": "s", "steps": 1, "mixture": {"understanding": 1}}], **section}
    with pytest.raises(PlanError, match=message):
        parse_plan(doc)
