"""PSNR and SSIM for the interleaved tasks (EVALUATION.md 4.3), with the conventions stated.

* the generated image is compared at the reference's resolution (resized bicubic when the sizes
  differ), as 8-bit data with ``data_range = 255``, over the full image (no background mask);
* ``mode="gray"`` (MRI super-resolution, T2<->FLAIR) converts both images to one luma channel
  (ITU-R 601-2, as PIL's ``L``); ``mode="rgb"`` (H&E->IHC staining) keeps three channels: PSNR over
  all of them, SSIM per channel and averaged;
* SSIM uses a uniform 7x7 window, sample covariance, K1 = 0.01, K2 = 0.03 and averages the map
  without the 3-pixel border - scikit-image's ``structural_similarity`` defaults, computed here in
  PyTorch so batches run on any device (the tests check both against scikit-image).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TASK_MODES = {"staining": "rgb", "sr4x": "gray", "t2_to_flair": "gray", "flair_to_t2": "gray"}


def prepare_pair(output: Image.Image | np.ndarray, reference: Image.Image | np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Both images as uint8 arrays at the reference's size: ``[H, W]`` (gray) or ``[H, W, 3]`` (rgb)."""
    if mode not in ("gray", "rgb"):
        raise ValueError(f"mode must be gray or rgb, got {mode!r}")
    out = output if isinstance(output, Image.Image) else Image.fromarray(np.asarray(output))
    ref = reference if isinstance(reference, Image.Image) else Image.fromarray(np.asarray(reference))
    pil_mode = "L" if mode == "gray" else "RGB"
    out, ref = out.convert(pil_mode), ref.convert(pil_mode)
    if out.size != ref.size:
        out = out.resize(ref.size, Image.BICUBIC)
    return np.asarray(out), np.asarray(ref)


def psnr(output: np.ndarray, reference: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB over every pixel and channel (``inf`` for identical images)."""
    if output.shape != reference.shape:
        raise ValueError(f"shapes differ: output {output.shape}, reference {reference.shape}")
    mse = float(np.mean((output.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def _ssim_channel(x: torch.Tensor, y: torch.Tensor, data_range: float, win: int) -> torch.Tensor:
    """SSIM of ``[N, 1, H, W]`` float64 images -> ``[N]``."""
    kernel = torch.full((1, 1, win, win), 1.0 / win**2, dtype=x.dtype, device=x.device)
    filt = lambda t: F.conv2d(t, kernel)  # noqa: E731  (valid: the map is already without the border)
    n = win * win
    cov_norm = n / (n - 1)
    ux, uy = filt(x), filt(y)
    vx = cov_norm * (filt(x * x) - ux * ux)
    vy = cov_norm * (filt(y * y) - uy * uy)
    vxy = cov_norm * (filt(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def ssim(output: np.ndarray, reference: np.ndarray, data_range: float = 255.0, win_size: int = 7) -> float:
    """Structural similarity of ``[H, W]`` or ``[H, W, C]`` images (per channel, averaged)."""
    if output.shape != reference.shape:
        raise ValueError(f"shapes differ: output {output.shape}, reference {reference.shape}")
    if min(output.shape[:2]) < win_size:
        raise ValueError(f"images of {output.shape[:2]} are smaller than the {win_size}x{win_size} SSIM window")
    x = torch.from_numpy(np.ascontiguousarray(output, dtype=np.float64))
    y = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float64))
    if x.ndim == 2:
        x, y = x[None], y[None]
    else:
        x, y = x.permute(2, 0, 1), y.permute(2, 0, 1)
    return float(_ssim_channel(x[:, None], y[:, None], data_range, win_size).mean())


def pixel_scores(output, reference, task: str) -> dict[str, float]:
    """PSNR and SSIM of one generated image against its reference under ``task``'s convention."""
    if task not in TASK_MODES:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASK_MODES)}")
    out, ref = prepare_pair(output, reference, TASK_MODES[task])
    return {"psnr": psnr(out, ref), "ssim": ssim(out, ref)}
