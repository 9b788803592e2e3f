"""Batched greedy decoding (Engine.generate_text_batch, UniMedVLPipeline.ask_batch) on the shared fixture model."""

import numpy as np
import pytest
import torch
from PIL import Image

from unimedvl.image_transforms import VQA_VIT

# On the fixture model, greedy decoding after the one-token text item "ical" predicts <|im_end|>
# on its fifth step (four ids), while the other contexts below run to their step limit.
EARLY_EOS_TOKEN = 1116
EARLY_EOS_IDS = 4


@pytest.fixture(scope="module")
def contexts(pipe, image):
    """Three contexts of different lengths: one text token, a question, an image and a question."""
    eng, tok = pipe.engine, pipe.tokenizer
    short = eng.new_context()
    eng.add_text(short, [EARLY_EOS_TOKEN])
    text = eng.new_context()
    eng.add_text(text, tok.encode("Describe the findings."))
    with_image = eng.new_context()
    eng.add_vit_image(with_image, VQA_VIT(image))
    eng.add_text(with_image, tok.encode("What is shown?"))
    assert len({c.length for c in (short, text, with_image)}) == 3
    return [short, text, with_image]


def _state(ctx):
    return ctx.length, ctx.rope


@pytest.mark.parametrize("max_new_tokens", [1, 4, 5, 10, [5, 1, 7], [4, 12, 2]])
def test_batched_greedy_matches_per_context_greedy(pipe, contexts, max_new_tokens):
    eng = pipe.engine
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(contexts)
    before = [_state(c) for c in contexts]
    batched = eng.generate_text_batch(contexts, max_new_tokens)
    assert [_state(c) for c in contexts] == before  # the inputs are left unchanged
    for ctx, limit, got in zip(contexts, limits, batched):
        want = eng.generate_text(ctx, limit)
        assert got.ids == want.ids
        assert got.finished == want.finished
        assert got.logits is None
        assert _state(got.context) == _state(want.context)
    assert [_state(c) for c in contexts] == before


def test_batch_has_an_early_finish_and_cut_answers(pipe, contexts):
    out = pipe.engine.generate_text_batch(contexts, 10)
    assert out[0].finished and len(out[0].ids) == EARLY_EOS_IDS
    assert [g.finished for g in out[1:]] == [False, False]
    assert [len(g.ids) for g in out[1:]] == [9, 9]  # the last step's prediction is dropped
    # a limit that ends exactly on the <|im_end|> step still finishes; one step less cuts it
    assert pipe.engine.generate_text_batch(contexts[:1], EARLY_EOS_IDS + 1)[0].finished
    cut = pipe.engine.generate_text_batch(contexts[:1], EARLY_EOS_IDS)[0]
    assert not cut.finished and len(cut.ids) == EARLY_EOS_IDS - 1


def test_batched_decoding_runs_one_forward_per_step(pipe, contexts, forward_tokens):
    eng, calls = pipe.engine, forward_tokens
    sequential = [eng.generate_text(c, 10) for c in contexts]
    sequential_calls, sequential_tokens = len(calls), sum(calls)
    calls.clear()
    batched = eng.generate_text_batch(contexts, 10)
    assert [g.ids for g in batched] == [g.ids for g in sequential]
    assert sequential_calls == sum(len(g.ids) + 1 for g in sequential) == 5 + 10 + 10
    assert len(calls) == 10 < sequential_calls  # one forward per step, the longest answer sets the count
    assert calls == [3] * (EARLY_EOS_IDS + 1) + [2] * (10 - EARLY_EOS_IDS - 1)  # finished contexts drop out
    assert sum(calls) == sequential_tokens


def test_close_answers_closes_every_fork_in_one_forward(pipe, contexts, forward_tokens):
    eng, calls = pipe.engine, forward_tokens
    generations = eng.generate_text_batch(contexts, 6)
    singles = eng.generate_text_batch(contexts, 6)
    calls.clear()
    closed = eng.close_answers(generations)
    assert calls == [len(contexts)]
    assert [c is g.context for c, g in zip(closed, generations)] == [True] * len(contexts)
    for got, single in zip(closed, singles):
        want = eng.close_answer(single)
        assert _state(got) == _state(want)
        for layer in range(pipe.model.num_layers):
            torch.testing.assert_close(got.get(layer), want.get(layer), rtol=1e-5, atol=1e-5)
        assert eng.generate_text(got, 5).ids == eng.generate_text(want, 5).ids
    assert eng.close_answers([]) == []


def test_forks_of_one_context_decode_independently(pipe, contexts):
    ctx = contexts[1]
    a, b = pipe.engine.generate_text_batch([ctx, ctx], 6)
    want = pipe.engine.generate_text(ctx, 6)
    assert a.ids == b.ids == want.ids
    assert a.context is not b.context


def test_ask_batch_equals_greedy_ask(pipe, image):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    items = [
        ([image], "What is shown?"),
        (array, "Describe the findings."),
        ([image, Image.fromarray(array[:, :, 0])], "Compare the two images."),
        (None, "ical"),
    ]
    batched = pipe.ask_batch(items, max_new_tokens=12, batch_size=3)
    assert len(batched) == len(items)
    assert [a.finished for a in batched] == [False, False, False, True]
    for (images, question), got in zip(items, batched):
        want = pipe.ask(images, question, max_new_tokens=12, temperature=0)
        assert got.text == want.text
        assert got.token_ids == want.token_ids
        assert got.finished == want.finished
        assert got.thinking is None
        assert got.conversation.turns == want.conversation.turns
        assert _state(got.conversation.context) == _state(want.conversation.context)
    # the closed conversation continues like one from ask
    follow = pipe.ask(None, "Which side?", history=batched[0].conversation, max_new_tokens=6, temperature=0)
    first = pipe.ask(*items[0], max_new_tokens=12, temperature=0)
    again = pipe.ask(None, "Which side?", history=first.conversation, max_new_tokens=6, temperature=0)
    assert follow.token_ids == again.token_ids


def test_ask_batch_refuses_empty_questions_before_any_work(pipe, image):
    before = pipe.engine.forwarded_tokens
    with pytest.raises(ValueError, match="empty"):
        pipe.ask_batch([([image], "What is shown?"), ([image], "   ")])
    with pytest.raises(ValueError, match="empty"):
        pipe.ask_batch([(None, "")])
    assert pipe.engine.forwarded_tokens == before
    with pytest.raises(ValueError, match="batch_size"):
        pipe.ask_batch([(None, "Hello?")], batch_size=0)
    assert pipe.ask_batch([]) == []
