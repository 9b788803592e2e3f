"""Continuous batching of chat answers: answers decoded together equal the answers decoded alone
(greedy, and sampled with their seed), each keeps its own limit, stop strings and cancellation,
requests join a running batch between steps, and the token accounting is OpenAI's (``max_tokens``
generated tokens exactly; ``prompt_tokens`` counts image tokens)."""

from __future__ import annotations

import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from serving_helpers import RunningServer, free_port, png_data_url, sse_events  # noqa: E402

QUESTIONS = ["What is shown?", "Describe the image.", "Is there an abnormality?", "Which organ is this?",
             "What modality is this?", "Any fracture?", "Where is the lesion?", "Summarise the findings."]


def make_server(pipe, max_batch: int):
    from unimedvl.serving import ServeConfig, create_app

    app = create_app(pipe, ServeConfig(max_batch=max_batch, max_new_tokens=64, max_queue=32, request_timeout_s=120, ui=False))
    running = RunningServer(app, free_port())
    running.app = app
    return running


@pytest.fixture(scope="module")
def batched(pipe):
    running = make_server(pipe, 8)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def single(pipe):
    running = make_server(pipe, 1)
    yield running
    running.stop()


def body(i: int, *, image: bool, max_tokens: int, **extra) -> dict:
    content = [{"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": png_data_url(i, size=(40 + 8 * (i % 3), 40))}})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0, **extra}


