"""The unified UniMedVL / BAGEL-MoT network.

One module, one ``forward``:

    PackedBatch (token ids, ViT patches, noisy/clean latent tokens, positions, layout)
      -> packed input embeddings  [N, H]
           text-vocabulary tokens: embed_tokens
           ViT patches:            connector(vit(patches)) + vit_pos_embed[row*G+col]
           latent tokens:          vae2llm(x_t) + time_embedder(t) + latent_pos_embed[row*G+col]
      -> Qwen2 MoT decoder (latent tokens on the generation expert, all others on the understanding expert)
      -> logits = lm_head(h) at requested understanding tokens, velocities = llm2vae(h) at latent tokens

With KV caches (one per packed sample) the same forward runs incremental inference; without, it
is the training forward.  Noise sampling, losses, guidance and sampling loops live elsewhere
(:mod:`unimedvl.flow`, :mod:`unimedvl.inference`); loading and saving live in :mod:`unimedvl.formats.checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import UniMedVLConfig
from ..precision import resolve_dtype
from .attention import AttentionLayout, AttentionPlan, KVCache
from .autoencoder import Autoencoder
from .layers import PositionTable, RMSNorm, TimestepEmbedder
from .llm import ExpertRouting, Qwen2MoTForCausalLM
from .vit import Connector, SiglipVisionModel


@dataclass
class PackedBatch:
    """Inputs of one packed forward (ARCHITECTURE 5).  ``N`` = packed tokens of all samples.

    Every token kind comes with ``*_index`` - its places in the packed sequence.
    """

    layout: AttentionLayout
    position_ids: torch.Tensor  # [N] RoPE positions
    token_ids: torch.Tensor  # [N_txt] text-vocabulary tokens (text and image markers)
    token_index: torch.Tensor  # [N_txt]
    vit_patches: torch.Tensor | None = None  # [N_vit, 3*P*P] pixels in [-1, 1]
    vit_position_ids: torch.Tensor | None = None  # [N_vit] row*G + col
    vit_seqlens: list[int] | None = None  # patches per image
    vit_index: torch.Tensor | None = None  # [N_vit]
    latents: torch.Tensor | None = None  # [N_lat, p*p*C] latent tokens x_t
    latent_position_ids: torch.Tensor | None = None  # [N_lat] row*G + col
    latent_timesteps: torch.Tensor | None = None  # [n_latent_images] flow time of each latent image
    latent_seqlens: list[int] | None = None  # tokens per latent image
    latent_index: torch.Tensor | None = None  # [N_lat]
    logit_index: torch.Tensor | None = None  # packed positions whose next-token logits are wanted

    @property
    def num_tokens(self) -> int:
        return int(self.position_ids.numel())

    def to(self, device: torch.device | str) -> "PackedBatch":
        moved = {}
        for name, value in self.__dict__.items():
            moved[name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return PackedBatch(**moved)


@dataclass
class ForwardPlan:
    """The per-forward bookkeeping derived from a batch's layout and its caches: expert routing,
    attention plan and RoPE tables.  Build it once with :meth:`UniMedVL.plan` and pass it to several
    forwards that share the layout (the steps of a denoising loop)."""

    routing: ExpertRouting
    attention: AttentionPlan
    rope: tuple[torch.Tensor, torch.Tensor]


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [len(logit_index), V]
    velocities: torch.Tensor | None  # [N_lat, p*p*C] for every latent token of the batch
    hidden: torch.Tensor  # [N, H] final hidden states (after the per-expert final norm)


class UniMedVL(nn.Module):
    def __init__(self, config: UniMedVLConfig):
        super().__init__()
        config.validate()
        self.config = config
        h = config.llm.hidden_size
        # an understanding-only model (visual_gen=False) has no generation expert either: about half
        # the decoder's weights (7B of the 14B), never used by understanding tokens
        self.language_model = Qwen2MoTForCausalLM(config.llm, generation_expert=config.visual_gen)
        self.vit_model = SiglipVisionModel(config.vit)
        self.connector = Connector(config.vit.hidden_size, h)
        self.vit_pos_embed = PositionTable(config.vit_grid, h)
        if config.visual_gen:
            self.time_embedder = TimestepEmbedder(h, config.timestep_freq_size)
            self.vae2llm = nn.Linear(config.patch_latent_dim, h)
            self.llm2vae = nn.Linear(h, config.patch_latent_dim)
            self.latent_pos_embed = PositionTable(config.max_latent_size, h)
            self.vae_model = Autoencoder(config.ae)

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_config(
        cls, config: UniMedVLConfig, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto", seed: int = 0
    ) -> "UniMedVL":
        """A freshly initialised model: built on the meta device, materialised, then initialised (in
        float32, then cast to ``dtype``: ``auto`` follows :mod:`unimedvl.precision`)."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        model.init_weights(generator)
        return model.to(resolve_dtype(dtype, device))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Training-from-scratch initialisation (BAGEL recipe where it has one).

        Linear/embedding weights ~ N(0, std^2), conv weights ~ N(0, 1/fan_in) (drawn on CPU so a seed gives the same model on
        every device), biases 0, norms 1, the sin-cos tables computed, ``llm2vae`` zero-initialised
        and the generation expert a copy of the understanding expert (``copy_init_moe``).
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                # Convolutions (the autoencoder) get a fan-in scaled init, transformers the usual 0.02.
                fan_in = module.weight[0].numel()
                w_std = fan_in**-0.5 if isinstance(module, nn.Conv2d) else std
                w = torch.empty(module.weight.shape, dtype=torch.float32).normal_(0.0, w_std, generator=generator)
                module.weight.copy_(w)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, PositionTable):
                module.reset_parameters()
        if self.config.visual_gen:
            self.llm2vae.weight.zero_()
            self.llm2vae.bias.zero_()
        self.copy_understanding_to_generation()

    @torch.no_grad()
    def copy_understanding_to_generation(self) -> None:
        """Initialise every ``*_moe_gen`` parameter from its understanding twin."""
        params = dict(self.language_model.named_parameters())
        for name, p in params.items():
            if "_moe_gen" in name:
                p.copy_(params[name.replace("_moe_gen", "")])

    def fuse_projections(self) -> None:
        """Prepare for inference: fused q/k/v and gate/up products in the decoder (see
        :meth:`Qwen2MoTModel.fuse_projections`).  Call after loading and placing the weights;
        converting the model afterwards (``.to(dtype)``) quietly returns to the separate products."""
        self.language_model.model.fuse_projections()

    # ---- properties -------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    @property
    def num_layers(self) -> int:
        return self.config.llm.num_layers

    def new_cache(self) -> KVCache:
        return KVCache(self.num_layers)

    # ---- embeddings -------------------------------------------------------------------------
    def vit_features(self, patches: torch.Tensor, position_ids: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        """ViT output after ``post_layernorm`` ``[N_vit, D]``."""
        return self.vit_model(patches, position_ids, seqlens)

    def embed_vit(self, patches: torch.Tensor, position_ids: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        """LLM-side embeddings of ViT patches: ``connector(vit(x)) + vit_pos_embed[pos]`` ``[N_vit, H]``."""
        return self.connector(self.vit_features(patches, position_ids, seqlens)) + self.vit_pos_embed(position_ids)

    def embed_latents(
        self, latents: torch.Tensor, position_ids: torch.Tensor, timesteps: torch.Tensor, seqlens: list[int]
    ) -> torch.Tensor:
        """``vae2llm(x_t) + time_embedder(t) + latent_pos_embed[pos]`` ``[N_lat, H]``; one ``t`` per latent image."""
        if not self.config.visual_gen:
            raise RuntimeError("this model was built for understanding only (visual_gen=False): no generation expert, adapters or autoencoder")
        t_emb = self.time_embedder(timesteps.reshape(-1))
        t_emb = torch.repeat_interleave(t_emb, torch.as_tensor(seqlens, device=t_emb.device), dim=0)
        x = self.vae2llm(latents.to(self.vae2llm.weight.dtype))
        return x + t_emb + self.latent_pos_embed(position_ids)

    def embed(self, batch: PackedBatch) -> torch.Tensor:
        h = self.config.llm.hidden_size
        x = torch.empty(batch.num_tokens, h, dtype=self.dtype, device=self.device)
        x[batch.token_index] = self.language_model.model.embed_tokens(batch.token_ids)
        if batch.vit_patches is not None and batch.vit_patches.numel():
            x[batch.vit_index] = self.embed_vit(batch.vit_patches, batch.vit_position_ids, batch.vit_seqlens).to(x.dtype)
        if batch.latents is not None and batch.latents.numel():
            x[batch.latent_index] = self.embed_latents(
                batch.latents, batch.latent_position_ids, batch.latent_timesteps, batch.latent_seqlens
            ).to(x.dtype)
        return x

    # ---- forward ----------------------------------------------------------------------------
    def plan(
        self,
        batch: PackedBatch,
        caches: list[KVCache | None] | None = None,
        update_cache: bool = False,
        attention_backend: str = "sdpa",
    ) -> ForwardPlan:
        """Routing, attention plan and RoPE tables of ``batch`` (valid while the caches' lengths stay)."""
        if batch.latent_index is not None and batch.latent_index.numel():
            gen_mask = torch.zeros(batch.num_tokens, dtype=torch.bool, device=batch.position_ids.device)
            gen_mask[batch.latent_index] = True
            routing = ExpertRouting.from_gen_mask(gen_mask)
        else:  # no latent tokens: every token on the understanding expert, without a device sync
            routing = ExpertRouting(batch.num_tokens, None, None)
        attention = AttentionPlan.build(batch.layout, caches, update_cache, batch.position_ids.device, attention_backend)
        rope = self.language_model.model.rotary(batch.position_ids, self.dtype)
        return ForwardPlan(routing, attention, rope)

    def forward(
        self,
        batch: PackedBatch,
        caches: list[KVCache | None] | None = None,
        update_cache: bool = False,
        attention_backend: str = "sdpa",
        plan: ForwardPlan | None = None,
    ) -> ModelOutput:
        """Run one packed forward.

        ``caches`` holds one :class:`KVCache` (or ``None``) per packed sample: its context.  With
        ``update_cache`` the new tokens' keys/values are appended to those caches (context updates);
        without, the caches are only read (the denoising query, ARCHITECTURE 9.4).  ``plan`` (from
        :meth:`plan`) replaces ``caches``/``update_cache``/``attention_backend`` when given.
        """
        if plan is None:
            plan = self.plan(batch, caches, update_cache, attention_backend)
        x = self.embed(batch)
        hidden = self.language_model.model(x, batch.position_ids, plan.routing, plan.attention, rope=plan.rope)
        plan.attention.finish()
        logits = None
        if batch.logit_index is not None:
            logits = self.language_model.lm_head(hidden[batch.logit_index])
        velocities = None
        if self.config.visual_gen and batch.latent_index is not None and batch.latent_index.numel():
            velocities = self.llm2vae(hidden[batch.latent_index])
        return ModelOutput(logits=logits, velocities=velocities, hidden=hidden)
