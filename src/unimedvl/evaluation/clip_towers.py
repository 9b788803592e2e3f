"""The two towers of an open_clip "custom text" CLIP such as BiomedCLIP, in plain PyTorch.

* :class:`VisionTransformer` - a ViT whose module tree follows the timm layout open_clip stores
  under ``visual.trunk.`` (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.{norm1,
  attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``): pre-norm blocks, LayerNorm eps 1e-6,
  exact GELU, the class token after the final norm as the pooled output;
* :class:`TextTower` - a Hugging Face BERT (``text.transformer.``, built from a config, no
  download) pooled at the first token of the last hidden state, then the two-layer MLP projection
  (``text.proj.0``, GELU, ``text.proj.2``, no biases);
* :class:`ClipTowers` - both, with the image projection ``visual.head.proj``; embeddings come out
  L2-normalised.

Model code only: :mod:`.biomedclip` reads checkpoints and preprocesses inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """``[B, 3, S, S]`` normalised pixels -> ``[B, dim]`` (the normed class token)."""

    def __init__(self, image_size: int, patch: int, dim: int, depth: int, heads: int, mlp_hidden: int):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        self.image_size = image_size
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {tuple(pixels.shape[-2:])}")
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


class VisualHead(nn.Module):
    def __init__(self, width: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(width, embed_dim, bias=False)

    def forward(self, x):
        return self.proj(x)


class Visual(nn.Module):
    def __init__(self, trunk: VisionTransformer, embed_dim: int, width: int):
        super().__init__()
        self.trunk = trunk
        self.head = VisualHead(width, embed_dim)

    def forward(self, pixels):
        return self.head(self.trunk(pixels))


class TextTower(nn.Module):
    """A BERT encoder (any ``transformers`` model taking ``input_ids``/``attention_mask``), pooled at
    the first token and projected by a bias-free two-layer MLP."""

    def __init__(self, transformer: nn.Module, width: int, embed_dim: int):
        super().__init__()
        self.transformer = transformer
        hidden = (width + embed_dim) // 2
        self.proj = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, embed_dim, bias=False))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.proj(hidden[:, 0])


class ClipTowers(nn.Module):
    def __init__(self, visual: Visual, text: TextTower):
        super().__init__()
        self.visual = visual
        self.text = text
        self.logit_scale = nn.Parameter(torch.zeros(()))  # part of the checkpoint; unused for scoring

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(pixels), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(input_ids, attention_mask), dim=-1)
