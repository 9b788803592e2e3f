"""OpenAI request semantics: the developer role, ``stop``, ``stream_options``, parameters this server
does not implement (refused naming them unless neutral), ``size: auto`` and edit masks."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from serving_helpers import RunningServer, free_port, png_data_url, sse_events  # noqa: E402

from unimedvl.serving.config import ServeConfig  # noqa: E402
from unimedvl.serving.errors import APIError  # noqa: E402
from unimedvl.serving.schemas import FormFields, parse_chat, parse_image_request  # noqa: E402

CONFIG = ServeConfig(max_image_side=32, min_image_side=16, max_steps=2, max_new_tokens=4, ui=False)
USER = {"role": "user", "content": "What is shown?"}


def chat(**extra):
    return parse_chat({"messages": [USER], **extra}, CONFIG, "tiny")


def refused(parse, *args, **kwargs) -> APIError:
    with pytest.raises(APIError) as err:
        parse(*args, **kwargs)
    assert err.value.status == 400, err.value.message
    return err.value


# ---- parsing -------------------------------------------------------------------------------------


def test_developer_is_a_system_message_that_may_only_come_first():
    req = parse_chat({"messages": [{"role": "developer", "content": "Be brief."}, USER]}, CONFIG, "tiny")
    assert [m.role for m in req.messages] == ["system", "user"] and req.messages[0].text == "Be brief."
    late = refused(parse_chat, {"messages": [USER, {"role": "developer", "content": "x"}, USER]}, CONFIG, "tiny")
    assert late.param == "messages" and "only come first" in late.message
    bad = refused(parse_chat, {"messages": [{"role": "tool", "content": "x"}]}, CONFIG, "tiny")
    assert bad.param == "messages[0].role" and "developer" in bad.message


@pytest.mark.parametrize("stop, expected", [(None, ()), ("END", ("END",)), (["a"], ("a",)), (["a", "b", "c", "d"], ("a", "b", "c", "d"))])
def test_stop_sequences(stop, expected):
    assert chat(stop=stop).stop == expected
    assert chat().stop == ()


@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], [], "", [""], ["a", ""], 5, [1], {"a": 1}, True])
def test_bad_stop_values_are_400s_naming_stop(stop):
    error = refused(chat, stop=stop)
    assert error.param == "stop" and "stop" in error.message


def test_stream_options():
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage is True
    assert chat(stream=True, stream_options={"include_usage": False}).include_usage is False
    assert chat(stream=True).include_usage is False and chat(stream=True, stream_options=None).include_usage is False
    for stream in (False, None):
        error = refused(chat, stream=stream, stream_options={"include_usage": True})
        assert error.param == "stream_options" and "stream" in error.message
    assert refused(chat, stream_options={"include_usage": True}).param == "stream_options"
    assert refused(chat, stream=True, stream_options={"include_usage": "yes"}).param == "stream_options.include_usage"


UNSUPPORTED = [("frequency_penalty", 0.5), ("presence_penalty", -1), ("logit_bias", {"50256": -100}), ("logprobs", True),
               ("top_logprobs", 3), ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
               ("functions", [{"name": "f"}]), ("function_call", {"name": "f"}), ("response_format", {"type": "json_object"}),
               ("n", 2), ("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["text", "audio"]),
               ("prediction", {"type": "content", "content": "x"}), ("parallel_tool_calls", False), ("reasoning_effort", "high"),
               ("store", True), ("web_search_options", {}), ("verbosity", "low")]


@pytest.mark.parametrize("name, value", UNSUPPORTED)
def test_unsupported_chat_parameters_are_refused_by_name(name, value):
    error = refused(chat, **{name: value})
    assert error.param == name and "not supported" in error.message


NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "logprobs": False, "top_logprobs": None, "tools": [],
           "tool_choice": "none", "functions": None, "function_call": "auto", "response_format": {"type": "text"}, "n": 1,
           "audio": None, "modalities": ["text"], "prediction": None, "parallel_tool_calls": True, "store": False,
           "user": "someone", "metadata": {"a": "b"}, "service_tier": "auto", "some_vendor_extra": {"x": [1, 2]}}


def test_neutral_values_and_unknown_keys_are_accepted():
    assert chat(**NEUTRAL).messages[0].text == "What is shown?"


def test_type_errors_name_the_field_path():
    error = refused(chat, frequency_penalty="high")
    assert error.param == "frequency_penalty"
    error = refused(parse_chat, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]},
                    CONFIG, "tiny")
    assert error.param == "messages[0].content[0].image_url"


def image(**extra):
    return parse_image_request({"prompt": "A chest radiograph.", **extra}, CONFIG, "tiny", default_size="24x24")


def test_size_auto_is_the_default_size():
    assert (image(size="auto").width, image(size="auto").height) == (24, 24)
    assert (image().width, image().height) == (24, 24)
    assert (image(size="16x32").width, image(size="16x32").height) == (16, 32)


@pytest.mark.parametrize("name, value", [("quality", "hd"), ("style", "vivid"), ("background", "transparent"), ("output_format", "jpeg"),
                                         ("output_compression", 50), ("moderation", "low"), ("partial_images", 2), ("stream", True)])
def test_unsupported_image_options_are_refused_by_name(name, value):
    error = refused(image, **{name: value})
    assert error.param == name and "not supported" in error.message


def test_neutral_image_options_are_accepted():
    req = image(quality="auto", background="opaque", output_format="png", moderation="auto", user="u", response_format="b64_json")
    assert req.prompt == "A chest radiograph." and image(quality="standard", output_compression=100, stream=False).n == 1


def test_a_mask_is_refused_in_json_and_form_edits():
    for data in ({"prompt": "x", "image": png_data_url(0), "mask": png_data_url(1)}, FormFields(prompt="x", mask="(uploaded file)")):
        error = refused(parse_image_request, data, CONFIG, "tiny", edit=True)
        assert error.param == "mask" and "masks are not supported" in error.message
    form = parse_image_request(FormFields(prompt="x", steps="2", n="1", guidance="3.5", quality="auto"), CONFIG, "tiny", edit=True)
    assert (form.steps, form.n, form.guidance) == (2, 1, 3.5)


# ---- through HTTP --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(pipe):
    from unimedvl.serving import create_app

    running = RunningServer(create_app(pipe, ServeConfig(max_image_side=32, min_image_side=16, max_steps=2, max_new_tokens=4,
                                                         request_timeout_s=120, ui=False)), free_port())
    yield running
    running.stop()


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=120)


def error_of(r, status=400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_http_developer_role_stop_and_stream_options(server):
    body = {"messages": [{"role": "developer", "content": "Answer briefly."}, USER], "max_tokens": 2, "stop": ["\n\n"]}
    assert post(server, "/v1/chat/completions", body).status_code == 200
    error = error_of(post(server, "/v1/chat/completions", {**body, "stop": ["a", "b", "c", "d", "e"]}))
    assert error["param"] == "stop"
    error = error_of(post(server, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}}))
    assert error["param"] == "stream_options"
    streamed = post(server, "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed.status_code == 200 and sse_events(streamed.text)[-1] == "[DONE]"


@pytest.mark.parametrize("name, value", UNSUPPORTED[:6] + [("response_format", {"type": "json_schema"})])
def test_http_unsupported_chat_parameters(server, name, value):
    error = error_of(post(server, "/v1/chat/completions", {"messages": [USER], name: value}))
    assert error["param"] == name and "not supported" in error["message"] and error["code"] == "unsupported_parameter"


def test_http_neutral_values_are_answered(server):
    assert post(server, "/v1/chat/completions", {"messages": [USER], "max_tokens": 2, **NEUTRAL}).status_code == 200


def test_http_size_auto_returns_the_default_size(server):
    r = post(server, "/v1/images/generations", {"prompt": "A chest radiograph.", "size": "auto", "steps": 2, "quality": "auto"})
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert out.size == (32, 32)  # min(the model's default size, max_image_side)
    error = error_of(post(server, "/v1/images/generations", {"prompt": "x", "style": "natural"}))
    assert error["param"] == "style"


def test_http_masks_are_refused_for_json_and_multipart_edits(server):
    error = error_of(post(server, "/v1/images/edits", {"prompt": "x", "image": png_data_url(0), "mask": png_data_url(1)}))
    assert error["param"] == "mask" and "the edit applies to the whole image" in error["message"]
    png = base64.b64decode(png_data_url(0).split(",", 1)[1])
    r = httpx.post(server.url + "/v1/images/edits", timeout=120, data={"prompt": "x", "steps": "2"},
                   files=[("image", ("a.png", png, "image/png")), ("mask", ("m.png", png, "image/png"))])
    assert error_of(r)["param"] == "mask"
    ok = httpx.post(server.url + "/v1/images/edits", timeout=120, data={"prompt": "x", "steps": "2", "size": "auto"},
                    files=[("image", ("a.png", png, "image/png"))])
    assert ok.status_code == 200, ok.text
    assert Image.open(io.BytesIO(base64.b64decode(ok.json()["data"][0]["b64_json"]))).size[0] >= 16
