"""The request and response models of the HTTP API (pydantic v2), and the OpenAPI document built
from them.

Requests are checked in two steps (:mod:`.schemas`): first their *shape* against the models here
(types, required fields, enumerations; a failure is a 400 whose ``param`` is the field path, e.g.
``messages[0].role``), then the *semantics* that depend on the server (limits from
:class:`.config.ServeConfig`, the served model's name, which OpenAI parameters are supported).
Numeric ranges and string lengths that the second step enforces with a message naming the limit
are shown in the OpenAPI document (``minimum``/``maximum``/``minLength``) but not enforced here,
so that their messages stay the ones naming the server's limit.

Unknown keys: every request object accepts keys it does not know and ignores them
(``additionalProperties: true`` in the document).  Clients built for OpenAI's API send extras (SDK
bookkeeping, provider-specific fields); refusing them would break those clients for no benefit.
OpenAI parameters that change an answer and that this server cannot honour are *known* keys and
are refused unless they hold their neutral value (see :mod:`.schemas`).

:func:`document_routes` attaches these models to the routes of an application made by
:func:`.app.create_app`, so that ``/openapi.json`` documents every body, success and error response.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from .errors import APIError

SEED_MAX = 2**63 - 1


def _limits(**keywords) -> dict:
    """Documentation-only JSON Schema keywords (enforced by the semantic checks, with their own messages)."""
    return {"json_schema_extra": keywords}


class _Request(BaseModel):
    """A request object: known fields are type-checked, unknown ones are accepted and ignored."""

    model_config = ConfigDict(extra="allow")


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---- chat completions: request ------------------------------------------------------------------

Axis = Literal["axial", "coronal", "sagittal", "0", "1", "2", 0, 1, 2]
Window = Union[str, Annotated[list[float], Field(min_length=2, max_length=2)]]


class ReadingOptions(_Request):
    """How a DICOM or NIfTI file is turned into one image (ignored for PNG/JPEG/TIFF/BMP)."""

    window: Window | None = Field(None, description="DICOM window: a preset name (e.g. `lung`, `bone`) or `[center, width]`")
    frame: int | None = Field(None, description="DICOM frame (multi-frame files)", **_limits(minimum=0))
    axis: Axis = Field("axial", description="NIfTI slicing plane: axial/coronal/sagittal, or a RAS voxel axis 0/1/2")
    slice_index: int | None = Field(None, description="NIfTI slice along `axis` (default: the middle one)", **_limits(minimum=0))


class ImageURL(ReadingOptions):
    url: str = Field(description="A data URL (`data:image/png;base64,...`; DICOM and NIfTI too), or a `file://` URL under the "
                                 "operator's allowed folders.  Remote URLs are not fetched.")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="Accepted for compatibility; the model sees every image "
                                                                              "at its own resolution")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: Union[str, ImageURL] = Field(description="The image: a URL string, or an object with `url` and reading options")


def _part_kind(part: Any) -> str | None:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return {"text": "TextPart", "image_url": "ImagePart"}.get(kind) if isinstance(kind, str) else None


ContentPart = Annotated[Union[Annotated[TextPart, Tag("TextPart")], Annotated[ImagePart, Tag("ImagePart")]], Discriminator(_part_kind)]


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="`developer` is taken as `system`; a system/developer message may only come first; the last message "
                    "must come from the user; images only in user messages")
    content: Union[str, list[ContentPart]]
    name: str | None = None


class StreamOptions(_Request):
    include_usage: bool | None = Field(None, description="Send a last chunk with `usage` and no choices before `[DONE]`")


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``.  Parameters listed as *not supported* are accepted only at their neutral value."""

    messages: list[Message] = Field(**_limits(minItems=1))
    model: str | None = Field(None, description="The served model's id (GET /v1/models); empty or absent means that one")
    max_tokens: int | None = Field(None, description="Cap on generated tokens (at most the server's max_new_tokens)", **_limits(minimum=1))
    max_completion_tokens: int | None = Field(None, description="Same as max_tokens (takes precedence)", **_limits(minimum=1))
    temperature: float | None = Field(None, **_limits(minimum=0, maximum=2))
    top_p: float | None = Field(None, **_limits(exclusiveMinimum=0, maximum=1))
    seed: int | None = Field(None, description="null: unseeded; absent: 42", **_limits(minimum=0, maximum=SEED_MAX))
    n: int | None = Field(None, description="Only 1 is supported", **_limits(minimum=1, maximum=1))
    stream: bool | None = Field(None, description="Answer as server-sent events of chat.completion.chunk objects")
    stream_options: StreamOptions | None = Field(None, description="Only with stream: true")
    stop: Union[str, Annotated[list[str], Field(min_length=1, max_length=4)], None] = Field(
        None, description="Up to 4 non-empty sequences; the answer ends before the first one produced")
    user: str | None = Field(None, description="Accepted and ignored")
    metadata: dict[str, Any] | None = Field(None, description="Accepted and ignored")
    store: bool | None = Field(None, description="Only false: completions are never stored")
    # OpenAI parameters this server does not implement: refused unless neutral
    frequency_penalty: float | None = Field(None, description="Not supported: only 0")
    presence_penalty: float | None = Field(None, description="Not supported: only 0")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: only {}")
    logprobs: bool | None = Field(None, description="Not supported: only false")
    top_logprobs: int | None = Field(None, description="Not supported: only 0")
    tools: list[Any] | None = Field(None, description="Not supported: only []")
    tool_choice: Union[str, dict[str, Any], None] = Field(None, description="Not supported: only `none` or `auto` (no tools)")
    functions: list[Any] | None = Field(None, description="Not supported: only []")
    function_call: Union[str, dict[str, Any], None] = Field(None, description="Not supported: only `none` or `auto`")
    parallel_tool_calls: bool | None = Field(None, description="Not supported: only true (the default)")
    response_format: dict[str, Any] | None = Field(None, description='Not supported: only {"type": "text"}')
    audio: dict[str, Any] | None = Field(None, description="Not supported")
    modalities: list[str] | None = Field(None, description='Not supported: only ["text"]')
    prediction: dict[str, Any] | None = Field(None, description="Not supported")
    reasoning_effort: str | None = Field(None, description="Not supported")
    verbosity: str | None = Field(None, description="Not supported")
    web_search_options: dict[str, Any] | None = Field(None, description="Not supported")
    service_tier: str | None = Field(None, description="Only `auto` or `default`")


