"""Training the image autoencoder on a built dataset: the step a plan's ``autoencoder:`` section runs
before its curriculum stages.

The official recipe keeps a pretrained FLUX autoencoder frozen.  Where none is available - the
offline demo, a new resolution, a modality far from natural images - this trains the model's own
autoencoder on the dataset's train-split images (inputs and targets of every family) and fits the
latent ``shift_factor`` / ``scale_factor`` (mean and 1/std of the posterior means, as FLUX's were
fitted) so that the flow sees roughly unit-variance latents.  The curriculum then keeps it frozen.

Objective: L1 + MSE reconstruction of random ``crop x crop`` windows of the images after the
stage's VAE resize, plus ``kl_weight`` times the posterior KL.  Outputs under ``RUN/autoencoder/``:
``ae.safetensors`` (official key layout), ``ae_config.json`` (with the fitted factors),
``metrics.jsonl``, ``reconstructions.png`` and ``done.json``, written last: a folder without it
is an interrupted run and is trained again.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..formats.atomic import write_json, write_text
from ..image_transforms import ImageTransform, normalize_u8
from ..model.autoencoder import Autoencoder
from .plan import AutoencoderPlan

log = logging.getLogger(__name__)

DONE = "done.json"


@dataclass
class AutoencoderResult:
    directory: Path
    shift_factor: float
    scale_factor: float
    recon_psnr: float  # dB, on whole images of the train split after the VAE resize
    steps: int
    seconds: float


def dataset_images(dataset: str | Path, transform: ImageTransform, max_images: int, split: str = "train") -> list[np.ndarray]:
    """Every distinct image (inputs and outputs) of ``split``, resized by ``transform``, as uint8
    ``[h, w, 3]`` arrays; at most ``max_images``, evenly spread."""
    from PIL import Image

    from ..data.imaging import decode_png
    from .data import DatasetIndex

    index = DatasetIndex(dataset, split=split)
    seen, images = set(), []
    for members in index.groups.values():
        for shard, row in members:
            record = index.read(shard, row)
            for png in [*record["input_images"], *record["output_images"]]:
                key = hash(png)
                if key in seen:
                    continue
                seen.add(key)
                images.append(np.asarray(transform.resize(Image.fromarray(decode_png(png)))))
    if len(images) > max_images:
        keep = np.linspace(0, len(images) - 1, max_images).round().astype(int)
        images = [images[i] for i in keep]
    return images


def _crops(images: list[np.ndarray], size: int, count: int, rng: np.random.Generator) -> torch.Tensor:
    batch = []
    for i in rng.integers(0, len(images), count):
        img = images[int(i)]
        h, w = img.shape[:2]
        if h < size or w < size:  # smaller than a window: pad by reflection
            img = np.pad(img, ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)), mode="reflect")
            h, w = img.shape[:2]
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        window = img[y : y + size, x : x + size]
        if rng.random() < 0.5:
            window = window[:, ::-1]
        batch.append(normalize_u8(np.ascontiguousarray(window)))
    return torch.stack(batch)


@torch.no_grad()
def _start_with_small_variance(ae: Autoencoder, logvar: float) -> None:
    """Set the bias of the log-variance half of the encoder's output to ``logvar``: the posterior
    noise starts small, so the decoder is not first trained on latents drowned in unit noise."""
    conv = ae.encoder.conv_out
    conv.bias[ae.cfg.z_channels :] = logvar


def _kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()


@torch.no_grad()
def fit_latent_factors(ae: Autoencoder, images: list[np.ndarray]) -> tuple[float, float]:
    """``(shift, scale)``: the mean and the inverse standard deviation of the posterior means."""
    total, total_sq, n = 0.0, 0.0, 0
    for img in images:
        mean, _ = ae.moments(normalize_u8(img)[None])
        total += float(mean.sum())
        total_sq += float(mean.pow(2).sum())
        n += mean.numel()
    mu = total / n
    std = math.sqrt(max(total_sq / n - mu * mu, 1e-12))
    return mu, 1.0 / std


@torch.no_grad()
def reconstruction_psnr(ae: Autoencoder, images: list[np.ndarray]) -> float:
    """Mean PSNR (dB, 8-bit range) of ``decode(encode(x))`` over whole images."""
    values = []
    for img in images:
        x = normalize_u8(img)[None]
        y = ae.decode(ae.encode(x)).clamp(-1, 1)
        mse = float(((y - x) / 2).pow(2).mean())
        values.append(10 * math.log10(1.0 / max(mse, 1e-10)))
    return float(np.mean(values)) if values else float("nan")


def _grid(ae: Autoencoder, images: list[np.ndarray], path: Path, count: int = 8) -> None:
    """Originals (top row) over reconstructions (bottom row)."""
    from ..formats.charts import image_grid, save_chart

    picks = [images[i] for i in np.linspace(0, len(images) - 1, min(count, len(images))).round().astype(int)]
    recons = []
    with torch.no_grad():
        for img in picks:
            recon = ae.decode(ae.encode(normalize_u8(img)[None])).clamp(-1, 1)[0]
            recons.append(((recon.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
    save_chart(image_grid([picks, recons], row_labels=["image", "reconstruction"]), path)


def train_autoencoder(
    ae: Autoencoder,
    dataset: str | Path,
    out: str | Path,
    plan: AutoencoderPlan,
    transform: ImageTransform,
    *,
    seed: int = 0,
    on_log: Callable[[dict], None] | None = None,
) -> AutoencoderResult:
    """Train ``ae`` in place on the train-split images of ``dataset``, set its latent factors and
    write ``out/`` (see the module docstring).  Deterministic for a seed."""
    from ..formats.checkpoint import AE_CONFIG, AE_WEIGHTS, save_safetensors_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan.validate(ae.cfg.downsample)
    images = dataset_images(dataset, transform, plan.max_images)
    if not images:
        raise ValueError(f"{dataset}: the train split has no images to train the autoencoder on")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    if not plan.resume_weights:
        _start_with_small_variance(ae, plan.initial_logvar)
    ae.train()
    for p in ae.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(ae.parameters(), lr=plan.lr, betas=(0.9, 0.99), weight_decay=0.0)
    start = time.perf_counter()
    rows = []
    if on_log:  # step 0: lets a progress display open before the first step rather than at the first log
        on_log({"step": 0, "loss": float("nan"), "l1": float("nan"), "mse": float("nan"), "kl": float("nan"), "lr": 0.0})
    for step in range(plan.steps):
        lr = plan.lr * min(1.0, (step + 1) / max(1, plan.warmup_steps))
        lr *= 0.5 * (1 + math.cos(math.pi * step / plan.steps)) if step >= plan.warmup_steps else 1.0
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = _crops(images, plan.crop, plan.batch_size, rng)
        mean, logvar = ae.moments(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        y = ae.decoder(z)
        l1, mse, kl = (y - x).abs().mean(), (y - x).pow(2).mean(), _kl(mean, logvar)
        loss = l1 + mse + plan.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        optimizer.step()
        row = {"step": step + 1, "loss": float(loss.detach()), "l1": float(l1.detach()), "mse": float(mse.detach()), "kl": float(kl.detach()), "lr": lr}
        rows.append(row)
        if on_log and ((step + 1) % plan.log_every == 0 or step + 1 == plan.steps):
            on_log(row)
    ae.eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    shift, scale = fit_latent_factors(ae, images)
    ae.cfg.shift_factor, ae.cfg.scale_factor = shift, scale
    psnr = reconstruction_psnr(ae, images)
    seconds = time.perf_counter() - start
    write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    save_safetensors_atomic({k: v for k, v in ae.state_dict().items()}, out / AE_WEIGHTS)
    write_text(out / AE_CONFIG, json.dumps(ae.cfg.to_json(), indent=2))
    _grid(ae, images, out / "reconstructions.png")
    result = AutoencoderResult(out, shift, scale, psnr, plan.steps, seconds)
    write_json(out / DONE, {**{k: v for k, v in asdict(result).items() if k != "directory"}, "plan": asdict(plan),
                            "images": len(images), "seed": seed})
    log.info("autoencoder: %d steps in %.0f s, reconstruction PSNR %.1f dB on %d train images", plan.steps, seconds, psnr, len(images))
    return result


def load_trained_autoencoder(ae: Autoencoder, directory: str | Path) -> dict | None:
    """Load a finished :func:`train_autoencoder` output into ``ae`` (weights and latent factors);
    ``None`` (and ``ae`` untouched) when ``directory`` holds no finished run."""
    from safetensors.torch import load_file

    from ..formats.checkpoint import AE_CONFIG, AE_WEIGHTS
    from ..config import AutoencoderConfig

    directory = Path(directory)
    if not (directory / DONE).is_file():
        return None
    cfg = AutoencoderConfig.from_json(json.loads((directory / AE_CONFIG).read_text()), str(directory / AE_CONFIG))
    if (cfg.ch, tuple(cfg.ch_mult), cfg.z_channels, cfg.num_res_blocks) != (ae.cfg.ch, tuple(ae.cfg.ch_mult), ae.cfg.z_channels, ae.cfg.num_res_blocks):
        raise ValueError(f"{directory}: the trained autoencoder's widths ({cfg.to_json()}) differ from the model's ({ae.cfg.to_json()})")
    ae.load_state_dict(load_file(str(directory / AE_WEIGHTS)), strict=True)
    ae.cfg.shift_factor, ae.cfg.scale_factor = cfg.shift_factor, cfg.scale_factor
    return json.loads((directory / DONE).read_text())
