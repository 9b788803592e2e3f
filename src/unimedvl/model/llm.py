"""Qwen2 decoder with Mixture-of-Transformers experts (ARCHITECTURE 3.1, 5.5, 5.6).

Design:

* every decoder layer holds two complete parameter sets - the *understanding* expert (the
  original Qwen2.5 weights, un-suffixed names) and the *generation* expert (``*_moe_gen``);
* a token's expert is fixed by what it is: VAE latent tokens use the generation expert, all other
  tokens (text, image markers, ViT patches) the understanding expert.  :class:`ExpertRouting`
  computes the split once per forward; every per-token map of every layer goes through it;
* attention is one joint softmax over all tokens that the packed layout allows
  (:mod:`unimedvl.model.attention`), with GQA, q/k RMSNorm over the head dimension and RoPE;
* the same ``forward`` serves training (no caches) and KV-cached inference (a cache per sample).

Per layer, as in Qwen2.5-7B plus BAGEL's QK-norm (ARCHITECTURE 2.1, 5.6): pre-RMSNorm (eps 1e-6),
q/k/v projections *with* bias and ``o_proj`` without, GQA with 28 query and 4 key/value heads of
d = 128, RMSNorm on q and k per head, then RoPE (theta 1e6, full head), SwiGLU MLP (H 3584 ->
I 18944).  The final norm is per expert too (``norm`` / ``norm_moe_gen``); ``lm_head`` is untied.

Precision: everything runs in the dtype of the weights.  The reference's gen-mode detour through
fp32 for q/k-norm and RoPE (ARCHITECTURE 10.4) is not mirrored; the parity tolerances cover it.

Shapes: ``N`` packed tokens, ``H`` hidden, ``hq``/``hkv`` query/key-value heads, ``d`` head dim.
Module and parameter names follow the official checkpoint, so its keys load without renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LLMConfig
from .attention import AttentionPlan, attend, attend_contexts
from .layers import FusedLinear, Linear, RMSNorm, apply_rotary, linear, rms_norm, rms_norm_heads_, rotary_cos_sin, uninitialized_embedding


@dataclass
class ExpertRouting:
    """Which packed tokens use the generation expert.  ``gen_index``/``und_index`` are ``None``
    when no token (resp. every token) is a generation token, so single-expert calls skip the gather."""

    num_tokens: int
    und_index: torch.Tensor | None
    gen_index: torch.Tensor | None

    @classmethod
    def from_gen_mask(cls, gen_mask: torch.Tensor) -> "ExpertRouting":
        # gen_mask [N] bool, True at VAE latent tokens (ARCHITECTURE 5.5)
        n = gen_mask.numel()
        n_gen = int(gen_mask.sum())  # one host sync per forward, not one per layer
        if n_gen == 0:
            return cls(n, None, None)
        gen_index = gen_mask.nonzero().squeeze(1)
        und_index = (~gen_mask).nonzero().squeeze(1) if n_gen < n else None
        return cls(n, und_index, gen_index)

    @property
    def all_und(self) -> bool:
        return self.gen_index is None

    @property
    def all_gen(self) -> bool:
        return self.gen_index is not None and self.und_index is None

    @property
    def gen_majority(self) -> bool:
        """Mixed, with at most one understanding token in sixteen.

        The typical case is a denoising query: its two image markers (und) around e.g. 4096
        latent tokens (gen) for a 1024x1024 image (ARCHITECTURE 9.4).
        """
        return self.und_index is not None and self.gen_index is not None and self.gen_index.numel() * 16 >= self.num_tokens * 15

    def apply_split(self, x: torch.Tensor, und, gen, sizes: list[int]) -> list[torch.Tensor]:
        """Like :meth:`apply` for maps returning ``[N, sum(sizes), ...]`` pieces concatenated on dim 1,
        returned split; when no gather is needed the maps' pieces are used without concatenating.

        Used for q/k/v: one gather/scatter of ``[N, hq + 2*hkv, d]`` instead of three.
        """
        if self.all_und or self.all_gen or self.gen_majority:
            parts = list((und if self.all_und else gen)(x))
            if self.gen_majority:
                fix = und(x.index_select(0, self.und_index))
                for p, f in zip(parts, fix):
                    p[self.und_index] = f.to(p.dtype)  # index_put needs matching dtypes
            return parts
        return list(self.apply(x, lambda t: torch.cat(und(t), dim=1), lambda t: torch.cat(gen(t), dim=1)).split(sizes, dim=1))

    def apply(self, x: torch.Tensor, und: Callable[[torch.Tensor], torch.Tensor], gen: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``und`` on understanding tokens and ``gen`` on generation tokens of ``x [N, ...]``.

        Both maps are row-wise, so when one expert has only a few tokens (the two image markers
        of a denoising query) the other runs on every row and the few rows are then overwritten:
        cheaper than gathering and scattering the large majority.
        """
        if self.all_und:
            return und(x)
        if self.all_gen:
            return gen(x)
        if self.gen_majority:  # a handful of understanding rows
            out = gen(x)
            out[self.und_index] = und(x.index_select(0, self.und_index)).to(out.dtype)
            return out
        # a balanced mix (training packs, context updates of several kinds): gather, map, scatter
        y_und = und(x.index_select(0, self.und_index))  # [N_und, ...]
        y_gen = gen(x.index_select(0, self.gen_index))  # [N_gen, ...]
        out = y_und.new_empty((self.num_tokens, *y_und.shape[1:]))  # [N, ...]
        out.index_copy_(0, self.und_index, y_und)
        out.index_copy_(0, self.gen_index, y_gen)
        return out


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)
        self.gate_up: FusedLinear | None = None  # set by fuse_projections (inference)

    def fuse_projections(self) -> None:
        self.gate_up = FusedLinear.of(self, ["gate_proj", "up_proj"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x) if self.gate_up is not None else None  # [N, 2I] or None
        if gate_up is not None:
            gate, up = gate_up.chunk(2, dim=-1)  # two [N, I] views
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)  # [N, H] -> [N, I] each
        if torch.is_grad_enabled() and gate.requires_grad:
            # autograd keeps ``gate`` for silu's backward, so no in-place ops here
            return self.down_proj(F.silu(gate) * up)  # [N, I] -> [N, H]
        # inference: in place, no extra [N, I] temporaries (I = 18944: ~150 MB per 4096 bf16 tokens)
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))


