"""From dataset records to packed training batches (ARCHITECTURE 5, 8.3, 8.4).

A record becomes a *sequence plan*: text, ViT-image and VAE-image items in order, each marked
with whether it carries loss and whether conditioning dropout may remove it.

* understanding: each human turn's images (ViT, no loss) then its text (no loss); gpt turns carry
  cross-entropy loss;
* generation: one caption (picked per visit; droppable, no loss) -> the target as a noisy VAE
  image (flow loss);
* interleaved: each input image as a clean VAE block then a ViT block (droppable) -> the
  instruction (droppable, no loss) -> the target as a noisy VAE image (flow loss); when a response
  follows, the target's clean VAE and ViT copies come next (no loss, so the text can see the
  image) and then the response (cross-entropy).

:func:`build_batch` packs several plans into one :class:`~unimedvl.model.PackedBatch`: it encodes
the VAE images (frozen autoencoder, no gradient), draws flow times and noise, applies the
dropout, and returns the labels and velocity targets the objective needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..flow import noise_latents, sample_flow_times, velocity_target
from ..image_transforms import ImageTransform, normalize_u8
from ..model.patching import latent_to_tokens
from ..model.packing import PackedBatchBuilder


@dataclass(frozen=True)
class DropoutConfig:
    """Conditioning dropout for classifier-free guidance (BAGEL training-script defaults)."""

    text: float = 0.1
    vit: float = 0.3
    vae: float = 0.3


@dataclass
class PlanItem:
    kind: str  # text, vit, vae
    ids: list[int] = field(default_factory=list)  # text content ids (no wrappers)
    pixels: np.ndarray | None = None  # [H, W, 3] uint8 for images
    loss: bool = False  # text: cross-entropy; vae: flow loss (noisy)
    droppable: bool = False
    clean_copy_of_previous: bool = False  # a clean VAE copy of the noisy image just before (same position)


@dataclass
class TrainingBatch:
    batch: object  # PackedBatch
    labels: torch.Tensor  # [n_ce] next-token targets, in logit order
    targets: torch.Tensor  # [n_noisy_tokens, C] velocity targets
    noisy_rows: torch.Tensor  # rows of the model's velocity output that are noisy tokens
    family_of_sample: list[str]
    label_sample: torch.Tensor | None = None  # [n_ce] sample index of each label
    noisy_sample: torch.Tensor | None = None  # [n_noisy_tokens] sample index of each noisy latent token


def _split_image_markers(text: str) -> tuple[int, str]:
    n = text.count("<image>")
    return n, text.replace("<image>", "").strip()


def plan_record(row: dict, tokenizer, rng: np.random.Generator) -> list[PlanItem]:
    """A record (a row of the builder's Parquet, messages/captions already parsed) -> plan."""
    from ..data.imaging import decode_png

    family = row["family"]
    enc = tokenizer.encode
    items: list[PlanItem] = []
    if family == "understanding":
        images = [decode_png(b) for b in row["input_images"]]
        used = 0
        for turn in row["messages"]:
            if turn["from"] == "human":
                n, text = _split_image_markers(turn["value"])
                if used == 0 and n == 0 and images:
                    n = len(images)  # images without an <image> marker go before the first question
                for px in images[used : used + n]:
                    items.append(PlanItem("vit", pixels=px))
                used += n
                if text:
                    items.append(PlanItem("text", ids=enc(text)))
            else:
                items.append(PlanItem("text", ids=enc(turn["value"]), loss=True))
    elif family == "generation":
        captions = list(row["captions"].values())
        caption = captions[int(rng.integers(len(captions)))] if captions else ""
        items.append(PlanItem("text", ids=enc(caption), droppable=True))
        items.append(PlanItem("vae", pixels=decode_png(row["output_images"][0]), loss=True))
    elif family == "interleaved":
        for b in row["input_images"]:
            px = decode_png(b)
            items.append(PlanItem("vae", pixels=px, droppable=True))
            items.append(PlanItem("vit", pixels=px, droppable=True))
        items.append(PlanItem("text", ids=enc(row["instruction"]), droppable=True))
        target = decode_png(row["output_images"][0])
        items.append(PlanItem("vae", pixels=target, loss=True))
        if row.get("response"):
            items.append(PlanItem("vae", pixels=target, clean_copy_of_previous=True))
            items.append(PlanItem("vit", pixels=target))
            items.append(PlanItem("text", ids=enc(row["response"]), loss=True))
    else:
        raise ValueError(f"record {row.get('id')}: unknown family {family!r}")
    return items


@torch.no_grad()
def _encode(model, pixels: np.ndarray, vae_transform: ImageTransform, generator: torch.Generator):
    img = vae_transform.resize(Image.fromarray(pixels))
    x = normalize_u8(np.asarray(img))[None].to(model.device, next(model.vae_model.parameters()).dtype)
    cfg = model.config
    down = cfg.ae.downsample
    noise = torch.randn(1, cfg.ae.z_channels, x.shape[2] // down, x.shape[3] // down, generator=generator).to(x.device)
    z = model.vae_model.encode(x, noise)[0].float()
    grid = (x.shape[2] // cfg.latent_downsample, x.shape[3] // cfg.latent_downsample)
    return latent_to_tokens(z, *grid, cfg.latent_patch_size), grid


def build_batch(
    model,
    plans: list[list[PlanItem]],
    families: list[str],
    special,
    *,
    generator: torch.Generator,
    vit_transform: ImageTransform,
    vae_transform: ImageTransform,
    dropout: DropoutConfig = DropoutConfig(),
    timestep_shift: float = 1.0,
) -> TrainingBatch:
    """Pack ``plans`` (one per sample) into one training batch."""
    b = PackedBatchBuilder(model.config, special)
    labels: list[int] = []
    targets: list[torch.Tensor] = []
    latent_rows: list[tuple[int, bool]] = []  # (number of tokens, noisy) per latent block, in order
    label_sample: list[int] = []
    noisy_sample: list[int] = []
    for sample_index, plan in enumerate(plans):
        b.new_sample(0)
        last_noisy = None
        for item in plan:
            dropped = item.droppable and float(torch.rand(1, generator=generator)) < getattr(dropout, item.kind)
            if item.kind == "text":
                if dropped or (not item.ids and not item.loss):
                    continue  # a dropped text segment disappears entirely
                if item.loss:
                    new = b.add_text_with_labels(item.ids)[1]
                    labels += new
                    label_sample += [sample_index] * len(new)
                else:
                    b.add_text(item.ids)
            elif item.kind == "vit":
                if dropped:
                    b.skip_position()
                    continue
                b.add_vit_image(vit_transform(Image.fromarray(item.pixels)))
            elif item.kind == "vae":
                if dropped:
                    b.skip_position()
                    continue
                if item.clean_copy_of_previous and last_noisy is not None:
                    x0, grid = last_noisy
                else:
                    x0, grid = _encode(model, item.pixels, vae_transform, generator)
                if item.loss:
                    t = sample_flow_times(1, generator, timestep_shift)
                    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
                    b.add_latent_image(noise_latents(x0, t[0], eps), grid, float(t[0]), noisy=True)
                    targets.append(velocity_target(x0, eps))
                    latent_rows.append((x0.shape[0], True))
                    noisy_sample += [sample_index] * x0.shape[0]
                    last_noisy = (x0, grid)
                else:
                    b.add_latent_image(x0, grid, 0.0, noisy=False)
                    latent_rows.append((x0.shape[0], False))
    batch = b.build(model.device)
    noisy = torch.cat([torch.full((n,), flag, dtype=torch.bool) for n, flag in latent_rows]) if latent_rows else torch.zeros(0, dtype=torch.bool)
    return TrainingBatch(
        batch=batch,
        labels=torch.tensor(labels, dtype=torch.long, device=model.device),
        targets=torch.cat(targets).to(model.device) if targets else torch.zeros(0, model.config.patch_latent_dim, device=model.device),
        noisy_rows=noisy.nonzero().squeeze(1).to(model.device),
        family_of_sample=list(families),
        label_sample=torch.tensor(label_sample, dtype=torch.long),
        noisy_sample=torch.tensor(noisy_sample, dtype=torch.long),
    )
