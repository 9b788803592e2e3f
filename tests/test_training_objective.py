"""The training objective and sequence packing: flow maths, labels, dropout, and learning."""

import json

import numpy as np
import pytest
import torch

from conftest import random_model, tiny_config
from unimedvl.data.imaging import png_bytes
from unimedvl.flow import noise_latents, sample_flow_times, velocity_target
from unimedvl.image_transforms import ImageTransform
from unimedvl.tokenizer import SpecialTokens
from unimedvl.training import DropoutConfig, build_batch, compute_losses, plan_record, training_losses

SPECIAL = SpecialTokens(2040, 2041, 2042, 2043)
VIT = ImageTransform(56, 28, 14, 10**6)
VAE = ImageTransform(64, 32, 16, 10**6)


class ToyTokenizer:
    """Characters as ids: enough for packing tests without a vocabulary file."""

    special = SPECIAL

    def encode(self, text):
        return [ord(c) % 2000 + 10 for c in text]


def test_flow_maths():
    g = torch.Generator().manual_seed(0)
    t = sample_flow_times(20000, g)
    assert 0 < float(t.min()) and float(t.max()) < 1 and abs(float(t.median()) - 0.5) < 0.02  # logit-normal
    shifted = sample_flow_times(20000, torch.Generator().manual_seed(0), shift=3.0)
    assert torch.all(shifted >= t - 1e-6) and float(shifted.median()) > 0.7  # shift > 1 favours noise
    x0, eps = torch.randn(5, 64), torch.randn(5, 64)
    assert torch.allclose(noise_latents(x0, torch.tensor(0.0), eps), x0)
    assert torch.allclose(noise_latents(x0, torch.tensor(1.0), eps), eps)
    # the velocity is the derivative of x_t in t
    xt = lambda t: noise_latents(x0, torch.tensor(t), eps)  # noqa: E731
    assert torch.allclose((xt(0.6) - xt(0.4)) / 0.2, velocity_target(x0, eps), atol=1e-5)


def test_losses_are_normalised_per_token_and_weighted():
    logits = torch.zeros(4, 10)
    labels = torch.tensor([1, 2, 3, 4])
    v, target = torch.zeros(3, 64), torch.ones(3, 64)
    loss = compute_losses(logits, labels, v, target, ce_weight=0.25, mse_weight=1.0)
    assert loss.ce.item() == pytest.approx(np.log(10)) and loss.mse.item() == pytest.approx(1.0)
    assert loss.total.item() == pytest.approx(0.25 * np.log(10) + 1.0)
    with pytest.raises(ValueError, match="neither"):
        compute_losses(None, None, None, None)


