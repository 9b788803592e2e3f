"""SigLIP NaViT vision encoder and the connector into the LLM (ARCHITECTURE 3.2, 3.3, 6).

* variable resolution: every image keeps its aspect ratio; its 14x14 patches are flattened in
  (row-in-patch, column-in-patch, channel) order and several images are packed by concatenation;
* the patch embedding is a ``Linear(3*P*P -> D)`` (the official loaders convert the SigLIP conv);
* a learned absolute position table of ``G x G`` rows (G = 70) indexed ``row*G + col``, no interpolation;
* pre-LN transformer layers, bidirectional attention restricted to each image, then ``post_layernorm``.

Sizes are SigLIP so400m/14 (ARCHITECTURE 2.2): D = 1152, 16 heads of 72, MLP 4304, tanh-GELU,
LayerNorm eps 1e-6.  Only 26 of SigLIP's 27 layers exist: BAGEL takes the penultimate layer's
output and then still applies the final ``post_layernorm`` (ARCHITECTURE 1.2, 12 item 12).
No RoPE and no pooling head (``rope=False`` at load; BAGEL feeds the patch tokens to the LLM).

Shapes: ``N`` packed patches of all images, ``D`` ViT width, ``P`` patch size (14).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ViTConfig
from .attention import varlen_attention
from .layers import gelu_tanh, uninitialized_embedding


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        # a Linear, not SigLIP's Conv2d(3, D, P, stride=P): the checkpoint stores it flattened
        # [D, 3*P*P] with columns ordered (ky, kx, c), matching how patchify flattens a patch
        self.patch_embedding = nn.Linear(3 * cfg.patch_size**2, cfg.hidden_size)
        # 70*70 = 4900 learned rows (image_size 980 / P 14); exists because BAGEL loads with rope=False
        self.position_embedding = uninitialized_embedding(cfg.num_patches_per_side**2, cfg.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # pixels arrive in fp32 (ARCHITECTURE 10.1); the reference's autocast cast them at this first
        # linear, we have no autocast, so cast here or bf16 weights would meet fp32 input
        x = self.patch_embedding(patches.to(self.patch_embedding.weight.dtype))  # [N, 3*P*P] -> [N, D]
        return x + self.position_embedding(position_ids)  # + table rows row*70 + col: [N, D]


class SiglipAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.scale = 1.0 / math.sqrt(cfg.head_dim)  # 1/sqrt(72)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        n = x.shape[0]
        shape = (n, self.num_heads, self.head_dim)
        # [N, D] -> [N, 16, 72] each; plain multi-head (no GQA, no q/k-norm, no RoPE)
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        # each image attends only to its own patches: seqlens splits the packed N
        return self.out_proj(varlen_attention(q, k, v, seqlens, self.scale).reshape(n, -1))  # [N, D]


class SiglipMLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))  # [N, D] -> [N, 4304] -> [N, D]


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), seqlens)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        # a bare container: it only puts the layers under the checkpoint's ``encoder.layers.{j}`` keys
        self.layers = nn.ModuleList([SiglipEncoderLayer(cfg) for _ in range(cfg.num_layers)])


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        """``patches [N, 3*P*P]`` of the packed images, ``position_ids [N]``, ``seqlens`` patches per image -> ``[N, D]``."""
        x = self.embeddings(patches, position_ids)  # [N, D]
        for layer in self.encoder.layers:
            x = layer(x, seqlens)  # [N, D]; training may hook activation checkpointing onto the layer from outside
        return self.post_layernorm(x)  # after layer 26 of 27, as BAGEL does (ARCHITECTURE 6.3)


class SiglipVisionModel(nn.Module):
    """Holds ``vision_model`` so that parameter names match the official ``vit_model.vision_model.*`` keys."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg)

    def forward(self, patches, position_ids, seqlens):
        return self.vision_model(patches, position_ids, seqlens)


class Connector(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))``: ViT width -> LLM width (ARCHITECTURE 3.3, 6.4).

    ``[N, 1152] -> [N, 3584] -> [N, 3584]`` in the official model; the tanh GELU is BAGEL's
    ``connector_act="gelu_pytorch_tanh"``.  The fixed ``vit_pos_embed`` table is added by the caller.
    """

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))
