"""KV-cached contexts and text decoding on a :class:`~unimedvl.model.UniMedVL` (ARCHITECTURE 9).

A *context* is a :class:`~unimedvl.model.KVCache` (keys/values per layer plus the next RoPE
position).  The :class:`Engine` appends blocks to contexts (text, ViT image, clean VAE image),
checks them against the context window, encodes and decodes latents, and decodes text from a
context (streamed, batched, closed back into the context for the next turn).  Sampling images from
contexts is :mod:`.sampling`.

This module orchestrates; the network only maps packed tokens to logits and velocities.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..model import KVCache, UniMedVL
from ..model.attention import AttentionLayout, Split
from ..model.unimedvl import ForwardPlan, PackedBatch
from ..model.patching import latent_to_tokens, unpatchify
from ..model.packing import PackedBatchBuilder
from ..tokenizer import SpecialTokens


class PromptTooLongError(ValueError):
    """The context would exceed the model's context window."""


@dataclass
class TextGeneration:
    ids: list[int]  # generated content ids (the start token and the final <|im_end|> excluded)
    logits: torch.Tensor | None  # [steps, V] float32, row k = logits that predicted token k; None when not kept
    finished: bool  # True when generation stopped at <|im_end|>
    context: KVCache  # the decoding fork: the input context + <|im_start|> + ids


@dataclass(frozen=True)
class Sampler:
    """Next-token choice.  ``temperature == 0``: greedy (the reference's ``do_sample=False``);
    otherwise multinomial from ``softmax(logits / temperature)`` - the reference's sampling - with an
    optional nucleus (``top_p < 1``) restriction that the reference does not have."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def __call__(self, logits: torch.Tensor) -> int:
        if self.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float().cpu() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = (sorted_p.cumsum(0) - sorted_p) < self.top_p  # always keeps the most likely token
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))


def check_max_new_tokens(max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def _step_outcome(token: int, step: int, max_new_tokens: int, eos: int | None) -> tuple[bool, bool]:
    """``(finished, keep)`` for the prediction of decoding step ``step`` (from 0): ``<|im_end|>``
    finishes and is not kept; the last allowed step's prediction is dropped, as in the reference."""
    if token == eos:
        return True, False
    return False, step < max_new_tokens - 1


class TextStream:
    """Iterator over generated token ids (ARCHITECTURE 9.3) that keeps its decoding state.

    Stops after a step that predicts ``<|im_end|>`` (not yielded) or after ``max_new_tokens``
    steps (the last prediction is then dropped, as in the reference, so at most
    ``max_new_tokens - 1`` ids).  Afterwards :attr:`ids`, :attr:`finished` and :attr:`context` (the
    fork holding ``<|im_start|>`` and the yielded ids) describe the result.
    """

    def __init__(self, engine: "Engine", ctx: KVCache, max_new_tokens: int, sampler: Sampler, forced_ids: list[int] | None):
        check_max_new_tokens(max_new_tokens)
        self.engine, self.sampler, self.forced_ids = engine, sampler, forced_ids
        self.max_new_tokens = max_new_tokens
        self.context = ctx.fork()
        self.ids: list[int] = []
        self.logits: list[torch.Tensor] = []
        self.keep_logits = False
        self.finished = False
        self._iter = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> int:
        return next(self._iter)

    @torch.no_grad()
    def _run(self):
        eos = self.engine.special.eos if self.forced_ids is None else None  # forced ids never finish
        fed = self.engine.special.bos
        for step in range(self.max_new_tokens):
            logits = self.engine._decode_step(self.context, fed)
            if self.keep_logits:
                self.logits.append(logits)
            nxt = self.sampler(logits) if self.forced_ids is None else int(self.forced_ids[step])
            self.finished, keep = _step_outcome(nxt, step, self.max_new_tokens, eos)
            if not keep:
                return
            self.ids.append(nxt)
            fed = nxt
            yield nxt


