"""Parsing and checking request bodies (OpenAI shapes), with errors that name the field and limit.

Each body is first checked against its pydantic model (:mod:`.api_models`: types, required fields,
enumerations), then against the server's semantics here: limits of :class:`.config.ServeConfig`,
the served model, and OpenAI parameters this server cannot honour.

OpenAI parameters that would change the answer and are not implemented (penalties, logit biases,
log probabilities, tools and functions, structured output, audio, predicted outputs, more than one
choice, image quality/style/background/format options, inpainting masks...) are answered 400 with
``param`` naming them and ``code`` ``unsupported_parameter`` - unless they hold their neutral value
(``0``, ``{}``, ``[]``, ``false``, ``{"type": "text"}``, ``"auto"``, ``"png"``...), which asks for
nothing this server does not do.  Silently ignoring them would give a client an answer it did not ask
for.  Harmless bookkeeping (``user``, ``metadata``, ``store: false``, ``service_tier``) is accepted.
Keys that are not parameters of OpenAI's API at all are accepted and ignored: clients send extras.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from ..inference.presets import sampler_settings
from ..inference.step_cache import StepCache, StepCacheError, step_cache
from .config import ServeConfig
from .api_models import ChatCompletionRequest, ImageEditFields, ImageEditRequest, ImageGenerationRequest, validate
from .errors import APIError, bad_request
from .images import ReadOptions


SEED_MIN, SEED_MAX = 0, 2**63 - 1  # what a torch generator takes, for every image's seed + k too


def parse_json(body: bytes) -> dict:
    """The body as a JSON object whose strings are valid Unicode and whose numbers are finite."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, or an integer literal past Python's digit limit
        raise bad_request(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    check_values(data)
    return data


def check_values(data, where: str = "") -> None:
    """Refuse (400, naming the field) a string holding a lone UTF-16 surrogate (``"\\ud800"``: no
    text can hold it) and a non-finite number (JSON ``NaN``/``Infinity``, or a literal too large
    for a float)."""
    stack = [(where, data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                field_ = path or "body"
                raise bad_request(f"{field_}: the text contains a lone UTF-16 surrogate (not valid Unicode)", field_,
                                  "invalid_text") from None
        elif isinstance(value, float) and not math.isfinite(value):
            field_ = path or "body"
            raise bad_request(f"{field_}: expected a finite number, got {value}", field_)
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(k, str):
                    stack.append((f"{path}.{k}" if path else k, k))  # keys must be valid text too
                stack.append((f"{path}.{k}" if path else str(k), v))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))


def _number(data: dict, key: str, default, lo: float, hi: float, *, integer: bool = False, hint: str = ""):
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise bad_request(f"{key}: expected {'an integer' if integer else 'a number'}, got {json.dumps(value)[:40]}", key)
    if isinstance(value, float) and not math.isfinite(value):
        raise bad_request(f"{key}: expected a finite number, got {value}", key)
    if not lo <= value <= hi:
        raise bad_request(f"{key}: {value} is outside [{lo:g}, {hi:g}]{hint}", key, "limit_exceeded" if hint else "invalid_value")
    return value


def check_model(data: dict, served: str) -> None:
    model = data.get("model")
    if model not in (None, "", served):
        raise APIError(404, f"model {model!r} is not served here; this server serves {served!r} (GET /v1/models)", param="model",
                       code="model_not_found")


@dataclass
class ChatMessage:
    role: str
    text: str
    images: list = field(default_factory=list)  # [(url, ReadOptions, where)] until decoded, then PIL images


@dataclass
class ChatRequest:
    messages: list[ChatMessage]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    stop: tuple[str, ...] = ()  # the answer ends before the first of these (not included)
    include_usage: bool = False  # stream_options.include_usage: a last chunk carries the usage


class FormFields(dict):
    """The text fields of a multipart request (every value a string: numbers are converted, and the
    shape is checked without strict types)."""


# OpenAI parameters this server does not implement: name -> (its neutral values, why it is refused)
UNSUPPORTED_CHAT = {
    "frequency_penalty": ((None, 0), "repetition penalties are not implemented"),
    "presence_penalty": ((None, 0), "repetition penalties are not implemented"),
    "logit_bias": ((None, {}), "token biases are not implemented"),
    "logprobs": ((None, False), "log probabilities are not returned"),
    "top_logprobs": ((None, 0), "log probabilities are not returned"),
    "tools": ((None, []), "tool calling is not supported"),
    "tool_choice": ((None, "none", "auto"), "tool calling is not supported"),
    "functions": ((None, []), "function calling is not supported"),
    "function_call": ((None, "none", "auto"), "function calling is not supported"),
    "parallel_tool_calls": ((None, True), "tool calling is not supported"),
    "response_format": ((None, {"type": "text"}), "structured output (JSON mode, JSON schemas) is not supported; answers are plain text"),
    "audio": ((None,), "audio output is not supported"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "reasoning effort cannot be set for this model"),
    "verbosity": ((None,), "answer verbosity cannot be set for this model"),
    "web_search_options": ((None,), "web search is not available"),
    "service_tier": ((None, "auto", "default"), "there is one service tier"),
    "store": ((None, False), "completions are never stored"),
}
UNSUPPORTED_IMAGES = {
    "quality": ((None, "auto", "standard"), "the model has one quality level"),
    "style": ((None,), "style options are not supported (a sampler preset is chosen with `preset`)"),
    "background": ((None, "auto", "opaque"), "images are always opaque"),
    "output_format": ((None, "png"), "images are always PNG"),
    "output_compression": ((None, 100), "images are always lossless PNG"),
    "moderation": ((None, "auto"), "there is no moderation level to choose"),
    "partial_images": ((None, 0), "partial images are not streamed"),
    "stream": ((None, False), "image generation is not streamed"),
}
UNSUPPORTED_EDITS = {
    "input_fidelity": ((None, "low"), "input fidelity cannot be chosen"),
}


def _is_neutral(value, neutral: tuple) -> bool:
    if value is None:
        return None in neutral
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):  # objects, lists, booleans: equal and same kind
        return any(type(n) is type(value) and n == value for n in neutral)
    if isinstance(value, (int, float)):
        return any(type(n) in (int, float) and n == value for n in neutral)  # 0.0 is 0
    # a string: the neutral string, or (a multipart form field) one that spells the neutral number or boolean
    return value in {n if isinstance(n, str) else json.dumps(n) for n in neutral if n is not None}


