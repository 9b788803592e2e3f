"""The HTTP server: OpenAI-compatible endpoints over one loaded pipeline, and the web UI at ``/ui``.

* ``POST /v1/chat/completions`` - messages with text and ``image_url`` parts (data URLs; local
  files only under ``allowed_file_roots``; DICOM/NIfTI with ``window``/``frame``/``axis``/
  ``slice_index`` beside ``url``); ``stream: true`` answers as server-sent events;
* ``POST /v1/images/generations`` and ``POST /v1/images/edits`` (JSON, or multipart for edits) -
  base64 PNGs carrying the synthetic-image metadata;
* ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).

Every request is held to the limits of :class:`.config.ServeConfig`; errors are OpenAI-shaped
JSON with the field and the limit named.  Logs carry route, status and latency only - never
prompts or pixels.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from .. import __version__
from .access import ApiKeyGuard
from .config import ServeConfig
from .errors import APIError, bad_request
from .images import ReadOptions, decode_image, image_from_url
from .metrics import UNMATCHED, Metrics
from .api_models import document_routes
from .schemas import ChatRequest, FormFields, parse_chat, parse_image_request, parse_json
from .batcher import ChatBatcher, ChatJob
from .image_batcher import ImageBatcher, ImageJob
from .model_thread import ModelThread
from .worker import CancelToken, ModelWorker, _collect

log = logging.getLogger("unimedvl.serve")
_READY, _END = object(), object()


class Gate:
    """The outermost ASGI layer: measures and logs every request (route template, status, latency -
    whatever answered it: a route, the body limit, or an unexpected error) and refuses bodies over
    ``limit`` bytes - by Content-Length when it is given (the server holds the body to it), else by
    reading the body first and replaying it to the app.  ``app`` is the FastAPI application."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    def _error(self, size: str) -> APIError:
        return APIError(413, f"the request body {size}; the limit is {self.limit} bytes (max_body_bytes)", code="body_too_large")

    def route_of(self, scope) -> str:
        """The template of the route ``scope`` matches (a mount counts as its prefix), else ``unmatched``."""
        from starlette.routing import Match

        partial = None
        for route in self.app.router.routes:
            try:
                match, _ = route.matches(scope)
            except Exception:  # noqa: BLE001 - a route that cannot judge the path does not match it
                continue
            if match == Match.FULL:
                return getattr(route, "path", None) or UNMATCHED
            if match == Match.PARTIAL and partial is None:
                partial = getattr(route, "path", None)
        return partial or UNMATCHED

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = None

        async def send_measured(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._limited(scope, receive, send_measured)
        except Exception:  # noqa: BLE001 - answered (JSON 500) and logged here, once
            log.error("unhandled error on %s %s", _method(scope), self.route_of(scope), exc_info=True)
            if status is None:
                await _send_error(send_measured, INTERNAL_ERROR)
        finally:
            route = self.route_of(scope)
            elapsed = time.perf_counter() - t0
            code = status if status is not None else 499  # the client left before any answer
            self.metrics.observe(route, code, elapsed)
            log.info("%s %s %d %.3fs", _method(scope), route, code, elapsed)

    async def _limited(self, scope, receive, send):
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit():
            if int(length) > self.limit:
                return await _send_error(send, self._error(f"has {int(length)} bytes"))
            return await self.app(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await _send_error(send, self._error(f"exceeds {self.limit} bytes"))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


BodyLimit = Gate  # the former name
INTERNAL_ERROR = APIError(500, "internal server error (details are in the server log)", code="internal_error")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _method(scope) -> str:
    method = scope.get("method", "")
    return method if method in METHODS else "OTHER"  # never echo an arbitrary token into the log


async def _send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(pipeline, config: ServeConfig | None = None, model_thread: ModelThread | None = None):
    """The FastAPI application serving ``pipeline`` (loaded once, by the caller - best on
    ``model_thread``, the thread that will run it: see :mod:`.model_thread`)."""
    config = config or ServeConfig()
    metrics = Metrics()
    owned = model_thread is None  # a thread made here ends with the app; a caller's outlives it
    model_thread = model_thread or ModelThread()
    batcher = ChatBatcher(pipeline, config.max_batch, metrics, model_thread=model_thread)
    image_batcher = ImageBatcher(pipeline, config.max_image_batch, model_thread=model_thread)
    worker = ModelWorker(config.max_concurrency, config.max_queue, config.request_timeout_s, batchers=(batcher, image_batcher),
                         model_thread=model_thread)
    served = pipeline.name
    started = int(time.time())
    @asynccontextmanager
    async def lifespan(_app):
        yield
        worker.shutdown()
        if owned:
            model_thread.shutdown()

    app = FastAPI(title="UniMedVL", version=__version__, lifespan=lifespan,
                  description="Medical image understanding and generation. Outputs are not for clinical use; generated images are synthetic.")
    app.state.worker, app.state.metrics, app.state.config, app.state.pipeline = worker, metrics, config, pipeline

    @app.exception_handler(APIError)
    async def api_error(_request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(Exception)
    async def internal_error(_request, _error: Exception):  # JSON, not Starlette's plain text; Gate logs it
        return JSONResponse(INTERNAL_ERROR.body(), status_code=500)

    app.add_middleware(ApiKeyGuard, api_key=config.api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served, "running": worker.running, "queued": worker.queued}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served, "object": "model", "created": started, "owned_by": "unimedvl"}]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(worker.running, worker.queued), media_type="text/plain; version=0.0.4")

    def decode_chat_images(req: ChatRequest) -> None:
        for m in req.messages:
            m.images = [image_from_url(url, opts, config, where) for url, opts, where in m.images]

    def submit_chat(req: ChatRequest, on_start=None, on_piece=None):
        def submit(token: CancelToken):
            future = batcher.submit(ChatJob(req, token, on_start=on_start, on_piece=on_piece))
            future.add_done_callback(lambda f: not f.cancelled() and f.exception() is None
                                     and metrics.add_tokens(f.result()["usage"]["completion_tokens"]))
            return future
        return submit

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_chat(parse_json(await request.body()), config, served)
        prepare = (lambda: decode_chat_images(req)) if any(m.images for m in req.messages) else None
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            out = await _run_model(worker, submit_chat(req), request, prepare=prepare, batched=True)
            return {"id": cid, "object": "chat.completion", "created": created, "model": served,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                                 "finish_reason": out["finish_reason"]}], "usage": out["usage"]}
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        token = CancelToken()

        def emit(item):
            loop.call_soon_threadsafe(queue.put_nowait, item)

        task = asyncio.create_task(_run_model(worker, submit_chat(req, lambda: emit(_READY), emit), request, prepare=prepare,
                                              token=token, watch_client=False, batched=True))
        task.add_done_callback(lambda t: emit(_END))  # after the last piece: the batcher emits before it finishes
        task.add_done_callback(_collect)  # a stream the client abandoned never awaits it
        getter = asyncio.ensure_future(queue.get())
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done() and task.exception() is not None:  # refused before the work ran (queue full, timed out waiting)
            getter.cancel()
            await task  # raises the APIError
        if await getter is not _READY:  # failed before decoding started: a plain JSON error
            await task  # raises the APIError / PromptTooLongError
            raise APIError(500, "the answer ended before it started")

        def chunk(delta: dict, finish=None) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": served,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if req.include_usage:
                body["usage"] = None  # OpenAI: null on every chunk but the last, usage-only one
            return "data: " + json.dumps(body) + "\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while (item := await queue.get()) is not _END:
                    yield chunk({"content": item})
                try:
                    out = await task
                    yield chunk({}, out["finish_reason"])
                    if req.include_usage:
                        yield "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created, "model": served,
                                                     "choices": [], "usage": out["usage"]}) + "\n\n"
                except APIError as e:
                    yield "data: " + json.dumps(e.body()) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if not task.done():
                    token.cancel("the client disconnected")

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    side = min(pipeline.default_image_size, config.max_image_side)  # the model's own scale (1024 for the official weights)
    default_size = f"{side}x{side}"

    def image_response(results: list) -> JSONResponse:
        from ..formats.generated import SYNTHETIC_NOTICE, png_bytes

        data = [{"b64_json": base64.b64encode(png_bytes(r.image, r.record)).decode(), "revised_prompt": None} for r in results]
        metrics.add_images(len(results))
        return JSONResponse({"created": int(time.time()), "model": served, "synthetic": True, "notice": SYNTHETIC_NOTICE, "data": data},
                            headers={"X-Synthetic-Content": "true"})

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        req = parse_image_request(parse_json(await request.body()), config, served, default_size=default_size)

        def submit(token: CancelToken):  # denoised together with waiting requests of the same size and setting
            return image_batcher.submit(ImageJob(req, token))

        return image_response(await _run_model(worker, submit, request, batched=True))

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        fields, uploads = await _edit_fields(request, config)
        has_size = bool(fields.get("size"))
        req = parse_image_request(fields, config, served, edit=True, default_size=default_size)
        options = ReadOptions.parse({k: _maybe_int(fields.get(k)) for k in ("window", "frame", "axis", "slice_index") if fields.get(k) is not None},
                                    "image")
        if not uploads:
            raise bad_request("image: expected one or more input images", "image")
        if len(uploads) > config.max_images_per_request:
            raise APIError(413, f"image: {len(uploads)} images; the limit is {config.max_images_per_request} (max_images_per_request)",
                           param="image", code="too_many_images")
        images: list = []

        def decode_uploads() -> None:  # after admission, on a decoding thread
            images.extend(decode_image(data, options, config, f"image[{i}]") if isinstance(data, bytes)
                          else image_from_url(data, options, config, f"image[{i}]") for i, data in enumerate(uploads))

        def work(token: CancelToken):
            size = {"height": req.height, "width": req.width} if has_size else {}
            return [pipeline.edit(images, req.prompt, preset=req.preset, steps=req.steps, cfg_text_scale=req.guidance,
                                  cfg_img_scale=req.image_guidance, cache=req.cache, seed=req.seed + k,
                                  progress=token.check, **size)
                    for k in range(req.n)]

        return image_response(await _run_model(worker, work, request, prepare=decode_uploads))

    document_routes(app)
    app.state.ui = False  # whether /ui is served: asked for and gradio importable
    if config.ui:
        try:
            import gradio  # noqa: F401
        except ImportError:
            log.warning("web UI disabled: gradio is not installed (pip install 'unimedvl[serve]')")
        else:
            from .ui import mount_ui

            app = mount_ui(app, pipeline, worker, config)
            app.state.ui = True

    return Gate(app, config.max_body_bytes, metrics)


