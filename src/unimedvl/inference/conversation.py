"""Multi-turn understanding sessions: a :class:`Conversation` owns its KV context and its turns.

Each turn appends to the context (images as ViT blocks, then the text item); an answer's decoding
fork, closed with ``<|im_end|>``, becomes the context for the next turn, so earlier images,
questions and answers are never recomputed.  :class:`AnswerStream` yields an answer's text as it is
decoded and records it in the conversation when it ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from ..model import KVCache
from ..tokenizer import Tokenizer
from . import prompts
from .engine import TextGeneration, TextStream
from .inputs import ImageInput


@dataclass
class Answer:
    text: str  # the answer (the <think> block removed in think mode)
    thinking: str | None  # the reasoning inside <think> ... </think>, think mode only
    token_ids: list[int]  # generated ids
    finished: bool  # False when max_new_tokens cut the answer short
    conversation: "Conversation"  # pass as ``history=`` to continue

    def __str__(self) -> str:
        return self.text


def require_text(text: str, what: str) -> None:
    if not text or not text.strip():
        raise ValueError(f"the {what} is empty")


def raw_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    """Generated ids as text, decoded the way the reference decodes a generation."""
    return tokenizer.decode_generation([tokenizer.special.bos, *ids])


class Conversation:
    """A multi-turn understanding session on one pipeline.  Its KV context grows turn by turn."""

    def __init__(self, pipeline, think: bool = False):
        # ``pipeline``: the UniMedVLPipeline this conversation belongs to (not imported here: the
        # pipeline module builds conversations).  Only its public parts are used: engine,
        # tokenizer, load_images, transform and ask.
        self.pipeline = pipeline
        self.engine, self.tokenizer = pipeline.engine, pipeline.tokenizer
        self.think = think
        self.context: KVCache = self.engine.new_context()
        self.turns: list[dict] = []
        if think:
            self._add_text(prompts.UNDERSTANDING_SYSTEM_PROMPT)

    def _add_text(self, text: str) -> None:
        self.engine.add_text(self.context, self.tokenizer.encode(text))

    def ask(self, question: str, images: Sequence[ImageInput] = (), **kwargs):
        """Answer ``question`` (about ``images``, if any) in this conversation; see :meth:`UniMedVLPipeline.ask`."""
        return self.pipeline.ask(images, question, history=self, **kwargs)

    def add_system(self, text: str) -> None:
        """A system text item (before the first turn), e.g. an OpenAI ``system`` message."""
        require_text(text, "system message")
        self._add_text(text)
        self.turns.append({"role": "system", "text": text})

    def add_user(self, text: str, images: ImageInput | Sequence[ImageInput] | None = ()) -> KVCache:
        """A user turn: ``images`` (ViT blocks, in order) then ``text``, without answering it (the
        next step decodes from the returned context, or a transcript replays the next turn)."""
        require_text(text, "user message")
        loaded = self.pipeline.load_images(images)
        understanding = self.pipeline.transform("understanding_vit")
        for pil, _ in loaded:
            self.engine.add_vit_image(self.context, understanding(pil, img_num=len(loaded)))  # [3, h, w] in [-1, 1]
        self._add_text(text)
        self.turns.append({"role": "user", "text": text, "images": len(loaded)})
        return self.context

    def add_assistant(self, text: str) -> None:
        """An assistant turn from a transcript: the same text item a decoded answer becomes."""
        require_text(text, "assistant message")
        self._add_text(text)
        self.turns.append({"role": "assistant", "text": text})

    def record_answer(self, generation: TextStream | TextGeneration, closed: KVCache) -> Answer:
        """Record a decoded answer; ``closed`` is its decoding fork closed with ``<|im_end|>``
        (:meth:`Engine.close_answer`): the context plus the answer as a text item like any other."""
        raw = raw_text(self.tokenizer, generation.ids)
        thinking, text = prompts.split_thinking(raw) if self.think else (None, raw)
        self.context = closed
        self.turns.append({"role": "assistant", "text": raw})
        return Answer(text, thinking, list(generation.ids), generation.finished, self)


class AnswerStream:
    """Iterator of text pieces of an answer as it is decoded; ``"".join`` of them equals the
    non-streamed answer (in think mode: the raw text, ``<think>`` block included).  After
    exhaustion :attr:`answer` holds the :class:`Answer`, recorded in the conversation."""

    def __init__(self, conversation: Conversation, stream: TextStream):
        self.conversation, self.stream = conversation, stream
        self.answer: Answer | None = None
        self._pieces = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def _run(self) -> Iterator[str]:
        conv = self.conversation
        tok = conv.tokenizer
        emitted = ""
        for _ in self.stream:
            text = tok.decode(self.stream.ids)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
                continue
            if text.startswith(emitted) and len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text
        self.answer = conv.record_answer(self.stream, conv.engine.close_answer(self.stream))
        full = self.answer.text if not conv.think else raw_text(tok, self.stream.ids)
        if full.startswith(emitted) and len(full) > len(emitted):
            yield full[len(emitted):]

    def result(self) -> Answer:
        """Consume the rest of the stream and return the answer."""
        for _ in self:
            pass
        return self.answer