def check_unsupported(data: dict, table: dict) -> None:
    """400 naming the first parameter of ``table`` that ``data`` gives a value other than a neutral one."""
    for name, (neutral, why) in table.items():
        if name in data and not _is_neutral(data[name], neutral):
            allowed = [n if isinstance(n, str) else json.dumps(n) for n in neutral if n is not None]
            only = f" (only {' or '.join(allowed)} is accepted)" if allowed else ""
            raise bad_request(f"{name}: not supported by this server: {why}{only}", name, "unsupported_parameter")


def _stop(data: dict) -> tuple[str, ...]:
    stop = data.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not 1 <= len(stops) <= 4 or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("stop: expected a string or a list of 1 to 4 non-empty strings", "stop")
    return tuple(stops)


def parse_chat(data: dict, config: ServeConfig, served: str) -> ChatRequest:
    validate(ChatCompletionRequest, data)
    check_model(data, served)
    check_unsupported(data, UNSUPPORTED_CHAT)
    if data.get("n") not in (None, 1):
        raise bad_request("n: values other than 1 are not supported by this server: only 1 choice per request", "n",
                          "unsupported_parameter")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages: expected a non-empty list", "messages")
    parsed, chars, n_images = [], 0, 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise bad_request(f"{where}: expected an object with role system, developer, user or assistant", f"{where}.role")
        content = m.get("content")
        texts, images = [], []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                pw = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url":
                    ref = part.get("image_url")
                    ref = {"url": ref} if isinstance(ref, str) else ref
                    if not isinstance(ref, dict) or not isinstance(ref.get("url"), str):
                        raise bad_request(f"{pw}.image_url: expected {{\"url\": ...}}", f"{pw}.image_url")
                    if m["role"] != "user":
                        raise bad_request(f"{pw}: images are accepted in user messages only", pw)
                    images.append((ref["url"], ReadOptions.parse(ref, f"{pw}.image_url"), f"{pw}.image_url"))
                else:
                    raise bad_request(f"{pw}: expected a text or image_url part", pw)
        else:
            raise bad_request(f"{where}.content: expected a string or a list of parts", f"{where}.content")
        text = "\n".join(t for t in texts if t)
        if not text.strip():
            raise bad_request(f"{where}: the message has no text", f"{where}.content")
        chars += len(text)
        n_images += len(images)
        parsed.append(ChatMessage("system" if m["role"] == "developer" else m["role"], text, images))  # developer: OpenAI's new name
    if parsed[-1].role != "user":
        raise bad_request("messages: the last message must come from the user", "messages")
    if any(m.role == "system" for m in parsed[1:]):
        raise bad_request("messages: a system (or developer) message may only come first", "messages")
    if chars > config.max_prompt_chars:
        raise bad_request(f"messages: the prompt has {chars} characters; the limit is {config.max_prompt_chars} (max_prompt_chars)",
                          "messages", "prompt_too_long")
    if n_images > config.max_images_per_request:
        raise APIError(413, f"messages: {n_images} images; the limit is {config.max_images_per_request} per request "
                            "(max_images_per_request)", param="messages", code="too_many_images")
    stream = data.get("stream")
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise bad_request("stream: expected true or false", "stream")
    options = data.get("stream_options")
    if options is not None and not stream:
        raise bad_request("stream_options: only allowed when stream is true", "stream_options")
    include_usage = bool((options or {}).get("include_usage"))
    stop = _stop(data)
    seed = _seed(data, nullable=True)
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    return ChatRequest(
        parsed,
        max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", min(512, config.max_new_tokens), 1, config.max_new_tokens,
                           integer=True, hint=" (max_new_tokens limit)"),
        temperature=_number(data, "temperature", 0.1, 0.0, 2.0),
        top_p=_number(data, "top_p", 1.0, 1e-6, 1.0),
        seed=seed, stream=stream, stop=stop, include_usage=include_usage,
    )