async def _run_model(worker: ModelWorker, work, request, *, prepare=None, token: CancelToken | None = None, watch_client: bool = True,
                     batched: bool = False):
    """``work`` on the model after admission (and after ``prepare``, which decodes the request's
    images under the same admission); ``batched``: ``work(token)`` hands the request to the chat
    batcher and returns its future.  The model's own refusals become 400s."""
    from ..inference.engine import PromptTooLongError

    run = worker.run_batched if batched else worker.run
    try:
        return await run(work, prepare=prepare, is_disconnected=request.is_disconnected if watch_client else None, token=token)
    except PromptTooLongError as e:
        raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
    except ValueError as e:  # bad sizes, empty texts and the like, found by the pipeline
        raise bad_request(str(e)) from None


def _maybe_int(value):
    return int(value) if isinstance(value, str) and value.isdigit() else value


async def _edit_fields(request, config: ServeConfig) -> tuple[dict, list]:
    """Form fields and images of an edit request: multipart (``image`` files, as OpenAI's API) or JSON
    (``image``: a data URL or a list of them)."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=config.max_images_per_request + 1, max_fields=64)
        except APIError:
            raise
        except Exception as e:  # malformed multipart
            raise bad_request(f"the multipart body could not be parsed ({type(e).__name__})", code="invalid_multipart") from None
        uploads = [await f.read() for key in ("image", "image[]") for f in form.getlist(key) if hasattr(f, "read")]
        fields = FormFields((k, v) for k, v in form.items() if isinstance(v, str))
        if form.getlist("mask"):  # an uploaded mask file: the parser refuses it (no inpainting)
            fields["mask"] = "(uploaded file)"
        if fields.get("size") == "auto":  # auto = absent: the input's size
            del fields["size"]
        return fields, uploads
    data = parse_json(await request.body())
    image = data.get("image")
    uploads = image if isinstance(image, list) else ([image] if image else [])
    if not all(isinstance(u, str) for u in uploads):
        raise bad_request("image: expected a data URL or a list of them", "image")
    if data.get("size") == "auto":
        del data["size"]
    return data, uploads


