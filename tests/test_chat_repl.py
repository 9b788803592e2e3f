"""The chat loop behind ``unimedvl chat``, scripted line by line against the fixture pipeline."""

from __future__ import annotations

import pytest

from unimedvl.inference.chat_repl import ANSWER_PREFIX, CHAT_HELP, PROMPT, run_chat

DECODE = dict(max_new_tokens=6, temperature=0)


class Terminal:
    """Scripted input lines (``EOFError`` after the last), and what the loop printed."""

    def __init__(self, lines):
        self.lines, self.prompts, self.out, self.errors = list(lines), [], "", []

    def read_line(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)

    def write(self, message: str = "", nl: bool = True) -> None:
        self.out += message + ("\n" if nl else "")

    def error(self, message: str) -> None:
        self.errors.append(message)

    def chat(self, pipe, **kwargs):
        return run_chat(pipe, read_line=self.read_line, write=self.write, error=self.error, **{**DECODE, **kwargs})


def test_image_attaches_to_the_next_question_and_reset_starts_over(pipe, fixture_a):
    img = fixture_a / "test_image.png"
    term = Terminal([f"/image {img}", "What is shown?", "And where?", "/reset", "What is shown?", "/quit", "never read"])
    first, second, fresh = term.chat(pipe)

    assert term.lines == ["never read"] and set(term.prompts) == {PROMPT}  # /quit ends the loop
    assert not term.errors
    assert term.out.startswith(CHAT_HELP + "\n")
    assert "(attached test_image.png to the next question)" in term.out and "(new conversation)" in term.out
    for answer in (first, second, fresh):  # each answer is streamed after the prefix, then a newline
        assert f"{ANSWER_PREFIX}{answer.text}\n" in term.out

    # the image went with the first question only; the second continued the same conversation
    assert first.conversation is second.conversation
    users = [t for t in first.conversation.turns if t["role"] == "user"]
    assert [(t["text"], t["images"]) for t in users] == [("What is shown?", 1), ("And where?", 0)]
    assert first.text == pipe.ask([img], "What is shown?", **DECODE).text

    # after /reset: a new conversation, whose answer is that of a fresh ask (no history, no image)
    assert fresh.conversation is not first.conversation
    assert [t["role"] for t in fresh.conversation.turns] == ["user", "assistant"]
    assert fresh.text == pipe.ask([], "What is shown?", **DECODE).text
    assert fresh.token_ids == pipe.ask([], "What is shown?", **DECODE).token_ids


def test_unknown_commands_print_the_help_and_a_missing_image_is_reported(pipe, tmp_path):
    missing = tmp_path / "nope.png"
    term = Terminal(["/help", f"/image {missing}", "/image", "", "   ", "What is shown?"])  # then end of input
    (answer,) = term.chat(pipe)

    assert term.out.count(CHAT_HELP) == 2  # at the start, and for /help
    assert term.errors == [f"error: {missing}: no such image file", "error: /image needs a PATH"]
    assert answer.conversation.turns[0]["images"] == 0  # nothing was attached
    assert answer.text == pipe.ask([], "What is shown?", **DECODE).text


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns while failing on the corrupt file
def test_a_failing_question_is_reported_and_the_loop_goes_on(pipe, fixture_a, tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    term = Terminal([f"/image {bad}", "What is shown?", "/reset", "What is shown?", "/exit"])
    (answer,) = term.chat(pipe, images=[fixture_a / "test_image.png"])

    assert len(term.errors) == 1 and term.errors[0].startswith("error: ") and "bad.dcm" in term.errors[0]
    assert answer.conversation.turns[0]["images"] == 0  # /reset dropped the pending images


def test_images_given_up_front_go_with_the_first_question_and_errors_default_to_write(pipe, fixture_a):
    img = fixture_a / "test_image.png"
    term = Terminal(["/image missing.png", "What is shown?"])
    (answer,) = run_chat(pipe, read_line=term.read_line, write=term.write, images=[img], **DECODE)
    assert "error: missing.png: no such image file\n" in term.out
    assert answer.conversation.turns[0]["images"] == 1
    assert answer.text == pipe.ask([img], "What is shown?", **DECODE).text


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -0.5])
def test_conversation_ask_refuses_a_temperature_that_is_not_a_finite_non_negative_number(pipe, temperature):
    from unimedvl.inference.engine import Sampler

    conversation = pipe.chat()
    with pytest.raises(ValueError, match="temperature"):
        conversation.ask("What is shown?", max_new_tokens=2, temperature=temperature)
    assert conversation.turns == []  # nothing was added to the conversation
    with pytest.raises(ValueError, match="temperature"):
        Sampler(temperature)
