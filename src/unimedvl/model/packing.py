"""Build :class:`~unimedvl.model.PackedBatch` objects: the one place that encodes the sequence layout.

Rules (ARCHITECTURE 5.1-5.2), per sample, with a RoPE counter ``r``:

* text segment ``[tokens]`` -> causal split, positions ``r, r+1, ...``; ``r`` advances by its length;
* ViT image ``<|vision_start|> patches <|vision_end|>`` -> full split, every token at ``r``; ``r += 1``;
* clean latent image (condition) ``<|vision_start|> latents(t=0) <|vision_end|>`` -> full split at ``r``; ``r += 1``;
* noisy latent image (generation target) -> noise split at ``r``; ``r`` is **not** advanced.

Training packs many samples (each starting at ``r = 0``); inference builds one sample per context
update, starting at the context's ``rope``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import UniMedVLConfig
from .attention import AttentionLayout, Split
from .layers import grid_position_ids
from .patching import patchify
from .unimedvl import PackedBatch
from ..tokenizer import SpecialTokens


@dataclass
class _Sample:
    rope: int
    splits: list[Split] = field(default_factory=list)


class PackedBatchBuilder:
    """Append blocks sample by sample, then :meth:`build` one packed batch.

    Every ``add_*`` returns the packed indices of the block's content tokens, which callers use to
    pick logits, labels or velocities.
    """

    def __init__(self, config: UniMedVLConfig, special: SpecialTokens):
        self.config = config
        self.special = special
        self._samples: list[_Sample] = []
        self._n = 0
        self._positions: list[int] = []
        self._token_ids: list[int] = []
        self._token_index: list[int] = []
        self._vit_patches: list[torch.Tensor] = []
        self._vit_pos: list[torch.Tensor] = []
        self._vit_seqlens: list[int] = []
        self._vit_index: list[int] = []
        self._latents: list[torch.Tensor] = []
        self._latent_pos: list[torch.Tensor] = []
        self._latent_t: list[float] = []
        self._latent_seqlens: list[int] = []
        self._latent_index: list[int] = []
        self._logit_index: list[int] = []

    # ---- samples --------------------------------------------------------------------------
    def new_sample(self, rope: int = 0) -> "PackedBatchBuilder":
        """Start a new packed sample whose first block sits at RoPE position ``rope``."""
        self._samples.append(_Sample(rope))
        return self

    @property
    def rope(self) -> int:
        """Next RoPE position of the current sample."""
        return self._current.rope

    @property
    def _current(self) -> _Sample:
        if not self._samples:
            self.new_sample(0)
        return self._samples[-1]

    def _reserve(self, n: int, mode: str) -> list[int]:
        idx = list(range(self._n, self._n + n))
        self._n += n
        self._current.splits.append(Split(n, mode))
        return idx

    # ---- blocks ---------------------------------------------------------------------------
    def add_tokens(self, ids: list[int], logits: bool = False) -> list[int]:
        """A causal text split of exactly ``ids`` (no wrapping; e.g. one decoding step)."""
        if not ids:
            raise ValueError("a text block needs at least one token")
        s = self._current
        idx = self._reserve(len(ids), "causal")
        self._positions += range(s.rope, s.rope + len(ids))
        s.rope += len(ids)
        self._token_ids += ids
        self._token_index += idx
        if logits:
            self._logit_index += idx
        return idx

    def add_text(self, content_ids: list[int], logits: bool = False) -> list[int]:
        """A text item ``<|im_start|> content <|im_end|>``; returns the indices of all its tokens."""
        return self.add_tokens([self.special.bos, *content_ids, self.special.eos], logits=logits)

    def add_text_with_labels(self, content_ids: list[int]) -> tuple[list[int], list[int]]:
        """A text item whose content carries loss: inputs ``<|im_start|> t1..tn <|im_end|>``,
        logits at ``<|im_start|> t1..tn`` predicting ``t1..tn <|im_end|>`` (ARCHITECTURE 8.2).
        Returns (logit indices, labels)."""
        ids = [self.special.bos, *content_ids, self.special.eos]
        idx = self.add_tokens(ids)
        self._logit_index += idx[:-1]
        return idx[:-1], ids[1:]

    def skip_position(self) -> None:
        """A dropped image (conditioning dropout) still consumes one RoPE position (ARCHITECTURE 5.2)."""
        self._current.rope += 1

    def _image_block(self, n: int, mode: str) -> tuple[int, list[int]]:
        s = self._current
        idx = self._reserve(n + 2, mode)
        self._positions += [s.rope] * (n + 2)
        self._token_ids += [self.special.start_of_image, self.special.end_of_image]
        self._token_index += [idx[0], idx[-1]]
        return s.rope, idx[1:-1]

    def add_vit_image(self, pixels: torch.Tensor) -> list[int]:
        """A ViT block of ``pixels [3, h, w]`` in [-1, 1] (``h, w`` multiples of the patch size)."""
        p, grid = self.config.vit.patch_size, self.config.vit_grid
        patches = patchify(pixels, p)
        rows, cols = pixels.shape[1] // p, pixels.shape[2] // p
        _, idx = self._image_block(patches.shape[0], "full")
        self._current.rope += 1
        self._vit_patches.append(patches)
        self._vit_pos.append(grid_position_ids(rows, cols, grid))
        self._vit_seqlens.append(patches.shape[0])
        self._vit_index += idx
        return idx

    def add_latent_image(self, tokens: torch.Tensor, grid_hw: tuple[int, int], t: float, noisy: bool) -> list[int]:
        """A latent block of ``tokens [h*w, p*p*C]`` at flow time ``t``.

        ``noisy=True``: a generation target (noise split; the RoPE counter stays); ``noisy=False``:
        a clean condition (full split, normally ``t=0``; the counter advances).
        """
        h, w = grid_hw
        if tokens.shape[0] != h * w:
            raise ValueError(f"{tokens.shape[0]} latent tokens do not fill a {h}x{w} grid")
        _, idx = self._image_block(h * w, "noise" if noisy else "full")
        if not noisy:
            self._current.rope += 1
        self._latents.append(tokens)
        self._latent_pos.append(grid_position_ids(h, w, self.config.max_latent_size))
        self._latent_t.append(float(t))
        self._latent_seqlens.append(h * w)
        self._latent_index += idx
        return idx

    # ---- result ---------------------------------------------------------------------------
    def build(self, device: torch.device | str = "cpu") -> PackedBatch:
        if not self._n:
            raise ValueError("an empty packed batch")
        empty = [i for i, s in enumerate(self._samples) if not s.splits]
        if empty:
            raise ValueError(f"packed sample(s) {empty} have no tokens")
        samples = [s.splits for s in self._samples]
        long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        batch = PackedBatch(
            layout=AttentionLayout(samples),
            position_ids=long(self._positions),
            token_ids=long(self._token_ids),
            token_index=long(self._token_index),
            logit_index=long(self._logit_index) if self._logit_index else None,
        )
        if self._vit_patches:
            batch.vit_patches = torch.cat(self._vit_patches).to(device)
            batch.vit_position_ids = torch.cat(self._vit_pos).to(device)
            batch.vit_seqlens = list(self._vit_seqlens)
            batch.vit_index = long(self._vit_index)
        if self._latents:
            batch.latents = torch.cat(self._latents).to(device)
            batch.latent_position_ids = torch.cat(self._latent_pos).to(device)
            batch.latent_timesteps = torch.tensor(self._latent_t, dtype=torch.float32, device=device)
            batch.latent_seqlens = list(self._latent_seqlens)
            batch.latent_index = long(self._latent_index)
        return batch