def _rows():
    rng = np.random.default_rng(0)
    img = lambda: png_bytes(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))  # noqa: E731
    return [
        {"id": "u", "family": "understanding", "input_images": [img()], "output_images": [],
         "messages": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A scan."}]},
        {"id": "g", "family": "generation", "input_images": [], "output_images": [img()], "captions": {"c": "A chest X-ray."}},
        {"id": "i", "family": "interleaved", "input_images": [img()], "output_images": [img()], "instruction": "Upscale it.", "response": "Done."},
    ]


def test_plans_and_labels_follow_the_task_formats():
    tok = ToyTokenizer()
    rng = np.random.default_rng(0)
    u, g, i = (plan_record(r, tok, rng) for r in _rows())
    assert [(p.kind, p.loss) for p in u] == [("vit", False), ("text", False), ("text", True)]
    assert [(p.kind, p.loss, p.droppable) for p in g] == [("text", False, True), ("vae", True, False)]
    assert [(p.kind, p.loss) for p in i] == [("vae", False), ("vit", False), ("text", False), ("vae", True), ("vae", False), ("vit", False), ("text", True)]
    model = random_model(tiny_config())
    tb = build_batch(model, [u, g, i], ["understanding", "generation", "interleaved"], SPECIAL, generator=torch.Generator().manual_seed(0),
                     vit_transform=VIT, vae_transform=VAE, dropout=DropoutConfig(0, 0, 0))
    # answers "A scan." and "Done.": labels are the content then <|im_end|>
    assert tb.labels.tolist() == tok.encode("A scan.") + [SPECIAL.eos] + tok.encode("Done.") + [SPECIAL.eos]
    # the logit positions hold <|im_start|> + content of each answer
    ids = tb.batch.token_ids.tolist()
    at = dict(zip(tb.batch.token_index.tolist(), ids))
    assert [at[k] for k in tb.batch.logit_index.tolist()] == [SPECIAL.bos] + tok.encode("A scan.") + [SPECIAL.bos] + tok.encode("Done.")
    # latent blocks of 16 tokens (64 px / 16 = 4x4): g target (noisy), i source (clean), i target (noisy), its clean copy
    assert tb.noisy_rows.numel() == tb.targets.shape[0] == 2 * 16
    losses = training_losses(model, tb)
    assert losses.ce_tokens == len(tb.labels) and losses.mse_tokens == 32
    # per-family logging: understanding has only CE, generation only MSE, interleaved both
    assert set(losses.per_family["understanding"]) == {"ce"} and set(losses.per_family["generation"]) == {"mse"}
    assert set(losses.per_family["interleaved"]) == {"ce", "mse"}
    n_u, n_i = len(tok.encode("A scan.")) + 1, len(tok.encode("Done.")) + 1
    weighted = (losses.per_family["understanding"]["ce"] * n_u + losses.per_family["interleaved"]["ce"] * n_i) / (n_u + n_i)
    assert weighted == pytest.approx(losses.ce.item(), rel=1e-5)


def test_conditioning_dropout_removes_text_and_keeps_image_positions():
    tok = ToyTokenizer()
    rows = _rows()
    plan = plan_record(rows[2], tok, np.random.default_rng(0))
    model = random_model(tiny_config())
    keep = build_batch(model, [plan], ["interleaved"], SPECIAL, generator=torch.Generator().manual_seed(0), vit_transform=VIT, vae_transform=VAE,
                       dropout=DropoutConfig(0, 0, 0))
    drop = build_batch(model, [plan], ["interleaved"], SPECIAL, generator=torch.Generator().manual_seed(0), vit_transform=VIT, vae_transform=VAE,
                       dropout=DropoutConfig(1, 1, 1))
    n_instr = len(tok.encode("Upscale it.")) + 2
    n_vit = (56 // 14) ** 2 + 2
    n_src_vae = 16 + 2
    assert keep.batch.num_tokens - drop.batch.num_tokens == n_instr + n_vit + n_src_vae
    # dropped images still use their positions; the dropped text does not
    noisy_pos_keep = keep.batch.position_ids[keep.batch.latent_index][16].item()
    noisy_pos_drop = drop.batch.position_ids[drop.batch.latent_index][0].item()
    assert noisy_pos_keep - noisy_pos_drop == n_instr


def test_a_tiny_model_learns_a_fixed_batch():
    tok = ToyTokenizer()
    plans = [plan_record(r, tok, np.random.default_rng(0)) for r in _rows()]
    model = random_model(tiny_config()).train()
    for p in model.vae_model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for step in range(30):
        tb = build_batch(model, plans, ["understanding", "generation", "interleaved"], SPECIAL, generator=torch.Generator().manual_seed(step % 3),
                         vit_transform=VIT, vae_transform=VAE, dropout=DropoutConfig(0, 0, 0))
        losses = training_losses(model, tb)
        opt.zero_grad()
        losses.total.backward()
        opt.step()
        history.append(losses.as_floats())
    first, last = history[:3], history[-3:]
    assert np.mean([h["ce"] for h in last]) < 0.5 * np.mean([h["ce"] for h in first])
    assert np.mean([h["mse"] for h in last]) < np.mean([h["mse"] for h in first])
    json.dumps(history)  # loggable as JSON