def post(server, payload: dict):
    r = httpx.post(server.url + "/v1/chat/completions", json=payload, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def image_of(i: int) -> Image.Image:
    url = png_data_url(i, size=(40 + 8 * (i % 3), 40))
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def alone(pipe, i: int, *, image: bool, max_tokens: int, temperature: float = 0.0, seed: int = 42):
    # the pipeline follows the reference (the last step's prediction is dropped): max_tokens + 1
    return pipe.ask([image_of(i)] if image else [], QUESTIONS[i % len(QUESTIONS)], max_new_tokens=max_tokens + 1,
                    temperature=temperature, seed=seed)


def concurrently(server, payloads: list[dict]) -> list[dict]:
    with ThreadPoolExecutor(len(payloads)) as pool:
        return list(pool.map(lambda p: post(server, p), payloads))


# ---- answers ---------------------------------------------------------------------------------------


def test_concurrent_greedy_answers_equal_the_answers_decoded_alone(batched, single, pipe):
    payloads = [body(i, image=i % 2 == 0, max_tokens=4 + 3 * i) for i in range(8)]
    together = concurrently(batched, payloads)
    one_at_a_time = concurrently(single, payloads)
    for i, (out, out_single) in enumerate(zip(together, one_at_a_time)):
        expected = alone(pipe, i, image=i % 2 == 0, max_tokens=4 + 3 * i)
        assert out["choices"][0]["message"]["content"] == expected.text, i
        assert out_single["choices"][0]["message"]["content"] == expected.text, i
        assert out["usage"]["completion_tokens"] == len(expected.token_ids) <= 4 + 3 * i
        assert out["choices"][0]["finish_reason"] == ("stop" if expected.finished else "length")


def test_seeded_sampled_answers_equal_the_answers_decoded_alone(batched, pipe):
    payloads = [body(i, image=i % 2 == 1, max_tokens=10, temperature=0.9, seed=1000 + i) for i in range(6)]
    together = concurrently(batched, payloads)
    for i, out in enumerate(together):
        expected = alone(pipe, i, image=i % 2 == 1, max_tokens=10, temperature=0.9, seed=1000 + i)
        assert out["choices"][0]["message"]["content"] == expected.text, i


def test_max_tokens_is_the_number_of_generated_tokens(batched):
    for n in (1, 2, 5):
        out = post(batched, body(3, image=False, max_tokens=n))
        usage = out["usage"]
        if out["choices"][0]["finish_reason"] == "length":
            assert usage["completion_tokens"] == n
        else:
            assert usage["completion_tokens"] < n
    one = post(batched, body(1, image=False, max_tokens=1))
    assert one["usage"]["completion_tokens"] == 1 or one["choices"][0]["finish_reason"] == "stop"
    if one["choices"][0]["finish_reason"] == "length":
        assert one["choices"][0]["message"]["content"] != ""


def test_prompt_tokens_count_every_image_token(batched, pipe):
    with_image = post(batched, body(0, image=True, max_tokens=2))["usage"]["prompt_tokens"]
    without = post(batched, body(0, image=False, max_tokens=2))["usage"]["prompt_tokens"]
    pixels = pipe.transform("understanding_vit")(image_of(0), img_num=1)  # [3, h, w]
    p = pipe.engine.config.vit.patch_size
    patches = (pixels.shape[1] // p) * (pixels.shape[2] // p)
    assert with_image - without == patches + 2  # the patches and the image's start/end markers
    ctx = pipe.chat().add_user(QUESTIONS[0])
    assert without == ctx.length + 1  # the question's text item and the <|im_start|> opening the answer


# ---- stop strings ----------------------------------------------------------------------------------


def test_stop_strings_end_the_answer_before_them_streamed_or_not(batched, pipe):
    full = alone(pipe, 2, image=True, max_tokens=20).text
    assert len(full) > 12, full
    stop = full[6:9]
    cut = full.find(stop)
    plain = post(batched, body(2, image=True, max_tokens=20, stop=[stop, "\u2603never"]))
    assert plain["choices"][0]["message"]["content"] == full[:cut]
    assert plain["choices"][0]["finish_reason"] == "stop"
    r = httpx.post(batched.url + "/v1/chat/completions", json=body(2, image=True, max_tokens=20, stop=stop, stream=True), timeout=120)
    chunks = [e for e in sse_events(r.text) if e != "[DONE]"]
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert "".join(pieces) == full[:cut] and stop not in "".join(pieces)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_held_back_is_the_longest_suffix_that_could_start_a_stop_string():
    from unimedvl.serving.batcher import held_back

    assert held_back("the cat sa", ("sat", "xyz")) == 2
    assert held_back("the cat s", ("sat",)) == 1
    assert held_back("the cat", ("sat",)) == 0
    assert held_back("ab", ("abc", "b")) == 2
    assert held_back("", ("abc",)) == 0


# ---- streaming and usage -----------------------------------------------------------------------------


def test_streams_equal_plain_answers_and_carry_usage_when_asked(batched):
    payload = body(4, image=True, max_tokens=9)
    plain = post(batched, payload)
    r = httpx.post(batched.url + "/v1/chat/completions", json={**payload, "stream": True, "stream_options": {"include_usage": True}},
                   timeout=120)
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == plain["choices"][0]["message"]["content"]
    no_usage = sse_events(httpx.post(batched.url + "/v1/chat/completions", json={**payload, "stream": True}, timeout=120).text)
    assert all("usage" not in c for c in no_usage[:-1])


# ---- the batch itself --------------------------------------------------------------------------------


def make_request(i: int, max_tokens: int, **fields):
    from unimedvl.serving.schemas import ChatMessage, ChatRequest

    return ChatRequest([ChatMessage("user", QUESTIONS[i % len(QUESTIONS)], [image_of(i)] if i % 2 else [])], max_tokens=max_tokens,
                       temperature=0.0, top_p=1.0, seed=42, stream=False, **fields)


def test_waiting_requests_join_between_steps_and_decode_in_one_forward(pipe):
    from unimedvl.serving.batcher import ChatBatcher, ChatJob
    from unimedvl.serving.metrics import Metrics
    from unimedvl.serving.worker import CancelToken

    metrics = Metrics()
    batcher = ChatBatcher(pipe, max_batch=4, metrics=metrics)
    try:
        with batcher._wake:  # hold the batch thread while six requests arrive
            jobs = [ChatJob(make_request(i, 6), CancelToken()) for i in range(6)]
            futures = [batcher.submit(job) for job in jobs]
        results = [f.result(timeout=60) for f in futures]
    finally:
        batcher.shutdown()
    for i, result in enumerate(results):
        expected = alone(pipe, i, image=i % 2 == 1, max_tokens=6)
        assert result["text"] == expected.text
    # four answers started together and two joined as places freed up: fewer steps than answers x
    # tokens, and never more than max_batch at once
    generated = sum(r["usage"]["completion_tokens"] for r in results)
    assert metrics.decoded_tokens == generated + sum(r["finish_reason"] == "stop" for r in results)
    assert metrics.decode_steps < metrics.decoded_tokens
    assert metrics.decoded_tokens / metrics.decode_steps > 1.5
    assert metrics.decode_steps >= generated / 4


def test_a_cancelled_answer_leaves_and_the_others_finish(pipe):
    from unimedvl.serving.batcher import ChatBatcher, ChatJob
    from unimedvl.serving.worker import Cancelled, CancelToken

    batcher = ChatBatcher(pipe, max_batch=4)
    cancel = CancelToken()
    pieces: list[str] = []

    def on_piece(piece: str) -> None:
        pieces.append(piece)
        cancel.cancel("the client disconnected")  # after its first piece

    try:
        with batcher._wake:
            doomed = batcher.submit(ChatJob(make_request(0, 30), cancel, on_piece=on_piece))
            others = [batcher.submit(ChatJob(make_request(i, 8), CancelToken())) for i in (1, 2)]
        with pytest.raises(Cancelled, match="disconnected"):
            doomed.result(timeout=60)
        results = [f.result(timeout=60) for f in others]
    finally:
        batcher.shutdown()
    assert len(pieces) == 1
    for i, result in zip((1, 2), results):
        assert result["text"] == alone(pipe, i, image=i % 2 == 1, max_tokens=8).text


def test_a_failing_prefill_fails_only_its_request(pipe):
    from unimedvl.inference.engine import PromptTooLongError
    from unimedvl.serving.batcher import ChatBatcher, ChatJob
    from unimedvl.serving.schemas import ChatMessage, ChatRequest
    from unimedvl.serving.worker import CancelToken

    window = pipe.engine.context_window
    too_long = ChatRequest([ChatMessage("user", "word " * (window + 10))], max_tokens=4, temperature=0.0, top_p=1.0, seed=1, stream=False)
    batcher = ChatBatcher(pipe, max_batch=4)
    try:
        with batcher._wake:
            bad = batcher.submit(ChatJob(too_long, CancelToken()))
            good = batcher.submit(ChatJob(make_request(1, 5), CancelToken()))
        with pytest.raises(PromptTooLongError):
            bad.result(timeout=60)
        assert good.result(timeout=60)["text"] == alone(pipe, 1, image=True, max_tokens=5).text
    finally:
        batcher.shutdown()


def test_max_batch_must_be_positive(pipe):
    from unimedvl.serving import ServeConfig
    from unimedvl.serving.batcher import ChatBatcher

    with pytest.raises(ValueError, match="max_batch"):
        ServeConfig(max_batch=0)
    with pytest.raises(ValueError, match="max_batch"):
        ChatBatcher(pipe, max_batch=0)


def test_health_counts_batched_answers_as_running(batched):
    worker = batched.app.app.state.worker
    assert worker.capacity == worker.max_concurrency + 8 + 4 + worker.max_queue  # chat and image batches
    seen = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(httpx.get(batched.url + "/health").json()["running"])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        concurrently(batched, [body(i, image=True, max_tokens=30) for i in range(4)])
    finally:
        stop.set()
        watcher.join()
    assert max(seen) >= 1 and httpx.get(batched.url + "/health").json()["running"] == 0


# ---- one model thread --------------------------------------------------------------------------------


def test_every_forward_of_the_server_runs_on_its_model_thread(pipe, monkeypatch):
    """Chat prefill and decoding, text-to-image denoising and edits all run on one thread (one
    OpenMP team on a CPU), the one given to create_app."""
    from unimedvl.serving import ServeConfig, create_app
    from unimedvl.serving.model_thread import ModelThread

    seen: set[str] = set()
    forward = pipe.engine.forward

    def recording_forward(*args, **kwargs):
        seen.add(threading.current_thread().name)
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.engine, "forward", recording_forward)
    model_thread = ModelThread(name="the-model-thread")
    app = create_app(pipe, ServeConfig(max_image_side=32, min_image_side=16, max_steps=2, ui=False), model_thread=model_thread)
    server = RunningServer(app, free_port())
    try:
        with ThreadPoolExecutor(3) as pool:
            chats = [pool.submit(post, server, body(i, image=i == 0, max_tokens=3)) for i in range(3)]
            [c.result() for c in chats]
        r = httpx.post(server.url + "/v1/images/generations", json={"prompt": "axial brain MRI", "size": "32x32", "steps": 2}, timeout=120)
        assert r.status_code == 200, r.text
        r = httpx.post(server.url + "/v1/images/edits", json={"image": png_data_url(1), "prompt": "Translate to FLAIR.", "steps": 2}, timeout=120)
        assert r.status_code == 200, r.text
    finally:
        server.stop()
    assert seen == {"the-model-thread"}
    assert model_thread.run(lambda: threading.current_thread().name) == "the-model-thread"  # it outlives an app it was given to


def test_the_model_thread_returns_results_raises_errors_and_runs_nested_calls_inline():
    from unimedvl.serving.model_thread import ModelThread

    thread = ModelThread()
    assert thread.run(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(KeyError, match="missing"):
        thread.run(lambda: {}["missing"])
    assert thread.run(lambda: thread.run(lambda: threading.current_thread().name)) == "unimedvl-model"  # no deadlock
    thread.shutdown()
