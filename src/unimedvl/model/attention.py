"""Attention over packed sequences: layouts, masks, KV caches and the attention kernels.

A packed forward concatenates the new tokens of several *samples*; each sample is a list of
*splits* (ARCHITECTURE 5.3) with one of three modes:

* ``causal`` - a text segment: each token sees the earlier tokens of its split and everything
  before the split;
* ``full``   - an image block (ViT or clean VAE): bidirectional within the split, plus everything before;
* ``noise``  - a noisy VAE block being generated: like ``full``, and no *other* split may see it.

Samples never see each other.  At inference a sample may also bring a :class:`KVCache` (its
context); every new token then sees the whole cache in addition (bottom-right aligned causal
masking, ARCHITECTURE 10.5).

Two kernels implement the same rules: ``sdpa`` (torch SDPA, one call per sample, a dense boolean
mask only when the split structure needs one) and ``flex`` (one flex-attention call over the whole
packed batch with a block mask; used for training on GPUs, cache-free).

Layouts and names used below:

* packed q/k/v arrive token-major, ``q [N, hq, d]`` and ``k, v [N, hkv, d]`` (N = packed new tokens,
  hq/hkv = query/key-value heads, d = head dim; 28/4/128 in the LLM, ARCHITECTURE 0); the kernels
  want heads first, so each sample is transposed to ``[h, n, d]`` and back;
* GQA is left to the kernels (``enable_gqa``): the 4 kv heads are never repeated to 28 in memory;
* the KV cache stores ``[hkv, length, d]`` per layer, already heads-first, so a sample's cached keys
  are SDPA operands without a copy;
* the reference uses flash-attention varlen kernels (ARCHITECTURE 10.5); SDPA with a bottom-right
  aligned mask is its drop-in (its own ``is_causal`` is top-left aligned, wrong once a cache exists).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

SplitMode = Literal["causal", "full", "noise"]
_MODES = ("causal", "full", "noise")


@dataclass(frozen=True)
class Split:
    """``length`` consecutive tokens of one sample attended under one ``mode`` (a text segment, an image block)."""

    length: int
    mode: SplitMode

    def __post_init__(self):
        if self.mode not in _MODES:
            raise ValueError(f"split mode must be one of {_MODES}, got {self.mode!r}")
        if self.length <= 0:
            raise ValueError(f"split length must be positive, got {self.length}")


@dataclass
class AttentionLayout:
    """The packed query tokens: ``samples[s]`` lists the splits of sample ``s`` in order."""

    samples: list[list[Split]]

    @property
    def sample_lengths(self) -> list[int]:
        return [sum(sp.length for sp in splits) for splits in self.samples]

    @property
    def num_tokens(self) -> int:
        return sum(self.sample_lengths)

    def sample_slices(self) -> list[slice]:
        out, start = [], 0
        for n in self.sample_lengths:
            out.append(slice(start, start + n))
            start += n
        return out

    def sample_mask(self, s: int, cache_len: int, device: torch.device) -> torch.Tensor | None:
        """Boolean mask ``[n_new, cache_len + n_new]`` (True = may attend) of sample ``s``, or
        ``None`` when every query may see every key (a single full/noise split)."""
        splits = self.samples[s]
        if len(splits) == 1 and (splits[0].mode != "causal" or splits[0].length == 1):
            # one block that sees itself and the whole cache (e.g. a decoding step); passing no mask
            # also lets SDPA pick its fused flash/efficient kernels
            return None
        n = sum(sp.length for sp in splits)
        # per new token: index of its split, [n]
        split_id = torch.repeat_interleave(
            torch.arange(len(splits), device=device), torch.tensor([sp.length for sp in splits], device=device)
        )
        is_causal = torch.tensor([sp.mode == "causal" for sp in splits], device=device)[split_id]  # [n]
        is_noise = torch.tensor([sp.mode == "noise" for sp in splits], device=device)[split_id]  # [n]
        idx = torch.arange(n, device=device)
        q_split, k_split = split_id[:, None], split_id[None, :]  # [n, 1], [1, n]
        same = q_split == k_split  # [n, n]
        within = same & (~is_causal[:, None] | (idx[None, :] <= idx[:, None]))  # ARCHITECTURE 5.3 rules 1-3, inside a split
        earlier = (k_split < q_split) & ~is_noise[None, :]  # earlier splits, except noisy latents (rule 3)
        new_mask = within | earlier  # [n, n]
        if cache_len:
            # bottom-right alignment: the cached context is fully visible to every new token
            new_mask = torch.cat([torch.ones(n, cache_len, dtype=torch.bool, device=device), new_mask], dim=1)
        return new_mask  # [n, cache_len + n]

    def token_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per packed token: sample id, global split id (increasing), split mode code (0 causal, 1 full, 2 noise).

        Three ``[N]`` int32 tables that the flex ``mask_mod`` indexes: it sees only token indices.
        """
        sample_ids, split_ids, modes = [], [], []
        g = 0
        for s, splits in enumerate(self.samples):
            for sp in splits:
                sample_ids.append(torch.full((sp.length,), s, dtype=torch.int32))
                split_ids.append(torch.full((sp.length,), g, dtype=torch.int32))
                modes.append(torch.full((sp.length,), _MODES.index(sp.mode), dtype=torch.int32))
                g += 1
        return (torch.cat(sample_ids).to(device), torch.cat(split_ids).to(device), torch.cat(modes).to(device))