class Engine:
    def __init__(self, model: UniMedVL, special: SpecialTokens):
        self.model = model
        model.fuse_projections()  # one q/k/v and one gate/up product per expert and layer (same weights, same memory)
        self.special = special
        self.config = model.config
        self.forwarded_tokens = 0  # every token any forward ran (tests and benchmarks read it)

    # ---- helpers ------------------------------------------------------------------------------
    def new_context(self) -> KVCache:
        return self.model.new_cache()

    @property
    def context_window(self) -> int:
        return self.config.llm.max_position_embeddings

    def check_room(self, ctx: KVCache, positions: int, what: str) -> None:
        """Raise :class:`PromptTooLongError` when ``positions`` more would not fit after ``ctx``."""
        if ctx.rope + positions > self.context_window:
            raise PromptTooLongError(
                f"{what} needs {positions} positions after {ctx.rope} already used, but the context window is "
                f"{self.context_window}; shorten the text, use fewer images or start a new conversation"
            )

    def answer_budget(self, ctx: KVCache, max_new_tokens: int) -> int:
        """``max_new_tokens`` capped by the room left in the context window (at least one position)."""
        check_max_new_tokens(max_new_tokens)
        self.check_room(ctx, 1, "the answer")
        return min(max_new_tokens, self.context_window - ctx.rope)

    def batch_builder(self) -> PackedBatchBuilder:
        return PackedBatchBuilder(self.config, self.special)

    @torch.no_grad()
    def forward(self, batch: PackedBatch, caches: list[KVCache], update_cache: bool, plan: ForwardPlan | None = None):
        """One packed forward; counts the tokens it ran (:attr:`forwarded_tokens`)."""
        self.forwarded_tokens += batch.num_tokens
        return self.model(batch, caches=caches, update_cache=update_cache, plan=plan)

    def _update(self, ctx: KVCache, add: Callable[[PackedBatchBuilder], object]):
        b = self.batch_builder().new_sample(ctx.rope)
        add(b)
        rope = b.rope
        out = self.forward(b.build(self.model.device), [ctx], update_cache=True)
        ctx.rope = rope
        return out

    # ---- context updates ------------------------------------------------------------------------
    def add_text(self, ctx: KVCache, content_ids: list[int]) -> None:
        """Append the text item ``<|im_start|> content <|im_end|>`` (causal)."""
        self.check_room(ctx, len(content_ids) + 2, f"a text of {len(content_ids)} tokens")
        self._update(ctx, lambda b: b.add_text(list(content_ids)))

    def add_token_ids(self, ctx: KVCache, ids: list[int]) -> None:
        """Append already-wrapped token ids as one causal text split (e.g. a recorded prompt)."""
        self._update(ctx, lambda b: b.add_tokens(list(ids)))

    def add_vit_image(self, ctx: KVCache, pixels: torch.Tensor) -> None:
        """Append a ViT block of ``pixels [3, h, w]`` in [-1, 1] (understanding input)."""
        p = self.config.vit.patch_size
        self.check_room(ctx, 1, f"an image of {(pixels.shape[1] // p) * (pixels.shape[2] // p)} patches")
        self._update(ctx, lambda b: b.add_vit_image(pixels))

    def add_vae_image(self, ctx: KVCache, pixels: torch.Tensor, posterior_noise: torch.Tensor | None = None) -> torch.Tensor:
        """Append a clean VAE block of ``pixels [3, h, w]`` (generation condition, ``t = 0``).

        ``posterior_noise [z, h/8, w/8]`` samples the posterior as the reference does; ``None`` uses
        the mean.  Returns the latent tokens that were added.
        """
        tokens, grid = self.encode_latents(pixels, posterior_noise)
        self.add_latent_tokens(ctx, tokens, grid)
        return tokens

    def add_latent_tokens(self, ctx: KVCache, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> None:
        """Append already-encoded clean latent tokens ``[h*w, p*p*C]`` as a VAE block (``t = 0``)."""
        self._update(ctx, lambda b: b.add_latent_image(tokens, grid_hw, 0.0, noisy=False))

    # ---- autoencoder --------------------------------------------------------------------------
    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        s = self.config.latent_downsample
        if height % s or width % s:
            raise ValueError(f"image size {width}x{height} must be a multiple of {s}")
        h, w = height // s, width // s
        if max(h, w) > self.config.max_latent_size:
            raise ValueError(
                f"image size {width}x{height} exceeds the largest generated side "
                f"{self.config.max_latent_size * s} px of this model"
            )
        return h, w

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor, posterior_noise: torch.Tensor | None = None):
        """``pixels [3, H, W]`` -> (latent tokens ``[h*w, p*p*C]`` float32, grid ``(h, w)``)."""
        grid = self.latent_grid(pixels.shape[1], pixels.shape[2])
        noise = None if posterior_noise is None else posterior_noise.reshape(1, *posterior_noise.shape[-3:]).to(self.model.device)
        z = self.model.vae_model.encode(pixels[None].to(self.model.device), noise)[0]
        return latent_to_tokens(z.float(), *grid, self.config.latent_patch_size), grid

    @torch.no_grad()
    def decode_latents(self, tokens: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """Latent tokens -> decoder output ``[3, H, W]`` (unclamped)."""
        z = unpatchify(tokens, *grid_hw, self.config.latent_patch_size)
        return self.model.vae_model.decode(z[None].to(self.model.device))[0]

    # ---- text ---------------------------------------------------------------------------------
    def _decode_step(self, ctx: KVCache, token: int) -> torch.Tensor:
        """Feed one token at the end of ``ctx`` (appended to it); returns its next-token logits ``[V]``."""
        return self.decode_steps([ctx], [token])[0]

    def decode_steps(self, contexts: Sequence[KVCache], tokens: Sequence[int]) -> torch.Tensor:
        """Feed ``tokens[i]`` at the end of ``contexts[i]`` (appended to it), all in one packed forward.

        Returns the next-token logits ``[len(contexts), V]`` float32.  The contexts must be distinct
        objects.  The batch is built directly (one causal token per sample, every one a logit
        position) rather than through the packing builder.
        """
        n = len(contexts)
        if n != len(tokens):
            raise ValueError(f"got {len(tokens)} tokens for {n} contexts")
        device = self.model.device
        index = torch.arange(n, device=device)
        batch = PackedBatch(
            layout=AttentionLayout([[Split(1, "causal")] for _ in range(n)]),
            position_ids=torch.tensor([ctx.rope for ctx in contexts], device=device),
            token_ids=torch.tensor(list(tokens), device=device),
            token_index=index,
            logit_index=index,
        )
        out = self.forward(batch, list(contexts), update_cache=True)
        for ctx in contexts:
            ctx.rope += 1
        return out.logits.float()

    def stream_text(
        self,
        ctx: KVCache,
        max_new_tokens: int,
        *,
        sampler: "Sampler | None" = None,
        forced_ids: list[int] | None = None,
    ) -> "TextStream":
        """Decode from ``ctx`` (left unchanged) token by token: feed ``<|im_start|>``, then each
        prediction (ARCHITECTURE 9.3).  Iterate the returned :class:`TextStream` for the ids."""
        return TextStream(self, ctx, max_new_tokens, sampler or Sampler(), forced_ids)

    @torch.no_grad()
    def generate_text(
        self,
        ctx: KVCache,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        forced_ids: list[int] | None = None,
    ) -> TextGeneration:
        """Decode from ``ctx`` (left unchanged) and collect the ids and every step's logits.

        ``temperature == 0`` is greedy (argmax, first index on ties); otherwise multinomial sampling
        from ``softmax(logits / temperature)``, restricted to the top-``p`` nucleus when ``top_p < 1``.
        ``forced_ids`` feeds those ids instead of the predictions (teacher forcing) while still
        recording the logits.
        """
        stream = self.stream_text(ctx, max_new_tokens, sampler=Sampler(temperature, top_p, generator), forced_ids=forced_ids)
        stream.keep_logits = True
        for _ in stream:
            pass
        return TextGeneration(stream.ids, torch.stack(stream.logits), stream.finished, stream.context)

    @torch.no_grad()
    def generate_text_batch(self, contexts: Sequence[KVCache], max_new_tokens: int | Sequence[int]) -> list[TextGeneration]:
        """Greedy decoding from several contexts (each left unchanged) with one packed forward per step.

        Per context the result equals ``generate_text(ctx, max_new_tokens)`` (greedy) in ``ids``,
        ``finished`` and ``context`` (the decoding fork, ready for :meth:`close_answers`); ``logits``
        is ``None``.  Every step feeds one token to each context that is still decoding; a context
        leaves the batch once it predicts ``<|im_end|>`` or reaches its step limit.
        ``max_new_tokens`` is one limit for all contexts or one per context.
        """
        n = len(contexts)
        limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]
        if len(limits) != n:
            raise ValueError(f"got {len(limits)} max_new_tokens for {n} contexts")
        for m in limits:
            check_max_new_tokens(m)
        eos = self.special.eos
        forks = [ctx.fork() for ctx in contexts]
        ids: list[list[int]] = [[] for _ in range(n)]
        finished = [False] * n
        fed = [self.special.bos] * n
        active = list(range(n))
        step = 0
        while active:
            logits = self.decode_steps([forks[i] for i in active], [fed[i] for i in active])
            predictions = torch.argmax(logits, dim=-1).tolist()  # first index on ties, as Sampler
            still = []
            for i, nxt in zip(active, predictions):
                finished[i], keep = _step_outcome(nxt, step, limits[i], eos)
                if keep:
                    ids[i].append(nxt)
                    fed[i] = nxt
                    still.append(i)
            active = still
            step += 1
        return [TextGeneration(ids[i], None, finished[i], forks[i]) for i in range(n)]

    def close_answer(self, stream: "TextStream | TextGeneration") -> KVCache:
        """The context after an answer: the decoding fork with ``<|im_end|>`` fed, i.e. exactly the
        context plus the answer as a text item, without recomputing it (multi-turn reuse)."""
        return self.close_answers([stream])[0]

    def close_answers(self, generations: Sequence["TextStream | TextGeneration"]) -> list[KVCache]:
        """:meth:`close_answer` for several answers (distinct decoding forks) in one packed forward."""
        contexts = [g.context for g in generations]
        if contexts:
            with torch.no_grad():
                self.decode_steps(contexts, [self.special.eos] * len(contexts))
        return contexts
