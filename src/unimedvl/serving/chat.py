"""Answering a chat transcript: earlier turns are replayed into one conversation, the last user
turn is answered piece by piece, and the request's cancel token is checked between pieces.  The
HTTP API and the web UI both answer through here."""

from __future__ import annotations

from typing import Callable

from .schemas import ChatRequest
from .worker import CancelToken


def replay_earlier_turns(pipeline, req: ChatRequest, token: CancelToken):
    """A conversation holding every turn of ``req`` but the last (the user turn to answer)."""
    conv = pipeline.chat()
    for m in req.messages[:-1]:
        if m.role == "system":
            conv.add_system(m.text)
        elif m.role == "user":
            conv.add_user(m.text, m.images)
        else:
            conv.add_assistant(m.text)
        token.check()
    return conv


def answer_chat(pipeline, req: ChatRequest, token: CancelToken, *, on_start: Callable[[], None] | None = None,
                on_piece: Callable[[str], None] | None = None) -> dict:
    """``{"text", "finish_reason", "usage"}`` for ``req`` (images already decoded).  ``on_start`` is
    called once the prompt is in context (errors such as an over-long prompt come before it);
    ``on_piece`` with every text piece as it is decoded."""
    conv = replay_earlier_turns(pipeline, req, token)
    last = req.messages[-1]
    stream = pipeline.ask(last.images, last.text, history=conv, max_new_tokens=req.max_tokens, temperature=req.temperature,
                          top_p=req.top_p, seed=req.seed, stream=True)
    prompt_tokens = conv.context.rope
    if on_start is not None:
        on_start()
    pieces = []
    for piece in stream:
        token.check()
        pieces.append(piece)
        if on_piece is not None:
            on_piece(piece)
    generated = len(stream.answer.token_ids)
    return {"text": "".join(pieces), "finish_reason": "stop" if stream.answer.finished else "length",
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}}
