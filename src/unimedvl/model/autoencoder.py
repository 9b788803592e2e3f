"""FLUX.1-style convolutional autoencoder (ARCHITECTURE 2.3, 3.5, 7.1, 7.5).

Encoder: ``conv_in`` -> per resolution level ``num_res_blocks`` ResNet blocks and a stride-2
downsample (all but the last level) -> mid (ResNet, attention, ResNet) -> GroupNorm -> swish ->
``conv_out`` giving ``2*z`` channels (mean and log-variance).  The decoder mirrors it with
``num_res_blocks + 1`` blocks per level and nearest x2 upsampling.  Widths are ``ch*ch_mult``.

The posterior sample, scale and shift live in :meth:`Autoencoder.encode` / :meth:`Autoencoder.decode`;
the noise is an argument so callers own the randomness.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AutoencoderConfig


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, 1x1-conv projections."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q, self.k, self.v = nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(n), self.k(n), self.v(n)))
        a = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(c)
        return x + self.proj_out(a.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # zero-pad right and bottom by one pixel


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` list, empty ``attn`` list, optional ``downsample``/``upsample``."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch)
        self.attn_1 = AttnBlock(ch)
        self.block_2 = ResnetBlock(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        in_ch = cfg.ch
        for i, out_ch in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(in_ch, out_ch))
                in_ch = out_ch
            level = _Level(blocks)
            if i != len(widths) - 1:
                level.downsample = Downsample(out_ch)
            self.down.append(level)
        self.mid = _Mid(in_ch)
        self.norm_out = _norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        in_ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, in_ch, 3, padding=1)
        self.mid = _Mid(in_ch)
        levels: list[_Level] = []
        for i in reversed(range(len(widths))):  # the deepest level is processed first
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(in_ch, widths[i]))
                in_ch = widths[i]
            level = _Level(blocks)
            if i != 0:
                level.upsample = Upsample(in_ch)
            levels.insert(0, level)  # ``up`` is indexed by resolution level
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Autoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images [B, 3, h, w]`` in [-1, 1] -> posterior ``(mean, logvar)``, each ``[B, z, h/8, w/8]``."""
        m = self.encoder(images.to(self.dtype))
        return m.chunk(2, dim=1)

    def encode(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled latents ``scale*(z - shift)``.  With ``noise`` the posterior is sampled
        (``z = mean + exp(logvar/2)*noise``, as the reference does even at inference); without, ``z = mean``."""
        mean, logvar = self.moments(images)
        z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise.to(mean.dtype)
        return self.cfg.scale_factor * (z - self.cfg.shift_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B, z, h, w]`` -> images ``[B, 3, 8h, 8w]`` (unclamped, about [-1, 1])."""
        z = latents.to(self.dtype) / self.cfg.scale_factor + self.cfg.shift_factor
        return self.decoder(z)