# ---- images: requests ----------------------------------------------------------------------------

SIZE_PATTERN = r"^(auto|[0-9]+x[0-9]+)$"


class StepCacheSettings(_Request):
    """Step caching settings: a cache (``preset``) with single fields overridden."""

    preset: str | None = Field(None, description="A step-cache name (default: taylorseer)")
    method: str | None = Field(None, description="taylorseer")
    interval: int | None = Field(None, description="One full forward every N steps", **_limits(minimum=1))
    order: int | None = Field(None, description="Forecast order", **_limits(minimum=0, maximum=3))
    warmup: int | None = Field(None, description="First steps always computed (at least order + 1)", **_limits(minimum=1))
    final: int | None = Field(None, description="Last steps always computed", **_limits(minimum=0))


class ImageGenerationRequest(_Request):
    """``POST /v1/images/generations``.  Parameters listed as *not supported* are accepted only at their neutral value."""

    prompt: str = Field(**_limits(minLength=1))
    model: str | None = None
    n: int | None = Field(None, description="Images to make (at most the server's max_images_generated)", **_limits(minimum=1))
    size: str | None = Field(None, description="WIDTHxHEIGHT within the server's side limits; `auto` or absent: the server's default",
                             **_limits(pattern=SIZE_PATTERN))
    seed: int | None = Field(None, description="Image k uses seed + k (default 42)", **_limits(minimum=0, maximum=SEED_MAX))
    preset: str | None = Field(None, description="A sampler preset name (default: the task's own)")
    steps: int | None = Field(None, description="Sampling steps (at most the server's max_steps)", **_limits(minimum=2))
    guidance: float | None = Field(None, description="Text guidance scale (overrides the preset's)", **_limits(minimum=0, maximum=30))
    cache: str | StepCacheSettings | None = Field(
        None, description="Step caching: `none` (default), `taylorseer`, `taylorseer-fast`, `taylorseer-safe`, or an object of settings; "
                          "skipped steps forecast every guidance branch's velocity")
    response_format: str | None = Field(None, description="Only b64_json")
    user: str | None = Field(None, description="Accepted and ignored")
    quality: str | None = Field(None, description="Not supported: only `auto` or `standard`")
    style: str | None = Field(None, description="Not supported")
    background: str | None = Field(None, description="Not supported: only `auto` or `opaque`")
    output_format: str | None = Field(None, description="Not supported: only `png`")
    output_compression: int | None = Field(None, description="Not supported: only 100")
    moderation: str | None = Field(None, description="Not supported: only `auto`")
    partial_images: int | None = Field(None, description="Not supported: only 0")
    stream: bool | None = Field(None, description="Not supported: only false")


