"""The HTTP API on a loopback port with the tiny fixture: schema-valid answers, streaming equal to
non-streaming, synthetic-marked images, and bad input answered with the right status while the
server keeps serving."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading

import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from serving_helpers import RunningServer, free_port, png_data_url, sse_events  # noqa: E402

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    from unimedvl.serving import ServeConfig, create_app

    allowed = tmp_path_factory.mktemp("allowed")
    Image.new("RGB", (40, 40), (90, 90, 90)).save(allowed / "scan.png")
    config = ServeConfig(api_key=KEY, max_image_side=64, min_image_side=16, max_steps=8, max_prompt_chars=600,
                         max_image_pixels=256 * 256, max_body_bytes=1_000_000, max_new_tokens=64, allowed_file_roots=(allowed,),
                         request_timeout_s=120, ui=False)
    app = create_app(pipe, config)
    running = RunningServer(app, free_port())
    running.allowed = allowed
    running.app = app
    yield running
    running.stop()


def post(server, path, body=None, headers=AUTH, **kwargs):
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120, **kwargs)


def chat_body(question="What is shown?", image=True, **extra):
    content = [{"type": "text", "text": question}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": png_data_url(0)}})
    return {"model": "official_tiny_a", "messages": [{"role": "user", "content": content}], "max_tokens": 12, "temperature": 0, **extra}


def test_health_models_and_metrics(server):
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "official_tiny_a"
    models = httpx.get(server.url + "/v1/models", headers=AUTH).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "official_tiny_a"
    metrics = httpx.get(server.url + "/metrics", headers=AUTH).text
    assert 'unimedvl_requests_total{route="/v1/models",status="200"}' in metrics and "unimedvl_requests_queued 0" in metrics


def test_chat_answers_like_the_pipeline_and_streaming_matches(server, pipe):
    r = post(server, "/v1/chat/completions", chat_body())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "official_tiny_a" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["completion_tokens"] >= 1 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    image = Image.open(io.BytesIO(base64.b64decode(png_data_url(0).split(",", 1)[1])))
    # max_tokens counts generated tokens (OpenAI); the pipeline follows the reference, whose last
    # decoding step's prediction is dropped: max_new_tokens = max_tokens + 1 gives the same tokens
    direct = pipe.ask([image], "What is shown?", max_new_tokens=13, temperature=0)
    assert choice["message"]["content"] == direct.text
    assert usage["completion_tokens"] == len(direct.token_ids)

    streamed = post(server, "/v1/chat/completions", chat_body(stream=True))
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks) and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_chat_replays_a_transcript_like_a_conversation(server, pipe):
    conv = pipe.chat()
    first = conv.ask("Describe the image.", [Image.new("RGB", (32, 32), (200, 10, 10))], max_new_tokens=8, temperature=0)
    second = conv.ask("Anything else?", max_new_tokens=8, temperature=0)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe the image."}]},
                {"role": "assistant", "content": first.text},
                {"role": "user", "content": "Anything else?"}]
    r = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 7, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == second.text  # 7 tokens = the pipeline's max_new_tokens=8


def test_image_generation_returns_synthetic_pngs(server):
    r = post(server, "/v1/images/generations", {"prompt": "Frontal chest radiograph.", "size": "32x32", "n": 2, "steps": 3, "seed": 7})
    assert r.status_code == 200, r.text
    assert r.headers["x-synthetic-content"] == "true"
    body = r.json()
    assert body["synthetic"] is True and len(body["data"]) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in body["data"]]
    for im in images:
        assert im.size == (32, 32) and im.text["Synthetic"] == "true"
    records = [json.loads(im.text["unimedvl"]) for im in images]
    assert [r["seed"] for r in records] == [7, 8] and records[0]["sampler"]["num_timesteps"] == 3


def test_edits_accept_a_dicom_upload_with_a_window(server):
    from pydicom.data import get_testdata_file

    dicom = open(get_testdata_file("CT_small.dcm"), "rb").read()
    r = httpx.post(server.url + "/v1/images/edits", headers=AUTH, timeout=120,
                   files={"image": ("ct.dcm", dicom, "application/dicom")},
                   data={"prompt": "Increase the contrast.", "size": "32x32", "steps": "3", "window": "lung"})
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert out.size == (32, 32) and out.text["Synthetic"] == "true"
    # the same file in chat, as a data URL with a window preset
    url = "data:application/dicom;base64," + base64.b64encode(dicom).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "window": "lung"}},
                                                       {"type": "text", "text": "Which organ?"}]}], "max_tokens": 4}
    assert post(server, "/v1/chat/completions", body).status_code == 200
    body["messages"][0]["content"][0]["image_url"]["window"] = "nonsense"
    bad = post(server, "/v1/chat/completions", body)
    assert bad.status_code == 400 and "unknown window preset 'nonsense'" in bad.json()["error"]["message"]


@pytest.mark.parametrize("case", ["malformed_json", "not_an_image", "oversized_image", "prompt_too_long", "max_tokens", "remote_url",
                                  "file_not_allowed", "too_many_images", "empty_messages", "wrong_model", "bad_size", "too_many_n"])
def test_bad_requests_get_the_right_status_and_message(server, case):
    big = png_data_url(1, size=(300, 300))
    cases = {
        "malformed_json": (lambda: httpx.post(server.url + "/v1/chat/completions", content=b'{"messages": [', headers=AUTH),
                           400, "not valid JSON"),
        "not_an_image": (lambda: post(server, "/v1/chat/completions",
                                      {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                       {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hello").decode()}}]}]}),
                         400, "messages[0].content[1].image_url: not a readable image"),
        "oversized_image": (lambda: post(server, "/v1/chat/completions", chat_body() | {"messages": [{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": big}}, {"type": "text", "text": "hi"}]}]}),
                            413, "300x300 = 90000 pixels; the limit is 65536 (max_image_pixels)"),
        "prompt_too_long": (lambda: post(server, "/v1/chat/completions", chat_body("word " * 200, image=False)),
                            400, "the prompt has 1000 characters; the limit is 600 (max_prompt_chars)"),
        "max_tokens": (lambda: post(server, "/v1/chat/completions", chat_body(max_tokens=1000)), 400, "max_tokens: 1000 is outside [1, 64]"),
        "remote_url": (lambda: post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
                       {"type": "image_url", "image_url": {"url": "https://example.org/x.png"}}, {"type": "text", "text": "hi"}]}]}),
                       400, "remote URLs are not fetched"),
        "file_not_allowed": (lambda: post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
                             {"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}, {"type": "text", "text": "hi"}]}]}),
                             403, "only read under the folders the operator allows"),
        "too_many_images": (lambda: post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": png_data_url(0, (8, 8))}}] * 9 + [{"type": "text", "text": "hi"}]}]}),
                            413, "9 images; the limit is 8"),
        "empty_messages": (lambda: post(server, "/v1/chat/completions", {"messages": []}), 400, "messages: expected a non-empty list"),
        "wrong_model": (lambda: post(server, "/v1/chat/completions", chat_body() | {"model": "gpt-4o"}), 404, "'gpt-4o' is not served here"),
        "bad_size": (lambda: post(server, "/v1/images/generations", {"prompt": "x", "size": "4096x4096"}), 400,
                     "4096x4096 is outside 16..64 per side (max_image_side)"),
        "too_many_n": (lambda: post(server, "/v1/images/generations", {"prompt": "x", "size": "32x32", "n": 9}), 400, "n: 9 is outside [1, 4]"),
    }
    send, status, message = cases[case]
    r = send()
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"]
    assert httpx.get(server.url + "/health").status_code == 200  # still serving


def test_allowed_local_files_and_body_limit(server):
    ok = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"file://{server.allowed / 'scan.png'}"}}, {"type": "text", "text": "hi"}]}], "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    huge = httpx.post(server.url + "/v1/chat/completions", content=b"x" * 1_100_000, headers=AUTH | {"Content-Type": "application/json"})
    assert huge.status_code == 413 and "max_body_bytes" in huge.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(12):
            yield b"x" * 100_000

    streamed = httpx.post(server.url + "/v1/chat/completions", content=chunks(), headers=AUTH | {"Content-Type": "application/json"})
    assert streamed.status_code == 413 and "exceeds 1000000 bytes; the limit is 1000000 bytes (max_body_bytes)" in streamed.json()["error"]["message"]


def test_api_key_is_required_and_checked(server):
    assert httpx.get(server.url + "/v1/models").status_code == 401
    wrong = httpx.post(server.url + "/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/models", headers={"X-API-Key": KEY}).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200  # liveness stays open


def test_a_full_queue_answers_429_and_frees_up(server):
    worker = server.app.app.state.worker
    held = [worker.admit() for _ in range(worker.capacity)]  # occupy every slot
    try:
        r = post(server, "/v1/chat/completions", chat_body())
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and "busy" in r.json()["error"]["message"]
        streamed = httpx.post(server.url + "/v1/chat/completions", json=chat_body(stream=True), headers=AUTH, timeout=10)
        assert streamed.status_code == 429 and "busy" in streamed.json()["error"]["message"]  # refused, not a hung stream
    finally:
        for _ in held:
            worker.release()
    assert post(server, "/v1/chat/completions", chat_body()).status_code == 200


def test_context_overflow_found_by_the_model_is_a_400():
    from unimedvl.inference.engine import PromptTooLongError
    from unimedvl.serving.app import _run_model
    from unimedvl.serving.errors import APIError
    from unimedvl.serving.worker import ModelWorker

    def overflow(token):
        raise PromptTooLongError("a text of 40000 tokens needs 40002 positions after 0 already used, but the context window is 32768")

    class Request:
        async def is_disconnected(self):
            return False

    with pytest.raises(APIError) as err:
        asyncio.run(_run_model(ModelWorker(1, 0, 30), overflow, Request()))
    assert (err.value.status, err.value.code) == (400, "context_length_exceeded") and "32768" in err.value.message


def test_non_loopback_hosts_need_a_key():
    from unimedvl.serving import ServeConfig

    with pytest.raises(ValueError, match="set an API key"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="0.0.0.0", api_key="k").host == "0.0.0.0"
    assert ServeConfig(host="::1").api_key is None


# ---- the worker: timeouts and cancellation ---------------------------------------------------------


def test_worker_times_out_and_cancels_cooperatively():
    from unimedvl.serving.errors import APIError
    from unimedvl.serving.worker import ModelWorker

    worker = ModelWorker(max_concurrency=1, max_queue=0, timeout_s=0.5)
    stopped = threading.Event()

    def slow(token):
        for _ in range(200):  # a model loop checking its token between steps
            token.check()
            threading.Event().wait(0.02)
        return "finished"

    def watched(token):
        try:
            return slow(token)
        finally:
            stopped.set()

    with pytest.raises(APIError) as err:
        asyncio.run(worker.run(watched))
    assert err.value.status == 504
    assert stopped.wait(2)  # the work stopped soon after the timeout instead of running 4 s
    assert worker.admitted == 0


def test_worker_cancels_when_the_client_disconnects():
    from unimedvl.serving.errors import APIError
    from unimedvl.serving.worker import CancelToken, ModelWorker

    worker = ModelWorker(max_concurrency=1, max_queue=1, timeout_s=30)
    token = CancelToken()

    async def gone():
        return True

    def loop(tok):
        while True:
            tok.check()
            threading.Event().wait(0.01)

    with pytest.raises(APIError) as err:
        asyncio.run(worker.run(loop, is_disconnected=gone, token=token))
    assert err.value.status == 499 and token.cancelled and "disconnected" in token.reason


def test_nifti_uploads_take_axis_and_slice_options(server, tmp_path):
    import nibabel as nib
    import numpy as np

    volume = np.zeros((20, 20, 10), dtype=np.float32)
    volume[:, :, 3] = 100.0  # only axial slice 3 is bright
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii.gz")
    data = (tmp_path / "v.nii.gz").read_bytes()
    url = "data:application/gzip;base64," + base64.b64encode(data).decode()

    def ask(**options):
        return post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url, **options}}, {"type": "text", "text": "Describe."}]}], "max_tokens": 2})

    assert ask(axis="axial", slice_index=3).status_code == 200
    out_of_range = ask(axis="axial", slice_index=50)
    assert out_of_range.status_code == 400 and "slice" in out_of_range.json()["error"]["message"]
    assert "the uploaded file" in out_of_range.json()["error"]["message"] and "/tmp" not in out_of_range.json()["error"]["message"]
    assert ask(axis="oblique").status_code == 400


def test_startup_line_names_only_the_routes_served(server, pipe):
    from unimedvl.cli.serve import startup_line
    from unimedvl.serving import ServeConfig, create_app

    assert server.app.app.state.ui is False  # built with ui=False
    line = startup_line("m", "127.0.0.1", 8000, ui=server.app.app.state.ui, api_key=True)
    assert "/ui" not in line and "/v1" in line and "/openapi.json" in line and "loopback only" not in line
    pytest.importorskip("gradio")
    with_ui = create_app(pipe, ServeConfig(ui=True))
    assert with_ui.app.state.ui is True
    assert "UI: /ui" in startup_line("m", "127.0.0.1", 8000, ui=with_ui.app.state.ui, api_key=False)
