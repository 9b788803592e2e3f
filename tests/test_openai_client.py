"""The API as the official ``openai`` Python client sees it, against a live loopback server on the
tiny fixture: exact ``max_tokens``, true ``usage`` (image tokens included), ``stream_options.
include_usage``, the ``developer`` role, ``stop``, parameters the server does not implement refused
by name, ``size: "auto"``, and streamed answers equal to plain ones."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from serving_helpers import RunningServer, free_port, png_data_url  # noqa: E402

KEY = "client-key-1"
QUESTION = "What imaging modality is this?"


@pytest.fixture(scope="module")
def server(pipe):
    from unimedvl.serving import ServeConfig, create_app

    config = ServeConfig(api_key=KEY, max_image_side=64, min_image_side=16, max_steps=4, max_new_tokens=64, max_batch=4, ui=False)
    running = RunningServer(create_app(pipe, config), free_port())
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key=KEY, base_url=server.url + "/v1", max_retries=0, timeout=120)


def user(question: str = QUESTION, image: bool = False) -> dict:
    content = [{"type": "text", "text": question}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": png_data_url(3)}})
    return {"role": "user", "content": content}


def ask(client, messages, **kwargs):
    return client.chat.completions.create(model="official_tiny_a", messages=messages, temperature=0, **kwargs)


def test_max_tokens_is_exact_and_its_tokens_start_the_longer_answer(client):
    longest = ask(client, [user()], max_tokens=24)
    for n in (1, 2, 7):
        out = ask(client, [user()], max_tokens=n)
        choice = out.choices[0]
        if choice.finish_reason == "length":
            assert out.usage.completion_tokens == n
        else:  # the model ended the answer first
            assert choice.finish_reason == "stop" and out.usage.completion_tokens < n
        assert longest.choices[0].message.content.startswith(choice.message.content)
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    one = ask(client, [user()], max_tokens=1)
    if one.choices[0].finish_reason == "length":
        assert one.choices[0].message.content != ""  # one token, not the empty answer of an off-by-one
    # the newer spelling means the same
    assert ask(client, [user()], max_completion_tokens=7).choices[0].message.content == ask(client, [user()], max_tokens=7).choices[0].message.content


def test_usage_counts_the_image_tokens(client, pipe):
    with_image = ask(client, [user(image=True)], max_tokens=2).usage.prompt_tokens
    without = ask(client, [user()], max_tokens=2).usage.prompt_tokens
    image = Image.open(io.BytesIO(base64.b64decode(png_data_url(3).split(",", 1)[1])))
    pixels = pipe.transform("understanding_vit")(image, img_num=1)  # [3, h, w]
    p = pipe.engine.config.vit.patch_size
    assert with_image - without == (pixels.shape[1] // p) * (pixels.shape[2] // p) + 2  # patches + start/end markers
    assert without > 5  # the question's tokens, not a position counter


@pytest.mark.parametrize("image", [False, True])
def test_a_stream_equals_the_plain_answer_and_ends_with_usage(client, image):
    plain = ask(client, [user(image=image)], max_tokens=12)
    chunks = list(ask(client, [user(image=image)], max_tokens=12, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (plain.usage.prompt_tokens, plain.usage.completion_tokens)
    without_usage = list(ask(client, [user(image=image)], max_tokens=12, stream=True))
    assert all(c.usage is None for c in without_usage) and all(c.choices for c in without_usage)


def test_developer_is_a_system_role(client):
    instruction = "Answer in one word."
    as_developer = ask(client, [{"role": "developer", "content": instruction}, user()], max_tokens=10)
    as_system = ask(client, [{"role": "system", "content": instruction}, user()], max_tokens=10)
    bare = ask(client, [user()], max_tokens=10)
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens > bare.usage.prompt_tokens


def test_stop_strings_cut_the_answer_before_them(client):
    full = ask(client, [user()], max_tokens=30).choices[0].message.content
    assert len(full) > 8, full
    stop = full[5:8]
    cut = full[: full.index(stop)]
    for stops in (stop, [stop], ["\u2603never\u2603", stop, "\u00a7\u00a7", "qqqqzz"]):
        out = ask(client, [user()], max_tokens=30, stop=stops)
        assert out.choices[0].message.content == cut and out.choices[0].finish_reason == "stop"
        streamed = list(ask(client, [user()], max_tokens=30, stop=stops, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, [user()], max_tokens=4, stop=["a", "b", "c", "d", "e"])
    assert err.value.body["param"] == "stop"


@pytest.mark.parametrize("name, value", [("logprobs", True), ("frequency_penalty", 0.5), ("tools", [{"type": "function", "function": {"name": "f"}}]),
                                         ("response_format", {"type": "json_object"}), ("n", 2)])
def test_parameters_the_server_does_not_implement_are_400s_naming_them(client, name, value):
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, [user()], max_tokens=2, **{name: value})
    assert err.value.status_code == 400
    assert err.value.body["param"] == name and name in err.value.body["message"]
    # their neutral values are answered
    neutral = {"logprobs": False, "frequency_penalty": 0, "tools": None, "response_format": {"type": "text"}, "n": 1}[name]
    if neutral is not None:
        assert ask(client, [user()], max_tokens=2, **{name: neutral}).choices[0].message.content is not None


def _png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_size_auto_is_the_default_size_and_images_are_marked_synthetic(client, pipe):
    side = min(pipe.default_image_size, 64)
    auto = client.images.generate(model="official_tiny_a", prompt="axial brain MRI", size="auto", extra_body={"steps": 2, "seed": 5})
    image = _png(auto.data[0].b64_json)
    assert image.size == (side, side)
    assert "synthetic" in " ".join(str(v) for v in image.info.values()).lower()
    explicit = client.images.generate(model="official_tiny_a", prompt="axial brain MRI", size=f"{side}x{side}", extra_body={"steps": 2, "seed": 5})
    # same pixels and the same generation record; only the record's creation time may differ (second boundary)
    same = _png(explicit.data[0].b64_json)
    assert np.array_equal(np.asarray(same), np.asarray(image))
    records = [json.loads(im.info["unimedvl"]) for im in (image, same)]
    for record in records:
        assert record["synthetic"] is True and "created" in record
        del record["created"]
    assert records[0] == records[1]
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model="official_tiny_a", prompt="axial brain MRI", quality="hd")
    assert err.value.body["param"] == "quality"


def test_an_edit_mask_is_refused_not_ignored(client):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (80, 80, 80)).save(buf, format="PNG")
    png = buf.getvalue()
    with pytest.raises(openai.BadRequestError) as err:
        client.images.edit(model="official_tiny_a", image=("in.png", png, "image/png"), mask=("mask.png", png, "image/png"),
                           prompt="Translate to FLAIR.")
    assert err.value.body["param"] == "mask"
    edited = client.images.edit(model="official_tiny_a", image=("in.png", png, "image/png"), prompt="Translate to FLAIR.",
                                size="auto", extra_body={"steps": 2})
    assert _png(edited.data[0].b64_json).size == (32, 32)  # auto: the input's size
