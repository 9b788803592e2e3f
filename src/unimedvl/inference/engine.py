"""KV-cached inference primitives on a :class:`~unimedvl.model.UniMedVL` (ARCHITECTURE 9).

A *context* is a :class:`~unimedvl.model.KVCache` (keys/values per layer plus the next RoPE
position).  The engine appends blocks to contexts (text, ViT image, clean VAE image), decodes text
from a context, and samples images with classifier-free guidance, evaluating all guidance branches
in **one** packed forward (each branch is a packed sample with its own context).

This module orchestrates; the network only maps packed tokens to logits and velocities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..flow import GuidanceConfig, combine_guidance, euler_step, sampling_timesteps
from ..model import KVCache, UniMedVL
from ..model.patching import latent_to_tokens, unpatchify
from ..packing import PackedBatchBuilder
from ..tokenizer import SpecialTokens


@dataclass
class TextGeneration:
    ids: list[int]  # generated content ids (the start token and the final <|im_end|> excluded)
    logits: torch.Tensor  # [steps, V] float32, row k = logits that predicted token k
    finished: bool  # True when generation stopped at <|im_end|>


@dataclass
class ImageSample:
    latents: torch.Tensor  # [h*w, p*p*C] float32 final latent tokens (t = 0)
    grid_hw: tuple[int, int]  # latent token grid
    velocities: list[torch.Tensor]  # guided velocity of every step


class Engine:
    def __init__(self, model: UniMedVL, special: SpecialTokens):
        self.model = model
        self.special = special
        self.config = model.config

    # ---- helpers ------------------------------------------------------------------------------
    def new_context(self) -> KVCache:
        return self.model.new_cache()

    def _builder(self) -> PackedBatchBuilder:
        return PackedBatchBuilder(self.config, self.special)

    @torch.no_grad()
    def _update(self, ctx: KVCache, add: Callable[[PackedBatchBuilder], object]):
        b = self._builder().new_sample(ctx.rope)
        add(b)
        rope = b.rope
        out = self.model(b.build(self.model.device), caches=[ctx], update_cache=True)
        ctx.rope = rope
        return out

    # ---- context updates ------------------------------------------------------------------------
    def add_text(self, ctx: KVCache, content_ids: list[int]) -> None:
        """Append the text item ``<|im_start|> content <|im_end|>`` (causal)."""
        self._update(ctx, lambda b: b.add_text(list(content_ids)))

    def add_token_ids(self, ctx: KVCache, ids: list[int]) -> None:
        """Append already-wrapped token ids as one causal text split (e.g. a recorded prompt)."""
        self._update(ctx, lambda b: b.add_tokens(list(ids)))

    def add_vit_image(self, ctx: KVCache, pixels: torch.Tensor) -> None:
        """Append a ViT block of ``pixels [3, h, w]`` in [-1, 1] (understanding input)."""
        self._update(ctx, lambda b: b.add_vit_image(pixels))

    def add_vae_image(self, ctx: KVCache, pixels: torch.Tensor, posterior_noise: torch.Tensor | None = None) -> torch.Tensor:
        """Append a clean VAE block of ``pixels [3, h, w]`` (generation condition, ``t = 0``).

        ``posterior_noise [z, h/8, w/8]`` samples the posterior as the reference does; ``None`` uses
        the mean.  Returns the latent tokens that were added.
        """
        tokens, grid = self.encode_latents(pixels, posterior_noise)
        self.add_latent_tokens(ctx, tokens, grid)
        return tokens

    def add_latent_tokens(self, ctx: KVCache, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> None:
        """Append already-encoded clean latent tokens ``[h*w, p*p*C]`` as a VAE block (``t = 0``)."""
        self._update(ctx, lambda b: b.add_latent_image(tokens, grid_hw, 0.0, noisy=False))

    # ---- autoencoder --------------------------------------------------------------------------
    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        s = self.config.latent_downsample
        if height % s or width % s:
            raise ValueError(f"image size {width}x{height} must be a multiple of {s}")
        h, w = height // s, width // s
        if max(h, w) > self.config.max_latent_size:
            raise ValueError(
                f"image size {width}x{height} exceeds the largest generated side "
                f"{self.config.max_latent_size * s} px of this model"
            )
        return h, w

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor, posterior_noise: torch.Tensor | None = None):
        """``pixels [3, H, W]`` -> (latent tokens ``[h*w, p*p*C]`` float32, grid ``(h, w)``)."""
        grid = self.latent_grid(pixels.shape[1], pixels.shape[2])
        noise = None if posterior_noise is None else posterior_noise.reshape(1, *posterior_noise.shape[-3:]).to(self.model.device)
        z = self.model.vae_model.encode(pixels[None].to(self.model.device), noise)[0]
        return latent_to_tokens(z.float(), *grid, self.config.latent_patch_size), grid

    @torch.no_grad()
    def decode_latents(self, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Latent tokens -> decoder output ``[3, H, W]`` (unclamped)."""
        z = unpatchify(tokens, *grid_hw, self.config.latent_patch_size)
        return self.model.vae_model.decode(z[None].to(self.model.device))[0]

    # ---- text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_text(
        self,
        ctx: KVCache,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        forced_ids: list[int] | None = None,
        stop_at_eos: bool = True,
    ) -> TextGeneration:
        """Decode from ``ctx`` (left unchanged): feed ``<|im_start|>``, then each prediction.

        ``temperature == 0`` is greedy (argmax, first index on ties); otherwise multinomial sampling
        from ``softmax(logits / temperature)``.  ``forced_ids`` feeds those ids instead of the
        predictions (teacher forcing) while still recording the logits.
        """
        work = ctx.fork()
        fed = self.special.bos
        ids, rows, finished = [], [], False
        for step in range(max_new_tokens):
            out = self._update(work, lambda b: b.add_tokens([fed], logits=True))
            logits = out.logits[-1].float()
            rows.append(logits)
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = int(torch.multinomial(probs.cpu(), 1, generator=generator))
            else:
                nxt = int(torch.argmax(logits))
            if forced_ids is not None:
                nxt = forced_ids[step]
            if stop_at_eos and nxt == self.special.eos and forced_ids is None:
                finished = True
                break
            ids.append(nxt)
            fed = nxt
        return TextGeneration(ids, torch.stack(rows), finished)

    # ---- images -------------------------------------------------------------------------------
    @torch.no_grad()
    def velocities(self, contexts: list[KVCache], x: torch.Tensor, t: float | torch.Tensor, grid_hw: tuple[int, int]) -> list[torch.Tensor]:
        """Velocity of the noisy latent block ``x [h*w, p*p*C]`` at time ``t`` under each context.

        All contexts run in one packed forward; the block sits at each context's RoPE position
        and is not written to any cache.  Returns float32 ``[h*w, p*p*C]`` per context.
        """
        b = self._builder()
        for ctx in contexts:
            b.new_sample(ctx.rope)
            b.add_latent_image(x, grid_hw, float(t), noisy=True)
        batch = b.build(self.model.device)
        out = self.model(batch, caches=list(contexts), update_cache=False)
        return list(out.velocities.float().split(x.shape[0]))

    def guided_velocity(
        self,
        ctx: KVCache,
        ctx_text_uncond: KVCache | None,
        ctx_img_uncond: KVCache | None,
        x: torch.Tensor,
        t: torch.Tensor,
        grid_hw: tuple[int, int],
        guidance: GuidanceConfig,
    ) -> torch.Tensor:
        text_scale, img_scale = guidance.scales_at(float(t))
        branches = [ctx]
        if text_scale > 1.0:
            branches.append(ctx_text_uncond)
            if img_scale > 1.0:
                branches.append(ctx_img_uncond)
        if any(c is None for c in branches):
            raise ValueError("guidance is on but an unconditional context is missing")
        vs = self.velocities(branches, x, t, grid_hw)
        return combine_guidance(
            vs[0],
            vs[1] if len(vs) > 1 else None,
            vs[2] if len(vs) > 2 else None,
            text_scale,
            img_scale,
            guidance.cfg_renorm_type,
            guidance.cfg_renorm_min,
        )

    def sample_image(
        self,
        ctx: KVCache,
        ctx_text_uncond: KVCache | None,
        ctx_img_uncond: KVCache | None,
        noise: torch.Tensor,
        grid_hw: tuple[int, int],
        *,
        num_timesteps: int = 50,
        timestep_shift: float = 3.0,
        guidance: GuidanceConfig = GuidanceConfig(),
        progress: Callable[[int, int], None] | None = None,
    ) -> ImageSample:
        """Euler integration from ``noise [h*w, p*p*C]`` at ``t = 1`` to ``t = 0`` (ARCHITECTURE 9.4)."""
        ts = sampling_timesteps(num_timesteps, timestep_shift)
        x = noise.to(torch.float32).to(self.model.device)
        per_step = []
        for k in range(num_timesteps - 1):
            v = self.guided_velocity(ctx, ctx_text_uncond, ctx_img_uncond, x, ts[k], grid_hw, guidance)
            per_step.append(v)
            x = euler_step(x, v, ts[k], ts[k + 1])
            if progress is not None:
                progress(k + 1, num_timesteps - 1)
        return ImageSample(x, grid_hw, per_step)