def expert_suffixes(generation_expert: bool) -> tuple[str, ...]:
    """Parameter-name suffixes of the experts a model has: understanding (``""``) always, generation
    (``"_moe_gen"``) unless the model is understanding-only.  Modules look the generation expert up
    lazily (in lambdas), so an understanding-only model, whose routing never selects it, needs none."""
    return ("", "_moe_gen") if generation_expert else ("",)


class MoTAttention(nn.Module):
    def __init__(self, cfg: LLMConfig, generation_expert: bool = True):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.scale = 1.0 / math.sqrt(d)  # 1/sqrt(128), the flash-attention default of the reference
        # One parameter set per expert: un-suffixed (understanding) and ``_moe_gen`` (generation).
        self.experts = expert_suffixes(generation_expert)
        for sfx in self.experts:
            setattr(self, "q_proj" + sfx, Linear(h, cfg.num_heads * d, bias=True))
            setattr(self, "k_proj" + sfx, Linear(h, cfg.num_kv_heads * d, bias=True))
            setattr(self, "v_proj" + sfx, Linear(h, cfg.num_kv_heads * d, bias=True))
            setattr(self, "o_proj" + sfx, Linear(cfg.num_heads * d, h, bias=False))
            # QK-norm is BAGEL's addition to Qwen2 (``qk_norm=True`` forced at load, ARCHITECTURE 1.2):
            # one [d] weight shared by all heads
            setattr(self, "q_norm" + sfx, RMSNorm(d, cfg.rms_norm_eps))
            setattr(self, "k_norm" + sfx, RMSNorm(d, cfg.rms_norm_eps))
        self.qkv: dict[str, FusedLinear | None] = {}  # per expert suffix, set by fuse_projections (inference)

    def fuse_projections(self) -> None:
        for sfx in self.experts:
            self.qkv[sfx] = FusedLinear.of(self, [name + sfx for name in ("q_proj", "k_proj", "v_proj")])

    def _qkv(self, x: torch.Tensor, gen: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sfx = "_moe_gen" if gen else ""
        n, hq, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        fused = self.qkv.get(sfx)
        qkv = fused(x) if fused is not None else None  # [n, (hq + 2*hkv) * d] or None
        if qkv is not None:
            q, k, v = qkv.view(n, hq + 2 * hkv, d).split([hq, hkv, hkv], dim=1)  # views
        else:
            q = getattr(self, "q_proj" + sfx)(x).view(n, hq, d)  # [n, H] -> [n, hq, d]
            k = getattr(self, "k_proj" + sfx)(x).view(n, hkv, d)  # [n, H] -> [n, hkv, d]
            v = getattr(self, "v_proj" + sfx)(x).view(n, hkv, d)  # [n, H] -> [n, hkv, d]
        # norm over the last dim (d) before RoPE, the reference's order (ARCHITECTURE 5.6 steps 3-4)
        return getattr(self, "q_norm" + sfx)(q), getattr(self, "k_norm" + sfx)(k), v

    def forward(self, x, routing: ExpertRouting, cos, sin, plan: AttentionPlan, layer: int) -> torch.Tensor:
        # [n, heads, d] pieces; mixed batches gather/scatter them as one [n, hq + 2*hkv, d] tensor
        q, k, v = routing.apply_split(
            x, lambda t: self._qkv(t, False), lambda t: self._qkv(t, True),
            [self.num_heads, self.num_kv_heads, self.num_kv_heads],
        )
        # RoPE is shared by both experts: positions, not experts, decide the rotation
        q = apply_rotary(q, cos, sin)  # [N, hq, d]
        k = apply_rotary(k, cos, sin)  # [N, hkv, d]; cached after RoPE (ARCHITECTURE 9.1): never re-rotated
        out = attend(plan, layer, q, k, v, self.scale).reshape(x.shape[0], -1)  # [N, hq, d] -> [N, hq*d]
        return routing.apply(out, self.o_proj, lambda t: self.o_proj_moe_gen(t))  # [N, hq*d] -> [N, H]


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, generation_expert: bool = True):
        super().__init__()
        h = cfg.hidden_size
        self.self_attn = MoTAttention(cfg, generation_expert)
        self.experts = expert_suffixes(generation_expert)
        for sfx in self.experts:
            setattr(self, "mlp" + sfx, MLP(h, cfg.intermediate_size))
            setattr(self, "input_layernorm" + sfx, RMSNorm(h, cfg.rms_norm_eps))
            setattr(self, "post_attention_layernorm" + sfx, RMSNorm(h, cfg.rms_norm_eps))

    def fuse_projections(self) -> None:
        self.self_attn.fuse_projections()
        for sfx in self.experts:
            getattr(self, "mlp" + sfx).fuse_projections()

    def expert_weights(self, sfx: str) -> "ExpertWeights | None":
        """Expert ``sfx``'s tensors for :func:`context_query_layer`, or ``None`` unless its q/k/v and
        gate/up products are fused and still stand for its layers (not replaced, converted or trained)."""
        attn, mlp = self.self_attn, getattr(self, "mlp" + sfx)
        qkv, gate_up = attn.qkv.get(sfx), mlp.gate_up
        if qkv is None or gate_up is None or not qkv.usable() or not gate_up.usable():
            return None
        o_proj, down = getattr(attn, "o_proj" + sfx), mlp.down_proj
        if type(o_proj) is not Linear or type(down) is not Linear:
            return None
        return ExpertWeights(
            getattr(self, "input_layernorm" + sfx).weight, qkv.weight, qkv.bias,
            getattr(attn, "q_norm" + sfx).weight, getattr(attn, "k_norm" + sfx).weight, o_proj.weight,
            getattr(self, "post_attention_layernorm" + sfx).weight, gate_up.weight, down.weight,
        )

    def forward(self, x, routing: ExpertRouting, cos, sin, plan: AttentionPlan, layer: int) -> torch.Tensor:
        # pre-norm residual block; x stays [N, H] throughout
        a = routing.apply(x, self.input_layernorm, lambda t: self.input_layernorm_moe_gen(t))
        x = x + self.self_attn(a, routing, cos, sin, plan, layer)
        # norm and MLP fused into one routed map: one gather/scatter for both
        m = routing.apply(
            x,
            lambda t: self.mlp(self.post_attention_layernorm(t)),
            lambda t: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(t)),
        )
        return x + m


