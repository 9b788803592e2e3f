"""An interactive multi-turn chat over a pipeline, its input and output given as callables.

``unimedvl chat`` runs :func:`run_chat` with ``input`` and ``typer.echo``; tests script it with a
list of lines.  Lines starting with ``/`` are commands (:data:`CHAT_HELP`), anything else is a
question, answered in the running :class:`~unimedvl.inference.conversation.Conversation` (earlier
turns are never recomputed) and streamed piece by piece as it is decoded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional

if TYPE_CHECKING:
    from .conversation import Answer
    from .pipeline import UniMedVLPipeline

CHAT_HELP = "commands: /image PATH (attach to the next question), /reset (new conversation), /quit"
PROMPT = "you> "
ANSWER_PREFIX = "model> "
QUIT_COMMANDS = ("/quit", "/exit")

# errors of one turn (a bad image, a prompt over the context window...) that the loop reports and survives;
# the model's own errors (ConfigError, TokenizerError, MedicalImageError, PromptTooLongError) are ValueErrors
RECOVERABLE_ERRORS: tuple[type[BaseException], ...] = (ValueError, RuntimeError, FileNotFoundError)


def read_terminal_line(prompt: str) -> str:
    """``input(prompt)``, with bytes that are not valid in the terminal's encoding kept as lone
    surrogates (``surrogateescape``) instead of raising: the question is then refused by name as
    not valid UTF-8 text, and the conversation goes on."""
    import sys

    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None and getattr(sys.stdin, "errors", None) != "surrogateescape":
        try:
            reconfigure(errors="surrogateescape")
        except (ValueError, OSError):  # a stream that cannot change its error handler mid-read
            pass
    return input(prompt)


def run_chat(
    pipeline: "UniMedVLPipeline",
    *,
    read_line: Callable[[str], str],
    write: Callable[..., object],
    error: Optional[Callable[[str], object]] = None,
    images: Iterable[str | Path] = (),
    think: bool = False,
    max_new_tokens: int = 512,
    temperature: float = 0.1,
    seed: Optional[int] = 42,
    recoverable: tuple[type[BaseException], ...] = RECOVERABLE_ERRORS,
) -> list["Answer"]:
    """Run the chat loop until ``/quit``, ``/exit`` or end of input; return the answers given, in order.

    ``read_line(prompt)`` returns the next line and raises ``EOFError`` at the end of input (as
    ``input``); ``write(text, nl=True)`` prints (as ``typer.echo``; ``nl=False`` for the pieces of
    a streamed answer); ``error(message)`` prints a problem (default: ``write``).  ``images`` are
    attached to the first question.  Commands:

    * ``/image PATH`` attaches an image file to the next question (a missing file is reported);
    * ``/reset`` starts a new conversation and drops pending images;
    * ``/quit`` (or ``/exit``) ends the loop; any other ``/...`` prints :data:`CHAT_HELP`.

    A question that fails with one of ``recoverable`` is reported and the loop goes on; its
    pending images stay attached.
    """
    report = error if error is not None else write
    conversation = pipeline.chat(think=think)
    pending: list = list(images)
    answers: list = []
    write(CHAT_HELP)
    while True:
        try:
            line = read_line(PROMPT).strip()
        except EOFError:
            break
        if not line:
            continue
        if line in QUIT_COMMANDS:
            break
        if line == "/reset":
            conversation, pending = pipeline.chat(think=think), []
            write("(new conversation)")
            continue
        command, _, argument = line.partition(" ")
        if command == "/image":
            path = Path(argument.strip())
            if not argument.strip():
                report("error: /image needs a PATH")
            elif not path.is_file():
                report(f"error: {path}: no such image file")
            else:
                pending.append(path)
                write(f"(attached {path.name} to the next question)")
            continue
        if line.startswith("/"):
            write(CHAT_HELP)
            continue
        try:
            stream = conversation.ask(line, pending, stream=True, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
            write(ANSWER_PREFIX, nl=False)
            for piece in stream:
                write(piece, nl=False)
            write("")
        except recoverable as e:
            report(f"error: {e}")
            continue
        answers.append(stream.answer)
        pending = []
    return answers