class ImageEditFields(ImageGenerationRequest):
    """The fields of an edit besides its images (what a multipart edit's text fields are checked against)."""

    image_guidance: float | None = Field(None, description="Image guidance scale (overrides the preset's)", **_limits(minimum=0, maximum=30))
    mask: Any = Field(None, description="Not supported: an edit applies to the whole image")
    input_fidelity: str | None = Field(None, description="Not supported: only `low`")
    window: Window | None = Field(None, description="DICOM window for the input images: a preset name or `[center, width]`")
    frame: int | None = Field(None, **_limits(minimum=0))
    axis: Axis | None = Field(None, description="NIfTI slicing plane for the input images")
    slice_index: int | None = Field(None, **_limits(minimum=0))
    size: str | None = Field(None, description="WIDTHxHEIGHT of the result; `auto` or absent: the input's size", **_limits(pattern=SIZE_PATTERN))


class ImageEditRequest(ImageEditFields):
    """``POST /v1/images/edits`` as JSON."""

    image: Union[str, Annotated[list[str], Field(min_length=1)]] = Field(description="A data URL, or a list of them")


BINARY = {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}


def _edit_form_schema() -> dict:
    """``POST /v1/images/edits`` as multipart/form-data (OpenAI's own form): ``image`` files plus text fields."""
    fields = ImageEditFields.model_json_schema(ref_template="#/components/schemas/{model}")
    properties = {"image": {"type": "array", "items": BINARY, "minItems": 1,
                            "description": "One or more image files (one `image` part each): PNG/JPEG/TIFF/BMP, DICOM or NIfTI"},
                  "image[]": {"type": "array", "items": BINARY, "description": "Same as image"}}
    for name, prop in fields["properties"].items():
        if name == "mask":
            properties[name] = dict(BINARY, description="Not supported: an edit applies to the whole image")
            continue
        types = {s.get("type") for s in prop.get("anyOf", [prop])} - {"null", None}
        text = {k: v for k, v in prop.items() if k in ("description", "pattern", "minimum", "maximum", "minLength", "title")}
        if types <= {"integer"} and types:
            properties[name] = {"type": "integer", **text}
        elif types <= {"integer", "number"} and types:
            properties[name] = {"type": "number", **text}
        elif types <= {"boolean"} and types:
            properties[name] = {"type": "boolean", **text}
        else:
            properties[name] = {"type": "string", **text}
    return {"type": "object", "title": "ImageEditForm", "required": ["image", "prompt"], "properties": properties,
            "additionalProperties": True}


# ---- responses -----------------------------------------------------------------------------------


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(_Response):
    role: Literal["assistant"]
    content: str


class Choice(_Response):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Response):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(_Response):
    """One ``data:`` event of a streamed answer.  With ``stream_options.include_usage`` the last chunk
    before ``[DONE]`` has ``usage`` and no choices."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ImageData(_Response):
    b64_json: str = Field(description="A base64 PNG carrying the synthetic-image metadata")
    revised_prompt: str | None = None


class ImagesResponse(_Response):
    created: int
    model: str
    synthetic: Literal[True]
    notice: str
    data: list[ImageData]


class ModelCard(_Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Response):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Response):
    status: str
    model: str
    running: int
    queued: int


class ErrorDetail(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorDetail


REQUEST_MODELS = (ChatCompletionRequest, ImageGenerationRequest, ImageEditRequest)
RESPONSE_MODELS = (ChatCompletion, ChatCompletionChunk, ImagesResponse, ModelList, Health, ErrorResponse)


# ---- validation errors -> APIError ---------------------------------------------------------------

_LABELS = {"str", "int", "float", "bool", "none", "list", "dict"}


def field_path(loc: tuple) -> str:
    """``('messages', 0, 'content', 'list[...]', 1, 'ImagePart', 'image_url')`` -> ``messages[0].content[1].image_url``:
    pydantic's union-member labels (type names, model and tag names, which all start upper case here) are dropped."""
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif "[" in item or item in _LABELS or item[:1].isupper():
            continue
        else:
            out += f".{item}" if out else item
    return out


def _got(value) -> str:
    try:
        return json.dumps(value)[:40]
    except (TypeError, ValueError):
        return type(value).__name__