@dataclass
class ImageRequest:
    prompt: str
    n: int
    width: int
    height: int
    seed: int
    preset: str  # a sampler preset name (unimedvl.inference.presets); the task's default when the request names none
    steps: int
    guidance: float | None = None  # overrides the preset's text guidance scale
    image_guidance: float | None = None  # overrides the preset's image guidance scale (edits)
    cache: StepCache | None = None  # step caching (unimedvl.inference.step_cache); None: every step computed


_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_image_request(data: dict, config: ServeConfig, served: str, *, edit: bool = False, default_size: str | None = None) -> ImageRequest:
    """An image generation or edit request (``data``: JSON, or :class:`FormFields` of a multipart edit).
    ``size`` absent or ``auto`` is ``default_size``."""
    form = isinstance(data, FormFields)
    validate((ImageEditFields if form else ImageEditRequest) if edit else ImageGenerationRequest, data, strict=not form)
    check_model(data, served)
    if edit and data.get("mask") is not None:
        raise bad_request("mask: inpainting masks are not supported; the edit applies to the whole image", "mask", "unsupported_parameter")
    check_unsupported(data, UNSUPPORTED_IMAGES | (UNSUPPORTED_EDITS if edit else {}))
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad_request("prompt: expected a non-empty string", "prompt")
    if len(prompt) > config.max_prompt_chars:
        raise bad_request(f"prompt: {len(prompt)} characters; the limit is {config.max_prompt_chars} (max_prompt_chars)", "prompt",
                          "prompt_too_long")
    fmt = data.get("response_format", "b64_json")
    if fmt not in (None, "b64_json"):
        raise bad_request("response_format: only b64_json is supported (images are never stored or served by URL)", "response_format")
    size = data.get("size")
    if size in (None, "", "auto"):
        size = default_size or f"{config.max_image_side}x{config.max_image_side}"
    match = _SIZE.match(str(size))
    if not match:
        raise bad_request(f"size: expected WIDTHxHEIGHT, got {size!r}", "size")
    width, height = int(match.group(1)), int(match.group(2))
    for side in (width, height):
        if not config.min_image_side <= side <= config.max_image_side:
            raise bad_request(f"size: {width}x{height} is outside {config.min_image_side}..{config.max_image_side} per side "
                              "(max_image_side)", "size", "limit_exceeded")
    check_values({k: v for k, v in data.items() if isinstance(v, str)})  # form fields too
    seed = _seed(_ints(data, "seed"), nullable=False)
    preset = data.get("preset") or None
    if preset is not None and not isinstance(preset, str):
        raise bad_request(f"preset: expected a preset name, got {json.dumps(preset)[:40]}", "preset")
    try:  # the task's default when the request names none; an unknown name is refused by the preset table itself
        settings = sampler_settings("image-to-image" if edit else "text-to-image", preset)
    except ValueError as e:
        raise bad_request(f"preset: {e}", "preset") from None
    try:
        cache = step_cache(_cache_field(data.get("cache")))
    except StepCacheError as e:
        raise bad_request(f"{e.field}: {e.reason}", e.field) from None
    n = _number(_ints(data, "n"), "n", 1, 1, config.max_images_generated, integer=True, hint=" (max_images_generated)")
    if seed + n - 1 > SEED_MAX:  # image k is drawn with seed + k
        raise bad_request(f"seed: {seed} is outside [{SEED_MIN}, {SEED_MAX - n + 1}] for n={n} (image k uses seed + k)", "seed")
    return ImageRequest(
        prompt=prompt,
        n=n,
        width=width, height=height, seed=seed, preset=settings.name,
        steps=_number(_ints(data, "steps"), "steps", min(settings.steps, config.max_steps), 2, config.max_steps,
                      integer=True, hint=" (max_steps)"),
        guidance=_number(_floats(data, "guidance"), "guidance", None, 0.0, 30.0),
        image_guidance=_number(_floats(data, "image_guidance"), "image_guidance", None, 0.0, 30.0) if edit else None,
        cache=cache,
    )


def _cache_field(value):
    """``cache`` as sent; an object given as text (a multipart form field) is decoded.  Its type is
    checked by :func:`~unimedvl.inference.step_cache.step_cache`."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise bad_request("cache: expected a cache name or an object of settings, got text that is not JSON", "cache") from None
    return value


def _seed(data: dict, nullable: bool) -> int | None:
    """``seed`` (default 42); ``null`` means unseeded where ``nullable``."""
    seed = data.get("seed", 42)
    if seed is None and nullable:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise bad_request("seed: expected an integer", "seed")
    if not SEED_MIN <= seed <= SEED_MAX:
        raise bad_request(f"seed: {seed if abs(seed) < 10**30 else 'the number'} is outside [{SEED_MIN}, {SEED_MAX}]", "seed")
    return seed


def _ints(data: dict, key: str) -> dict:
    """Form fields arrive as strings: convert integer-looking ones (an absent key stays absent)."""
    if key not in data:
        return {}
    value = data[key]
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return {key: int(value)}
    return {key: value}


def _floats(data: dict, key: str) -> dict:
    value = data.get(key)
    if isinstance(value, str):
        try:
            return {key: float(value)}
        except ValueError:
            return {key: value}
    return {key: value}
