"""One table of sampler presets: every door (Python API, CLI, HTTP API) draws the same pixels for
the same prompt, seed, size and steps, and records the preset it used."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from unimedvl.cli import app
from unimedvl.formats.generated import read_png_metadata
from unimedvl.inference.presets import DEFAULT_PRESET, PRESET_SOURCES, SAMPLER_PRESETS, SamplerSettings, sampler_settings

PROMPT = "Axial T2-weighted brain MRI, normal study."
SEED, SIZE, STEPS = 11, 32, 4


def test_task_defaults_are_the_published_settings_and_each_preset_cites_its_source():
    for name, source in PRESET_SOURCES.items():  # each preset says where its numbers come from
        assert len(source) > 40, name
    # the task defaults are the published scripts' settings (ARCHITECTURE 9.5)
    t2i, edit = (SAMPLER_PRESETS[DEFAULT_PRESET[t]] for t in ("text-to-image", "image-to-image"))
    assert (t2i.cfg_text_scale, t2i.cfg_img_scale, t2i.cfg_interval, t2i.cfg_renorm_type) == (3.0, 1.5, (0.4, 1.0), "global")
    assert (edit.cfg_text_scale, edit.cfg_img_scale, edit.cfg_interval, edit.cfg_renorm_type) == (4.0, 2.0, (0.0, 1.0), "text_channel")


def test_overrides_replace_single_fields_and_are_checked():
    import dataclasses

    from unimedvl.inference.presets import SamplerOverrides

    assert set(SamplerOverrides.__annotations__) == {f.name for f in dataclasses.fields(SamplerSettings)} - {"name"}
    s = sampler_settings("text-to-image", "unimedvl-edit", steps=7, cfg_text_scale=None)
    assert s.steps == 7 and s.cfg_text_scale == 4.0 and s.name == "unimedvl-edit"
    assert sampler_settings("image-to-image") == SAMPLER_PRESETS["unimedvl-edit"]
    with pytest.raises(ValueError, match="unknown sampler preset 'nope'"):
        sampler_settings("text-to-image", "nope")
    with pytest.raises(ValueError, match="cfg_interval"):
        SamplerSettings(cfg_interval=(0.8, 0.2))
    with pytest.raises(TypeError, match="unknown sampler settings"):
        SAMPLER_PRESETS["driver"].with_overrides(cfg_scale=2.0)


def test_pipeline_checks_overrides_before_any_work(pipe, forward_tokens):
    with pytest.raises(TypeError, match="unknown sampler settings"):
        pipe.generate_image(PROMPT, height=SIZE, width=SIZE, cfg_scale=2.0)
    with pytest.raises(ValueError, match="unknown sampler preset"):
        pipe.generate_image(PROMPT, height=SIZE, width=SIZE, preset="fastest")
    assert forward_tokens == []


@pytest.fixture(scope="module")
def server(pipe):
    pytest.importorskip("fastapi")
    from serving_helpers import RunningServer, free_port

    from unimedvl.serving import ServeConfig, create_app

    running = RunningServer(create_app(pipe, ServeConfig(max_image_side=64, min_image_side=16, max_steps=8, ui=False)), free_port())
    yield running
    running.stop()


def test_python_cli_and_http_draw_the_same_pixels(pipe, fixture_a, server, tmp_path):
    httpx = pytest.importorskip("httpx")
    # Python API, the task's default preset
    ours = pipe.generate_image(PROMPT, seed=SEED, height=SIZE, width=SIZE, steps=STEPS)
    api_pixels = np.asarray(ours.image)
    assert ours.record["sampler"]["preset"] == DEFAULT_PRESET["text-to-image"]

    # CLI
    out = tmp_path / "cli.png"
    result = CliRunner().invoke(app, ["generate", PROMPT, "-o", str(out), "-m", str(fixture_a), "--dtype", "fp32", "--seed", str(SEED),
                                      "--height", str(SIZE), "--width", str(SIZE), "--steps", str(STEPS)])
    assert result.exit_code == 0, result.output
    cli_pixels = np.asarray(Image.open(out).convert("RGB"))

    # HTTP API
    r = httpx.post(f"{server.url}/v1/images/generations", timeout=120,
                   json={"prompt": PROMPT, "seed": SEED, "size": f"{SIZE}x{SIZE}", "steps": STEPS})
    assert r.status_code == 200, r.text
    png = base64.b64decode(r.json()["data"][0]["b64_json"])
    http_pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    # the same process, weights, dtype and computation at each door: identical pixels are the promise
    assert np.array_equal(api_pixels, cli_pixels)
    assert np.array_equal(api_pixels, http_pixels)
    for sampler in (read_png_metadata(out)["unimedvl"]["sampler"], _png_record(png)["sampler"]):
        assert sampler == ours.record["sampler"]

    # a preset changes the image (the doors do not ignore it), and each door records it
    other = pipe.generate_image(PROMPT, preset="unimedvl-edit", seed=SEED, height=SIZE, width=SIZE, steps=STEPS)
    assert not np.array_equal(np.asarray(other.image), api_pixels)
    r = httpx.post(f"{server.url}/v1/images/generations", timeout=120,
                   json={"prompt": PROMPT, "seed": SEED, "size": f"{SIZE}x{SIZE}", "steps": STEPS, "preset": "unimedvl-edit"})
    assert r.status_code == 200, r.text
    png = base64.b64decode(r.json()["data"][0]["b64_json"])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), np.asarray(other.image))
    assert _png_record(png)["sampler"]["preset"] == "unimedvl-edit"


def test_http_rejects_an_unknown_preset_by_name(server):
    httpx = pytest.importorskip("httpx")
    r = httpx.post(f"{server.url}/v1/images/generations", timeout=60, json={"prompt": PROMPT, "preset": "fast"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "preset" and "fast" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/images/generations", timeout=60, json={"prompt": PROMPT, "preset": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "preset"


def _png_record(png: bytes) -> dict:
    return json.loads(Image.open(io.BytesIO(png)).text["unimedvl"])
