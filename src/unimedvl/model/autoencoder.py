"""FLUX.1-style convolutional autoencoder (ARCHITECTURE 2.3, 3.5, 7.1, 7.5).

Encoder: ``conv_in`` -> per resolution level ``num_res_blocks`` ResNet blocks and a stride-2
downsample (all but the last level) -> mid (ResNet, attention, ResNet) -> GroupNorm -> swish ->
``conv_out`` giving ``2*z`` channels (mean and log-variance).  The decoder mirrors it with
``num_res_blocks + 1`` blocks per level and nearest x2 upsampling.  Widths are ``ch*ch_mult``.

The posterior sample, scale and shift live in :meth:`Autoencoder.encode` / :meth:`Autoencoder.decode`;
the noise is an argument so callers own the randomness.

Design, all from the FLUX.1 autoencoder that BAGEL ships as ``ae.safetensors`` (ARCHITECTURE 2.3):

* ``ch 128``, ``ch_mult (1, 2, 4, 4)``: widths 128/256/512/512, three stride-2 stages, so f = 8;
* ``z_channels 16``, latents scaled by ``0.3611`` after shifting by ``0.1159`` (FLUX's constants,
  chosen there to give the latents roughly unit variance for the flow model);
* GroupNorm(32, eps 1e-6) and swish everywhere, attention only in the mid block (single head, 512);
* module names ``down.{i}.block`` / ``up.{i}.upsample`` / ``mid.attn_1`` mirror the checkpoint keys,
  including the empty ``attn`` lists per level, so ``ae.safetensors`` loads without renaming.

Shapes: ``B`` images, ``c`` channels, ``h x w`` spatial size; ``z`` = ``z_channels``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AutoencoderConfig
from .layers import Conv2d


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6, affine=True)  # FLUX's Normalize; every width is a multiple of 32


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)  # FLUX's form, kept literally: in bf16 it rounds unlike F.silu


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))  # [B, in_ch, h, w] -> [B, out_ch, h, w]
        h = self.conv2(_swish(self.norm2(h)))
        # the 1x1 shortcut exists only where the width changes (its keys are absent elsewhere)
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, 1x1-conv projections."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q, self.k, self.v = Conv2d(ch, ch, 1), Conv2d(ch, ch, 1), Conv2d(ch, ch, 1)
        self.proj_out = Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        # every pixel is a token: [B, c, h, w] -> [B, 1 head, h*w, c]
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(n), self.k(n), self.v(n)))
        a = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(c) = 1/sqrt(512) (ARCHITECTURE 10.5)
        return x + self.proj_out(a.transpose(2, 3).reshape(b, c, h, w))  # back to [B, c, h, w]


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # asymmetric pad (right and bottom by one pixel), then an unpadded stride-2 3x3 conv, as in
        # FLUX; symmetric padding=1 would shift every window one pixel from what the weights learned
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # [B, c, h, w] -> [B, c, h/2, w/2]


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [B, c, h, w] -> [B, c, 2h, 2w]


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
        self.conv_in = Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
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
        self.conv_out = Conv2d(in_ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # [B, 3, h, w] -> [B, 128, h, w]
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):  # levels 0-2 only
                h = level.downsample(h)
        h = self.mid(h)  # [B, 512, h/8, w/8]
        return self.conv_out(_swish(self.norm_out(h)))  # [B, 2z, h/8, w/8]: mean ++ logvar


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        in_ch = widths[-1]
        self.conv_in = Conv2d(cfg.z_channels, in_ch, 3, padding=1)
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
        self.conv_out = Conv2d(in_ch, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # [B, z, h, w] -> [B, 512, h, w]
        for level in reversed(self.up):  # levels 3, 2, 1, 0: coarse to fine
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):  # after levels 3-1
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))  # [B, 128, 8h, 8w] -> [B, 3, 8h, 8w]


class Autoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        # inputs are cast to this: pixels and latents arrive in fp32, the weights may be bf16
        # (ARCHITECTURE 10.1), and there is no autocast to reconcile them
        return self.encoder.conv_in.weight.dtype

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images [B, 3, h, w]`` in [-1, 1] -> posterior ``(mean, logvar)``, each ``[B, z, h/8, w/8]``."""
        m = self.encoder(images.to(self.dtype))  # [B, 2z, h/8, w/8]
        return m.chunk(2, dim=1)  # mean first, as FLUX's DiagonalGaussian splits it

    def encode(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled latents ``scale*(z - shift)``.  With ``noise`` the posterior is sampled
        (``z = mean + exp(logvar/2)*noise``, as the reference does even at inference); without, ``z = mean``."""
        mean, logvar = self.moments(images)
        # no logvar clamp, matching the reference (ARCHITECTURE 7.1); noise is [B, z, h/8, w/8]
        z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise.to(mean.dtype)
        return self.cfg.scale_factor * (z - self.cfg.shift_factor)  # 0.3611 * (z - 0.1159)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B, z, h, w]`` -> images ``[B, 3, 8h, 8w]`` (unclamped, about [-1, 1])."""
        z = latents.to(self.dtype) / self.cfg.scale_factor + self.cfg.shift_factor  # undo encode's scaling
        return self.decoder(z)  # clamping and uint8 truncation are the caller's (ARCHITECTURE 7.5)