class ExpertWeights(NamedTuple):
    """One expert's tensors in one decoder layer, as :func:`context_query_layer` reads them."""

    input_norm: torch.Tensor  # [H]
    qkv_weight: torch.Tensor  # [(hq + 2*hkv) * d, H], the fused q/k/v projection
    qkv_bias: torch.Tensor  # [(hq + 2*hkv) * d]
    q_norm: torch.Tensor  # [d]
    k_norm: torch.Tensor  # [d]
    o_proj: torch.Tensor  # [H, hq * d]
    post_norm: torch.Tensor  # [H]
    gate_up: torch.Tensor  # [2I, H], the fused gate/up projection
    down: torch.Tensor  # [H, I]


@dataclass(frozen=True)
class LayerShape:
    """The decoder layer's sizes and constants that :func:`context_query_layer` needs (plain numbers,
    which a compiled caller treats as constants)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    scale: float


def _expert_qkv(a: torch.Tensor, w: ExpertWeights, shape: LayerShape) -> torch.Tensor:
    # [n, H] -> one [n, hq + 2*hkv, d] product; q and k normed per head, in place
    n, hq, hkv, d = a.shape[0], shape.num_heads, shape.num_kv_heads, shape.head_dim
    qkv = linear(a, w.qkv_weight, w.qkv_bias).view(n, hq + 2 * hkv, d)
    rms_norm_heads_(qkv[:, : hq + hkv], (w.q_norm, w.k_norm), (hq, hkv), shape.eps)
    return qkv


def _expert_mlp(x: torch.Tensor, w: ExpertWeights, shape: LayerShape) -> torch.Tensor:
    # post-attention norm and SwiGLU: [n, H] -> [n, 2I] -> [n, I] -> [n, H]
    gate, up = linear(rms_norm(x, w.post_norm, shape.eps), w.gate_up).chunk(2, dim=-1)
    return linear(F.silu(gate).mul_(up), w.down)  # silu's new tensor scaled in place


def context_query_layer(
    x: torch.Tensor,
    gen: ExpertWeights,
    und: ExpertWeights,
    und_index: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    contexts: list[tuple[torch.Tensor | None, torch.Tensor | None]],
    lengths: list[int],
    shape: LayerShape,
) -> torch.Tensor:
    """One decoder layer over packed samples that are each a single block seeing its fixed
    context (a denoising step's latent blocks, one per guidance branch): ``x [N, H] -> [N, H]``.

    The same computation as :meth:`MoTDecoderLayer.forward` with the generation expert on all rows
    and the understanding expert's rows ``und_index`` (the image markers) overwritten, written as
    one function of tensors - no modules, caches or hooks - so that ``torch.compile`` can take it
    whole and fuse the element-wise work between the products (norms, RoPE, SiLU, residuals):
    :func:`unimedvl.inference.compilation.compile_denoising`.  ``contexts[s]`` are sample
    ``s``'s cached keys/values ``[hkv, L_s, d]`` (or ``None``), ``lengths[s]`` its token count.
    """
    hq, hkv = shape.num_heads, shape.num_kv_heads
    qkv = _expert_qkv(rms_norm(x, gen.input_norm, shape.eps), gen, shape)  # [N, hq + 2*hkv, d]
    qkv[und_index] = _expert_qkv(rms_norm(x[und_index], und.input_norm, shape.eps), und, shape)
    # RoPE is shared by both experts, and q and k rotate as one [N, hq + hkv, d] view
    q, k = apply_rotary(qkv[:, : hq + hkv], cos, sin).split([hq, hkv], dim=1)
    v = qkv[:, hq + hkv :]
    o = attend_contexts(q, k, v, contexts, lengths, shape.scale).reshape(x.shape[0], -1)  # [N, hq*d]
    attn = linear(o, gen.o_proj)  # [N, H]
    attn[und_index] = linear(o[und_index], und.o_proj)
    x = attn.add_(x)  # the residual, into the new projection (the input x is left as it is)
    m = _expert_mlp(x, gen, shape)
    m[und_index] = _expert_mlp(x[und_index], und, shape)
    return m.add_(x)


class Qwen2MoTModel(nn.Module):
    def __init__(self, cfg: LLMConfig, generation_expert: bool = True):
        super().__init__()
        self.cfg = cfg
        # V = 152064 rows: the Qwen2.5 tokenizer's 151665 ids padded up (ARCHITECTURE 4.1); one table
        # for both experts, since only text-vocabulary tokens (und) are looked up
        self.embed_tokens = uninitialized_embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([MoTDecoderLayer(cfg, generation_expert) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if generation_expert:
            self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # the function that runs a layer of a context query (see context_query_weights); replaced by its
        # compiled form from outside (unimedvl.inference.compilation), never saved
        self.context_query_layer: Callable[..., torch.Tensor] = context_query_layer
        self.layer_shape = LayerShape(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, 1.0 / math.sqrt(cfg.head_dim))

    def fuse_projections(self) -> None:
        """Prepare inference: each expert's q/k/v and gate/up projections as one product
        (:class:`~unimedvl.model.layers.FusedLinear`; same parameters and memory).  Layers that are
        not plain linear layers (LoRA, quantised, sharded) stay as they are."""
        for layer in self.layers:
            layer.fuse_projections()

    def context_query_weights(self, routing: ExpertRouting, plan: AttentionPlan) -> list[tuple[ExpertWeights, ExpertWeights]] | None:
        """Each layer's (generation, understanding) weights when this forward can run as
        :func:`context_query_layer` calls, else ``None`` (the layers run as modules).

        It can when: no gradient is wanted; the generation expert holds most tokens and the
        understanding expert the rest (a denoising query: latents and their image markers); every
        sample is one block that sees its whole context and does not join it (no mask, no cache
        update, the ``sdpa`` backend); no hook sits on a layer (device placement, checkpointing);
        and both experts' projections are fused plain layers (not LoRA, quantised or converted).
        """
        if torch.is_grad_enabled() or routing.all_und or routing.all_gen or routing.und_index.numel() > routing.gen_index.numel():
            return None
        if plan.backend != "sdpa" or plan.update_cache or any(m is not None for m in plan.masks):
            return None
        if self._forward_hooks or self._forward_pre_hooks:
            return None
        weights = []
        for layer in self.layers:
            if layer._forward_hooks or layer._forward_pre_hooks:
                return None
            gen, und = layer.expert_weights("_moe_gen"), layer.expert_weights("")
            if gen is None or und is None:
                return None
            weights.append((gen, und))
        return weights

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # [N] -> cos, sin [N, d], rounded to ``dtype`` as the reference does (ARCHITECTURE 10.3)
        return rotary_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, dtype)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        routing: ExpertRouting,
        plan: AttentionPlan,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``x [N, H]`` packed input embeddings -> final hidden states ``[N, H]`` (after the per-expert final norm)."""
        # ``rope`` comes precomputed from the forward plan, so denoising steps that reuse one plan
        # (same positions every step) do not rebuild the tables
        cos, sin = rope if rope is not None else self.rotary(position_ids, x.dtype)  # [N, d] each
        weights = self.context_query_weights(routing, plan)
        if weights is not None:  # a denoising step: each layer as one function of tensors
            lengths = plan.layout.sample_lengths
            for i, (gen, und) in enumerate(weights):
                contexts = [(None, None) if c is None else c.get(i) for c in plan.caches]
                x = self.context_query_layer(x, gen, und, routing.und_index, cos, sin, contexts, lengths, self.layer_shape)
            return routing.apply(x, self.norm, lambda t: self.norm_moe_gen(t))
        for i, layer in enumerate(self.layers):
            # activation checkpointing, when training wants it, is hooked onto each layer from outside
            # (unimedvl.training.parallelize), like FSDP: the forward stays the same
            x = layer(x, routing, cos, sin, plan, i)
        return routing.apply(x, self.norm, lambda t: self.norm_moe_gen(t))


class Qwen2MoTForCausalLM(nn.Module):
    def __init__(self, cfg: LLMConfig, generation_expert: bool = True):
        super().__init__()
        self.model = Qwen2MoTModel(cfg, generation_expert)
        # untied from embed_tokens (``tie_word_embeddings=False``, ARCHITECTURE 1.2); applied by the
        # caller only at the und positions whose logits are wanted
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
