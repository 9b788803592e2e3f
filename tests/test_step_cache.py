"""Step caching: forecast velocities on skipped steps, every guidance branch on its own.

Exactness where nothing is forecast (refresh every step, caching stopped before it starts, or
stopped mid-run), guidance intact under caching, the forecast itself, the schedule's cost, and
each door (Python API, CLI, HTTP) taking a cache by name with its settings."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from unimedvl.cli import app
from unimedvl.flow import combine_guidance, euler_step, sampling_timesteps
from unimedvl.formats.generated import read_png_metadata
from unimedvl.inference.presets import SamplerSettings, SettingError
from unimedvl.inference.sampling import DenoisingQuery
from unimedvl.inference.step_cache import STEP_CACHE_PRESETS, StepCache, VelocityForecaster, step_cache

PROMPT = "chest X-ray, right lower lobe opacity"
SMALL = dict(height=32, width=32, steps=16, seed=7)


def test_forecast_is_exact_for_polynomials_of_its_order_on_an_uneven_schedule():
    ts = [float(t) for t in sampling_timesteps(12, 3.0)[:5]]  # shifted: uneven spacing
    for order, f in ((0, lambda t: 2.0 + 0 * t), (1, lambda t: 3.0 - 5.0 * t), (2, lambda t: 1.0 + t - 4.0 * t * t)):
        cache = StepCache(order=order, warmup=order + 1)
        fc = VelocityForecaster(cache)
        for t in ts[: order + 1]:
            fc.record((0, 0), t, torch.full((4, 2), f(t)))
        assert fc.can_forecast([(0, 0)])
        got = fc.forecast((0, 0), ts[order + 2])
        assert torch.allclose(got, torch.full((4, 2), f(ts[order + 2])), atol=1e-5)
    # a first-order forecast of a quadratic is not exact: the check above could fail
    fc = VelocityForecaster(StepCache(order=1))
    for t in ts[:2]:
        fc.record((0, 0), t, torch.full((1,), t * t))
    assert abs(float(fc.forecast((0, 0), ts[3])) - ts[3] ** 2) > 1e-4


def test_history_keeps_the_last_order_plus_one_and_drops_stopped_branches():
    fc = VelocityForecaster(StepCache(order=1))
    for k in range(5):
        fc.record((0, "cond"), 1.0 - k / 10, torch.full((1,), float(k)))
        fc.record((0, "uncond"), 1.0 - k / 10, torch.full((1,), float(k)))
    assert [t for t, _ in fc.history[(0, "cond")]] == [0.7, 0.6]
    fc.keep_only(0, [(0, "cond")])  # guidance switched off: its branch restarts from computed steps later
    assert (0, "uncond") not in fc.history and (0, "cond") in fc.history
    assert not fc.can_forecast([(0, "cond"), (0, "uncond")])


def test_schedule_costs():
    assert STEP_CACHE_PRESETS["taylorseer"].full_steps(49) == 19  # 50 steps: 49 evaluations
    assert STEP_CACHE_PRESETS["taylorseer-fast"].full_steps(49) == 13
    assert STEP_CACHE_PRESETS["taylorseer-safe"].full_steps(49) == 27
    assert StepCache(interval=1).full_steps(49) == 49
    c = StepCache(interval=3, warmup=2, final=1)
    assert [k for k in range(10) if c.is_full(k, 10)] == [0, 1, 2, 5, 8, 9]


@pytest.mark.parametrize("value, field", [
    ({"interval": 0}, "cache_interval"), ({"order": 4}, "cache_order"), ({"order": 2, "warmup": 2}, "cache_warmup"),
    ({"interval": 2.5}, "cache_interval"), ("bogus", "cache"), ({"speed": 3}, "cache"), (3, "cache"),
])
def test_bad_cache_settings_are_refused_naming_the_field(value, field):
    with pytest.raises(SettingError) as err:
        SamplerSettings(cache=value)
    assert err.value.field == field


def test_cache_names_and_mappings():
    assert step_cache("none") is None and step_cache(None) is None
    assert step_cache("taylorseer") is STEP_CACHE_PRESETS["taylorseer"]
    custom = step_cache({"preset": "taylorseer-fast", "order": 0, "warmup": 1})
    assert (custom.interval, custom.order, custom.warmup, custom.name) == (5, 0, 1, "custom")
    assert step_cache({"interval": 4, "name": "mine"}).name == "mine"  # a mapping may name its setting
    # a preset's settings carry their cache; an override replaces it and "none" switches it off
    s = SamplerSettings(cache="taylorseer")
    assert s.with_overrides(cache="none").cache is None and s.with_overrides(cache=None).cache is s.cache


# ---- sampling with the tiny fixture ------------------------------------------------------------


def test_refresh_every_step_reproduces_uncached_exactly(pipe):
    plain = pipe.generate_image(PROMPT, **SMALL)
    every = pipe.generate_image(PROMPT, cache={"interval": 1}, **SMALL)
    assert torch.equal(plain.latents, every.latents)
    assert every.forecast_steps == 0 and every.full_steps == SMALL["steps"] - 1
    cached = pipe.generate_image(PROMPT, cache="taylorseer", **SMALL)
    assert cached.forecast_steps > 0
    assert not torch.equal(plain.latents, cached.latents)  # forecasting changes something: the test above could fail


def test_caching_disabled_before_its_first_forecast_is_uncached_exactly(pipe):
    plain = pipe.generate_image(PROMPT, **SMALL)
    never = pipe.generate_image(PROMPT, cache={"warmup": SMALL["steps"]}, **SMALL)
    assert torch.equal(plain.latents, never.latents) and never.forecast_steps == 0


def test_after_caching_stops_mid_run_every_step_is_the_models_guided_velocity(pipe, monkeypatch):
    """Caching on for the first evaluations, off (``final``) for the last ones: from the switch on,
    each step's velocity is the guided combination of the model's outputs at the state reached,
    with no forecast left over; and the states follow the recorded velocities exactly."""
    calls: list[tuple] = []
    original = DenoisingQuery.__call__

    def recording(self, x, t):
        out = original(self, x, t)
        block = x if isinstance(x, torch.Tensor) else x[0]  # one image: one block
        calls.append((block.clone(), float(t if not isinstance(t, list) else t[0]), [o.clone() for o in out]))
        return out

    monkeypatch.setattr(DenoisingQuery, "__call__", recording)
    total, stop = SMALL["steps"] - 1, 8  # evaluations; caching ends at evaluation 8
    settings = dict(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="global")
    result = pipe.generate_image(PROMPT, cache={"interval": 3, "warmup": 2, "final": total - stop}, **settings, **SMALL)
    sample = result
    ts = sampling_timesteps(SMALL["steps"], 3.0)
    schedule = StepCache(interval=3, warmup=2, final=total - stop)
    full = [k for k in range(total) if schedule.is_full(k, total)]
    assert len(calls) == len(full) == sample.full_steps and sample.forecast_steps == total - len(full)
    assert all(k in full for k in range(stop, total))  # every step from the switch on is computed
    # the state at each evaluation: the noise plus the recorded velocities, step by step
    x = calls[0][0]
    states = [x]
    for k in range(total):
        x = euler_step(x, sample.velocities[k], ts[k], ts[k + 1])
        states.append(x)
    for (x_in, t_in, outs), k in zip(calls, full):
        assert t_in == pytest.approx(float(ts[k]))
        assert torch.equal(x_in, states[k])
        if k >= stop:  # no forecast: the guided combination of this very forward
            guided = combine_guidance(outs[0], outs[1], None, 4.0, 1.0, "global", 0.0)
            assert torch.equal(guided, sample.velocities[k])


def test_guidance_is_intact_under_caching(pipe):
    """Each branch is forecast on its own: guided vs unguided differ as much cached as uncached."""
    def distance(cache):
        guided = pipe.generate_image(PROMPT, cfg_text_scale=4.0, cfg_interval=(0.0, 1.0), cache=cache, **SMALL)
        plain = pipe.generate_image(PROMPT, cfg_text_scale=1.0, cache=cache, **SMALL)
        return float((guided.latents - plain.latents).norm() / plain.latents.norm())

    uncached, cached = distance("none"), distance("taylorseer")
    assert uncached > 0.05  # guidance does something on this model: the comparison below could fail
    assert 0.75 < cached / uncached < 1.33, (cached, uncached)


def test_a_branch_switching_on_mid_run_is_computed_before_it_is_forecast(pipe):
    total = SMALL["steps"] - 1
    late = pipe.generate_image(PROMPT, cache="taylorseer", cfg_text_scale=4.0, cfg_interval=(0.0, 0.5), **SMALL)
    # guidance switches on near t = 0.5: the unconditional branch needs order + 1 computed steps first
    assert late.full_steps > STEP_CACHE_PRESETS["taylorseer"].full_steps(total)
    assert late.full_steps + late.forecast_steps == total


def test_batched_images_take_their_full_steps_together_and_equal_the_lone_image(pipe):
    together = pipe.generate_images([PROMPT, "axial brain MRI, T2"], seeds=[3, 4], cache="taylorseer", height=32, width=32, steps=16)
    alone = pipe.generate_image("axial brain MRI, T2", seed=4, cache="taylorseer", height=32, width=32, steps=16)
    assert float((together[1].latents - alone.latents).abs().max()) < 1e-4
    assert together[0].full_steps == alone.full_steps


def test_editing_takes_a_cache_too(pipe, image):
    plain = pipe.edit([image], "Increase the contrast.", seed=1, steps=12, height=32, width=32, analyze=False)
    cached = pipe.edit([image], "Increase the contrast.", seed=1, steps=12, height=32, width=32, analyze=False, cache="taylorseer")
    assert cached.forecast_steps > 0 and cached.record["sampler"]["cache"]["name"] == "taylorseer"
    assert "cache" not in plain.record["sampler"]
    rel = float((cached.latents - plain.latents).norm() / plain.latents.norm())
    assert 0 < rel < 0.5


# ---- the command line ------------------------------------------------------------------------------


def test_cli_generate_with_a_cache_records_it(fixture_a, tmp_path):
    out = tmp_path / "c.png"
    r = CliRunner().invoke(app, ["generate", PROMPT, "-o", str(out), "-m", str(fixture_a), "--height", "32", "--width", "32",
                                 "--steps", "12", "--cache", "taylorseer", "--cache-interval", "4"])
    assert r.exit_code == 0, r.output
    record = read_png_metadata(out)["unimedvl"]
    assert record["sampler"]["cache"] == {"method": "taylorseer", "interval": 4, "order": 1, "warmup": 2, "final": 1, "name": "custom"}


@pytest.mark.parametrize("args, option", [(["--cache", "bogus"], "--cache"), (["--cache-interval", "0"], "--cache-interval"),
                                          (["--cache", "taylorseer", "--cache-order", "2"], "--cache-warmup")])
def test_cli_refuses_bad_cache_options_before_loading(tmp_path, args, option):
    r = CliRunner().invoke(app, ["generate", PROMPT, "-o", str(tmp_path / "x.png"), "-m", str(tmp_path / "absent"), *args])
    assert r.exit_code != 0 and option in r.output and "absent" not in r.output


def test_presets_lists_the_step_caches():
    r = CliRunner().invoke(app, ["presets", "--json"])
    data = json.loads(r.output)
    assert data["step_caches"]["taylorseer"]["full_forwards_at_50_steps"] == 19
    assert data["default_step_cache"] == "none"


# ---- the HTTP API, through the official client ---------------------------------------------------


def test_http_api_takes_a_cache_by_name_or_with_settings(pipe, tmp_path):
    openai = pytest.importorskip("openai")
    import base64

    from serving_helpers import RunningServer, free_port
    from unimedvl.serving import ServeConfig, create_app

    server = RunningServer(create_app(pipe, ServeConfig(max_image_side=64, min_image_side=16, max_steps=16, ui=False)), free_port())
    client = openai.OpenAI(api_key="unused", base_url=server.url + "/v1", max_retries=0, timeout=120)

    def draw(name: str, cache) -> dict:
        extra = {"steps": 16, "seed": 7} | ({} if cache is None else {"cache": cache})
        out = client.images.generate(model="official_tiny_a", prompt=PROMPT, size="32x32", extra_body=extra)
        path = tmp_path / f"{name}.png"
        path.write_bytes(base64.b64decode(out.data[0].b64_json))
        return read_png_metadata(path)["unimedvl"]

    try:
        plain, named, custom = draw("plain", None), draw("named", "taylorseer"), draw("custom", {"preset": "taylorseer", "interval": 5})
        assert "cache" not in plain["sampler"]
        assert named["sampler"]["cache"]["name"] == "taylorseer"
        assert custom["sampler"]["cache"]["interval"] == 5
        for bad, param in (("bogus", "cache"), ({"interval": 0}, "cache.interval"), (7, "cache")):
            with pytest.raises(openai.BadRequestError) as err:
                client.images.generate(model="official_tiny_a", prompt=PROMPT, size="32x32", extra_body={"cache": bad})
            assert err.value.body["param"] == param
    finally:
        server.stop()