class _KVStore:
    """Preallocated key/value buffers ``[kv_heads, capacity, head_dim]`` per layer, shared by forks.

    Forks are why it exists: image generation runs three contexts (conditional, text- and
    image-unconditional, ARCHITECTURE 9.4) and text generation works on a copy (9.3), mostly
    sharing one prefix; copying every layer's keys and values per fork would dominate short steps.

    ``claimed`` is the longest prefix any cache on this store has committed and ``owner`` the
    identity token of the cache that committed it; a cache may write past its own length only when
    those rows are unclaimed or its own (otherwise it copies its prefix into a fresh store first:
    copy-on-write).  A token, not the cache itself: a store pointing back at its cache would make
    a reference cycle, and every finished context's buffers (megabytes per layer) would then wait
    for Python's cyclic garbage collector instead of being freed when the context is dropped.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.claimed = 0
        self.owner: object | None = None  # the committing cache's KVCache.token


class KVCache:
    """Keys and values of one context, per decoder layer, as ``[kv_heads, length, head_dim]`` views.

    Keys are stored after q/k-norm and RoPE.  ``rope`` is the next RoPE position of the context
    (ARCHITECTURE 9.1).  Storage is preallocated and grows geometrically, so appending a token costs
    O(1) copies instead of re-concatenating the whole cache.  :meth:`fork` is O(1): the fork shares
    the parent's storage and whichever of the two writes first past the shared prefix keeps it; the
    other copies its prefix on its next write.  Query tokens that are *not* added to the context
    (a denoising step) are written to the spare capacity past ``length`` without claiming it.
    """

    GROWTH = 1.5
    MIN_CAPACITY = 256

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self._store = _KVStore(num_layers)
        self.length = 0
        self.rope = 0
        self.token = object()  # this cache's identity in _KVStore.owner (no reference back to it)

    def get(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        k, v = self._store.keys[layer], self._store.values[layer]
        if k is None or self.length == 0:
            return None, None
        return k[:, : self.length], v[:, : self.length]

    def fork(self) -> "KVCache":
        other = KVCache(self.num_layers)  # a token of its own
        other._store, other.length, other.rope = self._store, self.length, self.rope
        return other

    def _ensure_writable(self, layer: int, n: int, like: torch.Tensor) -> None:
        """Make rows ``[length, length + n)`` of ``layer`` writable by this cache."""
        store = self._store
        need = self.length + n
        if store.claimed > self.length and store.owner is not self.token:  # a fork owns rows past our prefix
            # every layer will write the same n rows: copy each prefix once into room for them
            cap = max(need, self.MIN_CAPACITY, int(self.length * self.GROWTH))
            fresh = _KVStore(self.num_layers)
            for old, new in ((store.keys, fresh.keys), (store.values, fresh.values)):
                for i, buf in enumerate(old):
                    if buf is not None:
                        new[i] = self._with_capacity(buf, buf, cap)
            fresh.claimed, fresh.owner = self.length, self.token
            self._store = store = fresh
        k = store.keys[layer]
        if k is None or k.shape[1] < need:
            cap = max(need, self.MIN_CAPACITY, int((0 if k is None else k.shape[1]) * self.GROWTH))
            for buffers in (store.keys, store.values):
                buffers[layer] = self._with_capacity(buffers[layer], like, cap)

    def _with_capacity(self, buf: torch.Tensor | None, like: torch.Tensor, cap: int) -> torch.Tensor:
        """A ``[kv_heads, cap, head_dim]`` buffer shaped like ``like`` holding ``buf``'s first ``length`` rows."""
        grown = like.new_empty((like.shape[0], cap, like.shape[2]))
        if buf is not None:
            grown[:, : self.length] = buf[:, : self.length]
        return grown

    def extend(self, layer: int, keys: torch.Tensor, values: torch.Tensor, commit: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``keys/values [kv_heads, n, d]`` after this context and return the views of
        context + new rows.  ``commit`` makes them part of the context (after the last layer,
        :meth:`advance` moves ``length``); otherwise they are scratch rows for one forward."""
        n = keys.shape[1]  # new tokens of this sample
        self._ensure_writable(layer, n, keys)
        store = self._store
        end = self.length + n
        store.keys[layer][:, self.length : end] = keys
        store.values[layer][:, self.length : end] = values
        if commit:
            store.claimed, store.owner = end, self.token
        return store.keys[layer][:, :end], store.values[layer][:, :end]  # [kv_heads, length + n, d] views

    def advance(self, n: int) -> None:
        """Make the ``n`` rows written with ``commit=True`` in every layer part of the context."""
        self.length += n


@dataclass
class AttentionPlan:
    """Everything the layers need to attend, computed once per forward and shared by all layers."""

    layout: AttentionLayout
    caches: list[KVCache | None]
    update_cache: bool
    backend: str = "sdpa"
    masks: list[torch.Tensor | None] = field(default_factory=list)
    block_mask: object | None = None
    slices: list[slice] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        layout: AttentionLayout,
        caches: list[KVCache | None] | None,
        update_cache: bool,
        device: torch.device,
        backend: str = "sdpa",
    ) -> "AttentionPlan":
        n_samples = len(layout.samples)
        caches = list(caches) if caches is not None else [None] * n_samples
        if len(caches) != n_samples:
            raise ValueError(f"got {len(caches)} caches for {n_samples} packed samples")
        if update_cache and any(c is None for c in caches):
            raise ValueError("update_cache=True needs a KVCache for every sample")
        if update_cache and len({id(c) for c in caches}) != len(caches):
            raise ValueError("update_cache=True needs a distinct KVCache per sample")
        if backend not in ("sdpa", "flex"):
            raise ValueError(f"attention backend must be 'sdpa' or 'flex', got {backend!r}")
        plan = cls(layout, caches, update_cache, backend, slices=layout.sample_slices())
        # masks depend only on the layout and the cache lengths, so all L layers share them
        if backend == "flex":
            if any(c is not None for c in caches):
                raise ValueError("the flex backend serves cache-free (training) forwards; use 'sdpa' with KV caches")
            plan.block_mask = _flex_block_mask(layout, device)
        else:
            plan.masks = [
                layout.sample_mask(s, 0 if c is None else c.length, device) for s, c in enumerate(caches)
            ]
        return plan

    def finish(self) -> None:
        """After the last layer: the committed rows become part of their contexts."""
        if self.update_cache:
            for cache, n in zip(self.caches, self.layout.sample_lengths):
                cache.advance(n)


def attend(plan: AttentionPlan, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Joint attention of packed ``q [N, hq, d]`` over ``k, v [N, hkv, d]`` (GQA) and the caches.

    Returns ``[N, hq, d]``.  Writes the new keys/values into the caches when the plan says so.
    """
    if plan.backend == "flex":
        return _flex_attend(plan, q, k, v, scale)
    # one SDPA call per sample: each has its own cache length, and its mask stays [n, kv_len + n]
    outs = []
    for s, sl in enumerate(plan.slices):
        # [n, h, d] -> [h, n, d] for this sample's n tokens
        qs, ks, vs = q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1)
        cache = plan.caches[s]
        if cache is not None:
            # [hkv, n, d] -> [hkv, kv_len + n, d]; a denoising query writes scratch rows (commit=False)
            ks, vs = cache.extend(layer, ks, vs, commit=plan.update_cache)
        out = F.scaled_dot_product_attention(
            qs[None], ks[None], vs[None], attn_mask=plan.masks[s], scale=scale, enable_gqa=ks.shape[0] != qs.shape[0]
        )  # [1, hq, n, d]
        outs.append(out[0].transpose(0, 1))  # [n, hq, d]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)  # [N, hq, d]


