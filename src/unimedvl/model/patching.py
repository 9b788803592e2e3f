"""Patchify / unpatchify of images and latents (ARCHITECTURE 6.2, 7.2).

Both follow one rule: ``(C, h*p, w*p) -> (h, w, p, p, C) -> (h*w, p*p*C)``, tokens in row-major
(row, column) order and each token flattened as (row-in-patch, column-in-patch, channel).

The order is not free: the ViT's ``patch_embedding`` columns are stored as ``(ky, kx, c)``
(ARCHITECTURE 3.2) and ``vae2llm``/``llm2vae`` were trained on ``(p, q, c)`` latent vectors (7.2);
any other flattening silently scrambles their inputs.  The row-major token order is what the
``row*G + col`` position ids assume.
"""

from __future__ import annotations

import torch


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[C, H, W]`` (H, W multiples of ``p``) -> ``[(H/p)*(W/p), p*p*C]``."""
    c, hh, ww = x.shape
    if hh % p or ww % p:
        raise ValueError(f"a {hh}x{ww} tensor cannot be cut into {p}x{p} patches")
    h, w = hh // p, ww // p
    # [C, h, p, w, p] -> [h, w, p, p, C] -> [h*w, p*p*C]
    return x.reshape(c, h, p, w, p).permute(1, 3, 2, 4, 0).reshape(h * w, p * p * c)


def unpatchify(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[h*w, p*p*C]`` -> ``[C, h*p, w*p]``."""
    c = tokens.shape[1] // (p * p)
    # [h, w, p, p, C] -> [C, h, p, w, p] -> [C, h*p, w*p]
    return tokens.reshape(h, w, p, p, c).permute(4, 0, 2, 1, 3).reshape(c, h * p, w * p)


def latent_to_tokens(z: torch.Tensor, h: int, w: int, p: int = 2) -> torch.Tensor:
    """A latent ``[C, >=h*p, >=w*p]`` cropped to ``h x w`` tokens -> ``[h*w, p*p*C]``."""
    return patchify(z[:, : h * p, : w * p], p)
