"""Faults of the HTTP server found by the audit: metrics labelled by route template and counting every
status, 504 (never 499) for timeouts without stray asyncio errors, request lines logged at the
default level, invalid text and numbers answered 400 naming the field, decompression bombs
answered with the pixel limit, and impossible ``serve`` options refused before the model loads."""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
import struct
import threading
import zlib

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from serving_helpers import RunningServer, free_port  # noqa: E402


@pytest.fixture(scope="module")
def server(pipe):
    from unimedvl.serving import ServeConfig, create_app

    config = ServeConfig(max_image_side=64, min_image_side=16, max_steps=4, max_new_tokens=8, max_image_pixels=256 * 256,
                         max_body_bytes=200_000, request_timeout_s=120, ui=False)
    app = create_app(pipe, config)
    running = RunningServer(app, free_port())
    running.app = app
    yield running
    running.stop()


def metrics_text(server) -> str:
    return httpx.get(server.url + "/metrics").text


def post_raw(server, path: str, raw: bytes, **kwargs):
    return httpx.post(server.url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=120, **kwargs)


def bomb_png(side: int = 30000) -> bytes:
    """A valid PNG header claiming ``side x side`` pixels, with a tiny (truncated) body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


# ---- metrics ----------------------------------------------------------------------------------------


def _series(text: str) -> set[str]:
    """The metric series in a Prometheus text page: name and labels, without the value."""
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_metrics_label_route_templates_not_raw_paths(server):
    import random
    import string

    httpx.get(server.url + "/no-such-route")  # the unmatched series exists from here on
    metrics_text(server)  # and so does /metrics' own (counted after it answers)
    before = _series(metrics_text(server))
    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits + "-_.~%"
    for i in range(100):
        path = "/" + "/".join("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(1, 4)))
        r = httpx.get(server.url + path + f"/evil%22%7D%20attacker_text_{i}")
        assert r.status_code in (404, 400), (path, r.status_code)
    text = metrics_text(server)
    assert "attacker_text" not in text and "evil" not in text
    assert 'unimedvl_requests_total{route="unmatched",status="404"}' in text
    assert _series(text) <= before | {'unimedvl_requests_total{route="unmatched",status="400"}'}  # 100 random paths: no new series
    httpx.get(server.url + "/health?x=" + "y" * 50)
    assert 'route="/health",status="200"' in metrics_text(server)


def test_metrics_count_body_limit_413s(server):
    r = post_raw(server, "/v1/chat/completions", b"x" * 300_000)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: refused while streaming in
        for _ in range(5):
            yield b"x" * 100_000

    assert post_raw(server, "/v1/chat/completions", chunks()).status_code == 413
    assert 'unimedvl_requests_total{route="/v1/chat/completions",status="413"} 2' in metrics_text(server)


class BrokenPipeline:
    """Just enough of a pipeline for create_app; answering fails unexpectedly."""

    name = "broken"
    default_image_size = 64

    def chat(self, think: bool = False):
        raise RuntimeError("an unexpected failure")


def test_unexpected_errors_are_json_500s_counted_and_logged(caplog):
    from unimedvl.serving import ServeConfig, create_app

    running = RunningServer(create_app(BrokenPipeline(), ServeConfig(ui=False)), free_port())
    try:
        with caplog.at_level(logging.INFO, logger="unimedvl.serve"):
            r = httpx.post(running.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=60)
            assert r.status_code == 500 and r.headers["content-type"].startswith("application/json")
            assert r.json()["error"]["type"] == "server_error"
            assert httpx.get(running.url + "/health").status_code == 200  # still serving (and the 500 is logged by now)
            text = httpx.get(running.url + "/metrics").text
        assert 'unimedvl_requests_total{route="/v1/chat/completions",status="500"} 1' in text
        lines = [rec.getMessage() for rec in caplog.records if rec.name == "unimedvl.serve"]
        assert any(line.startswith("POST /v1/chat/completions 500 ") for line in lines), lines
        assert any(rec.exc_info for rec in caplog.records if rec.name == "unimedvl.serve" and rec.levelno == logging.ERROR)
    finally:
        running.stop()


# ---- request logging -----------------------------------------------------------------------------


def test_requests_are_logged_with_route_status_and_latency(server, caplog):
    with caplog.at_level(logging.INFO, logger="unimedvl.serve"):
        httpx.get(server.url + "/v1/models?secret=abc")
        httpx.get(server.url + "/no/such/path/secret")
        httpx.get(server.url + "/health")  # the lines above are logged by the time this one answers
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "unimedvl.serve"]
    assert any(line.startswith("GET /v1/models 200 ") and line.endswith("s") for line in lines), lines
    assert any(line.startswith("GET unmatched 404 ") for line in lines), lines
    assert not any("secret" in line for line in lines)


def test_serve_logs_unimedvl_at_info_by_default():
    import logging.config

    from unimedvl.serving.config import uvicorn_log_config

    config = uvicorn_log_config()
    assert config["loggers"]["unimedvl"]["level"] == "INFO" and config["loggers"]["unimedvl"]["handlers"]
    logger = logging.getLogger("unimedvl")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    try:
        logging.config.dictConfig(config)
        assert logging.getLogger("unimedvl.serve").isEnabledFor(logging.INFO) and logger.handlers
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


# ---- timeouts ------------------------------------------------------------------------------------


def test_a_queue_timeout_is_504_not_499():
    from unimedvl.serving.errors import APIError
    from unimedvl.serving.worker import Cancelled, CancelToken, ModelWorker

    worker = ModelWorker(max_concurrency=1, max_queue=1, timeout_s=30)
    token = CancelToken()
    with pytest.raises(Cancelled):  # a job whose deadline passed while it waited never starts
        worker._run(lambda tok: "ran", token, deadline=0.0)
    assert token.timed_out

    def expired_in_queue(tok):  # what _run does when the job is picked up after its deadline
        tok.cancel("timed out in the queue")
        tok.check()

    with pytest.raises(APIError) as err:
        asyncio.run(worker.run(expired_in_queue))
    assert err.value.status == 504 and "request_timeout_s" in err.value.message

    def client_gone(tok):
        tok.cancel("the client disconnected")
        tok.check()

    with pytest.raises(APIError) as err:
        asyncio.run(worker.run(client_gone))
    assert err.value.status == 499
    worker.shutdown()


def test_a_timed_out_queued_job_answers_504(caplog):
    from unimedvl.serving.errors import APIError
    from unimedvl.serving.worker import ModelWorker

    worker = ModelWorker(max_concurrency=1, max_queue=2, timeout_s=0.4)
    release = threading.Event()
    blocker = worker._executor.submit(lambda: release.wait(5))  # the only model thread is busy
    try:
        with pytest.raises(APIError) as err:
            asyncio.run(worker.run(lambda tok: "never"))
        assert err.value.status == 504
    finally:
        release.set()
        blocker.result(timeout=5)
    worker.shutdown()


def test_a_504_leaves_no_unretrieved_future_exception(caplog):
    from unimedvl.serving.errors import APIError
    from unimedvl.serving.worker import ModelWorker

    worker = ModelWorker(max_concurrency=1, max_queue=0, timeout_s=0.3)
    stopped = threading.Event()

    def slow(token):
        try:
            for _ in range(200):
                token.check()
                threading.Event().wait(0.01)
        finally:
            stopped.set()

    async def main():
        with pytest.raises(APIError) as err:
            await worker.run(slow)
        assert err.value.status == 504
        assert await asyncio.get_running_loop().run_in_executor(None, stopped.wait, 5)
        await asyncio.sleep(0.1)  # let the done-callback run on this loop

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(main())
        gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    worker.shutdown()


# ---- invalid text and numbers ------------------------------------------------------------------


def error_of(r, status=400):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    return r.json()["error"]


def test_a_lone_surrogate_is_a_400_naming_the_field(server):
    body = b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi \\ud800 there"}]}], "max_tokens": 2}'
    error = error_of(post_raw(server, "/v1/chat/completions", body))
    assert error["param"] == "messages[0].content[0].text" and "surrogate" in error["message"]
    error = error_of(post_raw(server, "/v1/images/generations", b'{"prompt": "\\udfff", "size": "32x32"}'))
    assert error["param"] == "prompt"
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": 2**70}),
    ("/v1/images/generations", {"prompt": "x", "size": "32x32", "seed": 2**70}),
    ("/v1/images/generations", {"prompt": "x", "size": "32x32", "seed": -1}),
])
def test_an_out_of_range_seed_is_a_400_naming_field_and_range(server, path, body):
    error = error_of(httpx.post(server.url + path, json=body, timeout=60))
    assert error["param"] == "seed" and "outside [0, " in error["message"]


def test_the_last_seeds_of_n_images_must_fit_too(server):
    body = {"prompt": "x", "size": "32x32", "seed": 2**63 - 1, "n": 2}
    error = error_of(httpx.post(server.url + "/v1/images/generations", json=body, timeout=60))
    assert error["param"] == "seed" and "n=2" in error["message"]


@pytest.mark.parametrize("raw, param", [
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', "top_p"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}', "temperature"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,", "window": [NaN, 400]}},'
     b' {"type": "text", "text": "hi"}]}]}', "messages[0].content[0].image_url.window[0]"),
])
def test_non_finite_numbers_are_400s(server, raw, param):
    error = error_of(post_raw(server, "/v1/chat/completions", raw))
    assert error["param"] == param and "finite" in error["message"]


def test_non_finite_form_numbers_are_400s(server):
    r = httpx.post(server.url + "/v1/images/edits", timeout=60, files={"image": ("a.png", bomb_png(8), "image/png")},
                   data={"prompt": "x", "size": "32x32", "guidance": "nan"})
    assert error_of(r)["param"] == "guidance"


def test_a_huge_integer_literal_is_a_400(server):
    raw = b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}"
    assert error_of(post_raw(server, "/v1/chat/completions", raw))["type"]


# ---- decompression bombs --------------------------------------------------------------------------


def test_a_decompression_bomb_png_names_the_pixel_limit(server):
    url = "data:image/png;base64," + base64.b64encode(bomb_png()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}]}
    error = error_of(httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60), 413)
    assert "900000000 pixels; the limit is 65536 (max_image_pixels)" in error["message"]
    assert error["param"] == "messages[0].content[0].image_url"
    r = httpx.post(server.url + "/v1/images/edits", timeout=60, files={"image": ("a.png", bomb_png(), "image/png")},
                   data={"prompt": "x", "size": "32x32"})
    assert "the limit is 65536 (max_image_pixels)" in error_of(r, 413)["message"]


# ---- serve options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--timeout", "-1"], "timeout"),
    (["--timeout", "nan"], "timeout"),
    (["--port", "99999"], "port must be an integer in 1..65535"),
    (["--port", "0"], "port"),
    (["--max-image-pixels", "0"], "max_image_pixels must be >= 1"),
    (["--max-volume-voxels", "-5"], "max_volume_voxels must be >= 1"),
])
def test_serve_refuses_impossible_options_before_loading(monkeypatch, args, message):
    from typer.testing import CliRunner

    import unimedvl.cli.serve as serve_cli
    from unimedvl.cli import app

    def no_loading(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(serve_cli, "load_pipeline", no_loading)
    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_serve_config_checks_port_and_timeout():
    from unimedvl.serving import ServeConfig

    for bad in ({"port": 99999}, {"port": -1}, {"request_timeout_s": 0}, {"request_timeout_s": float("inf")},
                {"max_body_bytes": 0}, {"min_image_side": 128, "max_image_side": 64}):
        with pytest.raises(ValueError):
            ServeConfig(**bad)
    assert ServeConfig(port=65535, request_timeout_s=0.5).port == 65535