PARTS = "expected a string or a list of parts"
ROLE = "expected an object with role system, developer, user or assistant"
# messages the semantic checks gave before these models existed (clients and tests match on them)
_OVERRIDES: list[tuple[str, Any]] = [
    (r"messages", lambda p, e: ("messages: expected a non-empty list", "messages")),
    (r"messages\[\d+\](\.role)?", lambda p, e: (f"{p.removesuffix('.role')}: {ROLE}", f"{p.removesuffix('.role')}.role")),
    (r"messages\[\d+\]\.content", lambda p, e: (f"{p}: {PARTS}", p)),
    (r"(messages\[\d+\]\.content\[\d+\])(\.type|\.text)?", lambda p, e: (f"{_head(p)}: expected a text or image_url part", _head(p))),
    (r"(messages\[\d+\]\.content\[\d+\]\.image_url)(\.url)?", lambda p, e: (f'{_head(p)}: expected {{"url": ...}}', _head(p))),
    (r".*\baxis", lambda p, e: (f"{p}: expected axial, coronal or sagittal, or a RAS voxel axis 0, 1 or 2; got {e.get('input')!r}", p)),
    (r"(.*\bwindow)(\[\d+\])?", lambda p, e: (f"{_head(p)}: expected a preset name or [center, width]", _head(p))),
    (r".*\b(frame|slice_index)", lambda p, e: (f"{p}: expected a non-negative integer", p)),
    (r"stream", lambda p, e: ("stream: expected true or false", "stream")),
    (r"seed", lambda p, e: ("seed: expected an integer", "seed")),
    (r"stop(\[\d+\])?", lambda p, e: ("stop: expected a string or a list of 1 to 4 non-empty strings", "stop")),
    (r"prompt", lambda p, e: ("prompt: expected a non-empty string", "prompt")),
    (r"image", lambda p, e: ("image: expected one or more input images" if e["type"] == "missing"
                             else "image: expected a data URL or a list of them", "image")),
    (r"image\[\d+\]", lambda p, e: ("image: expected a data URL or a list of them", "image")),
    (r"preset", lambda p, e: (f"preset: expected a preset name, got {_got(e.get('input'))}", "preset")),
]

_PHRASES = {"int_type": "expected an integer", "int_from_float": "expected an integer", "float_type": "expected a number",
            "string_type": "expected a string", "bool_type": "expected true or false", "list_type": "expected a list",
            "dict_type": "expected an object", "model_type": "expected an object", "missing": "this field is required"}


def _head(path: str) -> str:
    """``a[0].image_url.url`` -> ``a[0].image_url``; ``x.window[1]`` -> ``x.window``: the object the message is about."""
    return re.sub(r"(\.(url|type|text)|\[\d+\])$", "", path)


def validation_error(error: ValidationError) -> APIError:
    """The 400 for a request that does not fit its model: the deepest failing field (the union member
    the input came closest to), with ``param`` its path."""
    errors = error.errors(include_url=False)
    best = max(errors, key=lambda e: len(field_path(e["loc"])))
    path = field_path(best["loc"]) or "body"
    for pattern, make in _OVERRIDES:
        if re.fullmatch(pattern, path):
            message, param = make(path, best)
            return APIError(400, message, param=param, code="invalid_value")
    phrase = _PHRASES.get(best["type"])
    if phrase is None:
        msg = best["msg"]
        phrase = "expected " + msg[len("Input should be "):] if msg.startswith("Input should be ") else msg[:1].lower() + msg[1:]
    got = f", got {_got(best['input'])}" if best["type"] != "missing" and not isinstance(best.get("input"), dict) else ""
    return APIError(400, f"{path}: {phrase}{got}", param=path, code="invalid_value")


def validate(model: type[BaseModel], data: dict, *, strict: bool = True) -> BaseModel:
    """``data`` as ``model`` (strict: no string-to-number coercion, as JSON is typed; form fields are
    checked with ``strict=False``), or the 400 naming the field."""
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as e:
        raise validation_error(e) from None


# ---- the OpenAPI document -----------------------------------------------------------------------

ERROR_TEXT = {
    400: "The request is malformed or asks for something unsupported; `param` names the field",
    401: "Missing or wrong API key (only when the server has one)",
    403: "A `file://` image outside the operator's allowed folders",
    404: "The named model is not served here",
    413: "The body, an image, a volume or the number of images is over a limit (named in the message)",
    429: "The server is busy (queue full); retry after `Retry-After` seconds",
    500: "An unexpected server error (details only in the server log)",
    504: "The request took longer than the server's request timeout (queueing included)",
}
MODEL_ERRORS = (400, 401, 404, 413, 429, 500, 504)
IMAGE_ERRORS = (400, 401, 403, 404, 413, 429, 500, 504)  # requests taking image URLs: a file outside --allow-files is 403


def _ref(model: type[BaseModel] | str) -> dict:
    return {"$ref": f"#/components/schemas/{model if isinstance(model, str) else model.__name__}"}


