"""Text-to-image requests of one size and setting denoised together: each image equals the image
drawn alone (up to float rounding of the packed forward), a dropped image leaves the batch, and the
server groups waiting requests by setting."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

PROMPTS = ["chest X-ray, right lower lobe opacity", "axial brain MRI, T2", "dermoscopy of a pigmented lesion"]
SETTING = dict(height=32, width=32, steps=4)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def without_time(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "created"}


def test_images_denoised_together_equal_the_images_drawn_alone(pipe):
    together = pipe.generate_images(PROMPTS, seeds=[3, 4, 5], **SETTING)
    for prompt, seed, result in zip(PROMPTS, (3, 4, 5), together):
        alone = pipe.generate_image(prompt, seed=seed, **SETTING)
        # the provenance record is the same apart from when each image was made
        assert without_time(result.record) == without_time(alone.record)
        assert float((result.latents - alone.latents).abs().max()) < 1e-4
        assert np.abs(pixels(result.image) - pixels(alone.image)).max() <= 1
    # a different seed gives a different image: the comparison above can fail
    assert float((together[0].latents - together[1].latents).abs().max()) > 1e-2


def test_guidance_acts_per_image_in_a_batch(pipe):
    guided = pipe.generate_images(PROMPTS[:2], seeds=[1, 2], cfg_text_scale=4.0, **SETTING)
    plain = pipe.generate_images(PROMPTS[:2], seeds=[1, 2], cfg_text_scale=1.0, **SETTING)
    for g, p, prompt, seed in zip(guided, plain, PROMPTS, (1, 2)):
        alone = pipe.generate_image(prompt, seed=seed, cfg_text_scale=4.0, **SETTING)
        assert float((g.latents - alone.latents).abs().max()) < 1e-4
        assert float((g.latents - p.latents).abs().max()) > 1e-3


def test_an_image_dropped_mid_way_leaves_the_batch(pipe):
    steps_seen = []
    results = pipe.generate_images(PROMPTS, seeds=[3, 4, 5], keep=lambda i: i != 1 or len(steps_seen) < 1,
                                   progress=lambda k, n: steps_seen.append(k), **SETTING)
    assert results[1] is None and results[0] is not None and results[2] is not None
    alone = pipe.generate_image(PROMPTS[2], seed=5, **SETTING)
    assert float((results[2].latents - alone.latents).abs().max()) < 1e-4


def test_mismatched_seeds_are_refused_before_any_work(pipe):
    with pytest.raises(ValueError, match="2 prompts, 1 seeds"):
        pipe.generate_images(PROMPTS[:2], seeds=[1], **SETTING)


# ---- the server ---------------------------------------------------------------------------------


def test_the_server_denoises_waiting_requests_of_one_setting_together(pipe):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from serving_helpers import RunningServer, free_port

    from unimedvl.serving import ServeConfig, create_app

    app = create_app(pipe, ServeConfig(max_image_batch=4, max_image_side=64, min_image_side=16, max_steps=8, ui=False))
    server = RunningServer(app, free_port())
    batcher = app.app.state.worker.batchers[1]
    try:
        def generate(args):
            prompt, seed, size = args
            r = httpx.post(server.url + "/v1/images/generations",
                           json={"prompt": prompt, "seed": seed, "size": size, "steps": 4}, timeout=120)
            assert r.status_code == 200, r.text
            return Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))

        jobs = [(PROMPTS[0], 3, "32x32"), (PROMPTS[1], 4, "32x32"), (PROMPTS[2], 5, "32x32"), (PROMPTS[0], 6, "48x32")]
        take = batcher._take

        def take_when_all_wait():  # called under the batcher's lock; wait_for releases it while requests arrive
            assert batcher._wake.wait_for(lambda: len(batcher._waiting) >= len(jobs), timeout=60)
            batcher._take = take
            return take()

        batcher._take = take_when_all_wait
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(generate, job) for job in jobs]
        images = [f.result(timeout=120) for f in futures]
    finally:
        server.stop()
    assert batcher.largest_batch == 3 and batcher.batches == 2  # the 48x32 request ran in a batch of its own
    for (prompt, seed, size), image in zip(jobs, images):
        w, h = (int(v) for v in size.split("x"))
        alone = pipe.generate_image(prompt, seed=seed, height=h, width=w, steps=4)
        assert image.size == (w, h)
        assert np.abs(pixels(image.convert("RGB")) - pixels(alone.image)).max() <= 1