def attend_contexts(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, contexts: list[tuple[torch.Tensor | None, torch.Tensor | None]],
    lengths: list[int], scale: float,
) -> torch.Tensor:
    """Attention of packed samples that are each one block seeing its fixed context and itself.

    ``q [N, hq, d]``, ``k, v [N, hkv, d]`` hold ``lengths[s]`` consecutive tokens of each sample and
    ``contexts[s]`` that sample's cached keys and values ``[hkv, L_s, d]`` (``None`` for an empty
    context); ``hq`` may be a multiple of ``hkv`` (grouped-query attention).  Returns ``[N, hq, d]``.  This is :func:`attend` for a plan whose samples are single
    full/noise blocks that do not join their contexts (a denoising step): the same rules, with the
    new keys appended to a copy of the context instead of written into the cache, so that the
    function is free of side effects (and can be compiled whole).
    """
    outs, start = [], 0
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]  # head counts are fixed sizes, also when compiled
    grouped = hq != hkv
    stack = grouped and q.device.type == "cpu"
    for (ck, cv), n in zip(contexts, lengths):
        # [n, h, d] -> [h, n, d] for this sample's n tokens
        qs, ks, vs = q[start : start + n].transpose(0, 1), k[start : start + n].transpose(0, 1), v[start : start + n].transpose(0, 1)
        if ck is not None:
            ks, vs = torch.cat([ck, ks], dim=1), torch.cat([cv, vs], dim=1)  # [hkv, L + n, d]
        if stack:
            # the g = hq/hkv query heads that share a key/value head (heads j*g .. j*g+g-1 read kv
            # head j) as one query of g*n rows: the softmax is per row, so this is the same
            # attention, and torch's CPU kernel runs one long query no slower and mostly faster than
            # g short ones (a 256² step's shapes, 8 heads on 2, four runs on one 2-core CPU: 0-9 % less time)
            g = hq // hkv
            qg = qs.reshape(hkv, g * n, d)  # [hq, n, d] -> [hkv, g*n, d]
            out = F.scaled_dot_product_attention(qg[None], ks[None], vs[None], scale=scale)  # [1, hkv, g*n, d]
            outs.append(out.view(hq, n, d).transpose(0, 1))  # -> [n, hq, d]
        else:
            out = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], scale=scale, enable_gqa=grouped)
            outs.append(out[0].transpose(0, 1))  # [1, hq, n, d] -> [n, hq, d]
        start += n
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: list[int], scale: float) -> torch.Tensor:
    """Bidirectional attention restricted to consecutive segments (one per image); ``[N, h, d]``.

    The ViT's replacement for the reference's flash varlen call (ARCHITECTURE 6.3, 10.5): one
    maskless SDPA per image, so images of different sizes never attend to each other.
    """
    outs, start = [], 0
    for n in seqlens:
        sl = slice(start, start + n)
        # [n, h, d] -> [1, h, n, d] -> attention -> [n, h, d]
        o = F.scaled_dot_product_attention(q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None], v[sl].transpose(0, 1)[None], scale=scale)
        outs.append(o[0].transpose(0, 1))
        start += n
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