def _json(model) -> dict:
    return {"application/json": {"schema": _ref(model)}}


SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "description": "One server-sent event: `data` is a chat.completion.chunk (or, if the answer fails after it started, an "
                   "error object), and the last event's `data` is `[DONE]`",
    "properties": {
        "data": {"type": "string",
                 "if": {"const": "[DONE]"},
                 "else": {"contentMediaType": "application/json",
                          "contentSchema": {"anyOf": [_ref(ChatCompletionChunk), _ref(ErrorResponse)]}}},
    },
}


def _errors(codes) -> dict:
    out = {str(code): {"description": ERROR_TEXT[code], "content": _json(ErrorResponse)} for code in codes}
    if "429" in out:
        out["429"]["headers"] = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}}
    return out


def _operation(request: dict | None, ok: dict, errors, summary: str, ok_text: str = "Success", headers: dict | None = None) -> dict:
    extra: dict = {"summary": summary, "responses": {"200": {"description": ok_text, "content": ok}, **_errors(errors)}}
    if 401 in errors:  # the key is optional: a server started without one answers without it
        extra["security"] = [{}, {"bearerAuth": []}]
    if headers:
        extra["responses"]["200"]["headers"] = headers
    if request is not None:
        extra["requestBody"] = {"required": True, "content": request}
    return extra


SYNTHETIC_HEADER = {"X-Synthetic-Content": {"description": "Always `true`: the images are synthetic", "schema": {"type": "string"}}}

OPERATIONS = {
    ("POST", "/v1/chat/completions"): _operation(
        _json(ChatCompletionRequest),
        {"application/json": {"schema": _ref(ChatCompletion)}, "text/event-stream": {"schema": SSE_EVENT}},
        IMAGE_ERRORS, "Answer a conversation about medical images",
        "The answer (application/json), or with `stream: true` server-sent events of chat.completion.chunk"),
    ("POST", "/v1/images/generations"): _operation(
        _json(ImageGenerationRequest), _json(ImagesResponse), MODEL_ERRORS,
        "Generate synthetic medical images", "Base64 PNGs carrying the synthetic-image metadata", SYNTHETIC_HEADER),
    ("POST", "/v1/images/edits"): _operation(
        {"application/json": {"schema": _ref(ImageEditRequest)},
         "multipart/form-data": {"schema": _ref("ImageEditForm"),
                                 "encoding": {"image": {"contentType": "application/octet-stream"}}}},
        _json(ImagesResponse), IMAGE_ERRORS, "Edit images (PNG/JPEG/TIFF/BMP, DICOM or NIfTI) into synthetic ones",
        "Base64 PNGs carrying the synthetic-image metadata", SYNTHETIC_HEADER),
    ("GET", "/v1/models"): _operation(None, _json(ModelList), (401, 500), "The served model"),
    ("GET", "/health"): _operation(None, _json(Health), (500,), "Liveness and load (never needs a key)"),
    ("GET", "/metrics"): _operation(None, {"text/plain": {"schema": {"type": "string"}}}, (401, 500),
                                    "Prometheus metrics (text exposition format 0.0.4)"),
}


def component_schemas() -> dict:
    """Every model's JSON Schema, keyed by name, with references into ``#/components/schemas``."""
    from pydantic.json_schema import models_json_schema

    _, top = models_json_schema([(m, "validation") for m in REQUEST_MODELS] + [(m, "serialization") for m in RESPONSE_MODELS],
                                ref_template="#/components/schemas/{model}")
    schemas = dict(top.get("$defs", {}))
    schemas["ImageEditForm"] = _edit_form_schema()
    for model in REQUEST_MODELS:  # requests accept unknown keys (see the module's docstring)
        schemas[model.__name__].setdefault("additionalProperties", True)
    return schemas


def document_routes(app) -> None:
    """Attach request bodies, success and error responses to ``app``'s API routes (FastAPI merges a
    route's ``openapi_extra`` into its operation when it writes ``/openapi.json``) and add the models
    to the document's components."""
    from fastapi.routing import APIRoute

    for route in app.router.routes:
        if not isinstance(route, APIRoute):
            continue
        for method in route.methods:
            extra = OPERATIONS.get((method, route.path))
            if extra is not None:
                route.openapi_extra = json.loads(json.dumps(extra))  # a private copy: FastAPI merges into it
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = original()
            components = document.setdefault("components", {})
            components.setdefault("schemas", {}).update(component_schemas())
            components.setdefault("securitySchemes", {})["bearerAuth"] = {
                "type": "http", "scheme": "bearer", "description": "Only when the server was started with an API key"}
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi
