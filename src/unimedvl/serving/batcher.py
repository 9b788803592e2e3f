"""Continuous batching of chat answers: every running answer advances by one token per step, all in
one packed forward (the weights are read once per step however many answers share it).

One thread owns the batch.  Between steps it takes waiting requests (up to ``max_batch`` running),
runs each one's prefill (earlier turns, images, the question) and lets it join; after each step an
answer that finished (``<|im_end|>``, its ``max_tokens``, a stop string) or was cancelled leaves,
and its place goes to the next waiting request.  Each answer keeps its own sampler (temperature,
top-p and seeded generator), limit, stop strings and cancel token, so its tokens are those it would
get decoding alone: the same forward per token, only packed beside others.

Token accounting follows OpenAI's: ``max_tokens`` is the number of generated tokens (the stop token
``<|im_end|>`` is not one of them); ``prompt_tokens`` is the context the answer is decoded from -
every text token and every image token, plus the ``<|im_start|>`` that opens the answer.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..inference.conversation import raw_text
from ..inference.engine import Sampler
from .chat import replay_earlier_turns
from .schemas import ChatRequest
from .batch_queue import BatchQueue
from .model_thread import run_on
from .worker import Cancelled, CancelToken

log = logging.getLogger("unimedvl.serve")


@dataclass
class ChatJob:
    """One chat request for the batcher; ``future`` ends with ``{"text", "finish_reason", "usage"}``."""

    request: ChatRequest  # images already decoded
    token: CancelToken
    on_start: Callable[[], None] | None = None  # called once the prompt is in context
    on_piece: Callable[[str], None] | None = None  # called with every text piece, in order
    future: Future = field(default_factory=Future)


@dataclass
class _Answer:
    """A running answer: its decoding context and what it has produced so far."""

    job: ChatJob
    context: object  # KVCache: the prompt, then every fed token
    sampler: Sampler
    limit: int  # tokens it may generate (max_tokens, capped by the context window)
    prompt_tokens: int
    stops: tuple[str, ...]
    fed: int  # the token the next step feeds
    ids: list[int] = field(default_factory=list)
    emitted: str = ""


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string (they are not
    streamed until the next tokens show whether the stop string follows)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class ChatBatcher(BatchQueue):
    """Decodes up to ``max_batch`` chat answers together on its own thread (see the module text)."""

    name = "chat"

    @property
    def engine(self):
        return self.pipeline.engine

    @property
    def tokenizer(self):
        return self.pipeline.tokenizer

    def __init__(self, pipeline, max_batch: int, metrics=None, model_thread=None):
        super().__init__("unimedvl-batcher")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.pipeline, self.max_batch, self.metrics = pipeline, max_batch, metrics
        self.model_thread = model_thread  # a .model_thread.ModelThread: prefills and steps run there
        self._running: list[_Answer] = []
        self._start()

    # ---- the caller's side -----------------------------------------------------------------------
    @property
    def active(self) -> int:
        """Answers in the batch now (the waiting ones are the worker's queue)."""
        return len(self._running)

    # ---- the batch thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stopped:
                    break
                joining = [self._waiting.popleft() for _ in range(min(len(self._waiting), self.max_batch - len(self._running)))]
            run_on(self.model_thread, self._cycle, joining)
        for answer in self._running:
            _fail(answer.job, Cancelled("the server is shutting down"))
        for job in self._waiting:
            _fail(job, Cancelled("the server is shutting down"))

    def _cycle(self, joining: list[ChatJob]) -> None:
        """Prefill the joining jobs, drop the cancelled answers, then one decoding step for all."""
        for job in joining:
            self._join(job)
        self._drop_cancelled()
        if self._running:
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - a failed forward fails the answers in it, not the server
                log.error("a decoding step failed", exc_info=True)
                for answer in self._running:
                    _fail(answer.job, e)
                self._running = []

    def _join(self, job: ChatJob) -> None:
        """Prefill ``job``'s transcript and add it to the batch (or end it with its error)."""
        if job.token.cancelled:
            return _fail(job, Cancelled(job.token.reason))
        if not job.future.set_running_or_notify_cancel():
            return
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                answer = self._prefill(job)
        except Exception as e:  # noqa: BLE001 - an over-long prompt, a bad image...: this request's error
            return _fail(job, e)
        finally:
            if self.metrics is not None:
                self.metrics.add_prefill(time.perf_counter() - t0)
        self._running.append(answer)
        if job.on_start is not None:
            job.on_start()

    def _prefill(self, job: ChatJob) -> _Answer:
        req = job.request
        conv = replay_earlier_turns(self.pipeline, req, job.token)
        last = req.messages[-1]
        ctx = conv.add_user(last.text, last.images)
        # the answer's first forward feeds <|im_start|>; a token needs a position, so the limit is
        # capped by the room left in the context window (at least one, else PromptTooLongError)
        limit = self.engine.answer_budget(ctx, req.max_tokens)
        generator = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
        return _Answer(job, ctx.fork(), Sampler(req.temperature, req.top_p, generator), limit,
                       prompt_tokens=ctx.length + 1, stops=tuple(req.stop), fed=self.engine.special.bos)

    def _drop_cancelled(self) -> None:
        kept = []
        for answer in self._running:
            if answer.job.token.cancelled:
                _fail(answer.job, Cancelled(answer.job.token.reason))
            else:
                kept.append(answer)
        self._running = kept

    def _step(self) -> None:
        """One forward for every running answer, then each samples, streams and maybe finishes."""
        t0 = time.perf_counter()
        batch = self._running
        with torch.no_grad():
            logits = self.engine.decode_steps([a.context for a in batch], [a.fed for a in batch])  # [n, V] float32
        still = []
        for row, answer in zip(logits, batch):
            token = answer.sampler(row)
            if token == self.engine.special.eos:
                self._finish(answer, "stop")
                continue
            answer.ids.append(token)
            answer.fed = token
            if not self._advance(answer) and len(answer.ids) < answer.limit:
                still.append(answer)
            elif answer.job.future.running():
                self._finish(answer, "length")
        self._running = still
        if self.metrics is not None:
            self.metrics.add_decode(time.perf_counter() - t0, len(batch))

    def _advance(self, answer: _Answer) -> bool:
        """Stream the new text of ``answer``; True when a stop string ended it (it is then finished)."""
        text = raw_text(self.tokenizer, answer.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
            return False
        if answer.stops:
            cut = min((i for i in (text.find(s) for s in answer.stops) if i >= 0), default=-1)
            if cut >= 0:
                self._finish(answer, "stop", text[:cut])
                return True
            text = text[: len(text) - held_back(text, answer.stops)]
        self._emit(answer, text)
        return False

    def _emit(self, answer: _Answer, text: str) -> None:
        if text.startswith(answer.emitted) and len(text) > len(answer.emitted):
            piece, answer.emitted = text[len(answer.emitted):], text
            if answer.job.on_piece is not None:
                answer.job.on_piece(piece)

    def _finish(self, answer: _Answer, reason: str, text: str | None = None) -> None:
        if text is None:
            text = raw_text(self.tokenizer, answer.ids)
        self._emit(answer, text)
        n = len(answer.ids)
        usage = {"prompt_tokens": answer.prompt_tokens, "completion_tokens": n, "total_tokens": answer.prompt_tokens + n}
        if answer.job.future.running():
            answer.job.future.set_result({"text": text, "finish_reason": reason, "usage": usage})


def _fail(job: ChatJob, error: BaseException) -> None:
    if job.future.cancelled() or job.future.done():
        return
    if not job.future.running():
        job.future.set_running_or_notify_cancel()
    job.future.set_exception(error)