# ---- flex attention ------------------------------------------------------------------------


def _flex_block_mask(layout: AttentionLayout, device: torch.device):
    # The same rules as AttentionLayout.sample_mask, as a predicate over global token indices;
    # flex skips the 128x128 tiles where it is all False (most of a packed batch), which is why
    # training uses it (the reference offers the same with 128-token blocks, ARCHITECTURE 10.5).
    from torch.nn.attention.flex_attention import create_block_mask

    sample_id, split_id, mode = layout.token_tables(device)
    causal, noise = _MODES.index("causal"), _MODES.index("noise")

    def mask_mod(b, h, q_idx, kv_idx):
        same_sample = sample_id[q_idx] == sample_id[kv_idx]  # document mask (rule 4)
        same_split = split_id[q_idx] == split_id[kv_idx]
        within = same_split & ((mode[q_idx] != causal) | (kv_idx <= q_idx))
        earlier = (split_id[kv_idx] < split_id[q_idx]) & (mode[kv_idx] != noise)
        return same_sample & (within | earlier)

    n = layout.num_tokens
    return create_block_mask(mask_mod, None, None, n, n, device=device)


def _flex_attend(plan: AttentionPlan, q, k, v, scale):
    from torch.nn.attention.flex_attention import flex_attention

    # the whole packed batch as one "sequence": [N, h, d] -> [1, h, N, d]
    out = flex_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        block_mask=plan.block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1],
    )
    return out[0].transpose(0, 1)  # [N, hq, d]
