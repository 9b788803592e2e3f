"""Bad generation / question arguments are refused up front, naming the argument, and a sampler
that turns NaN never becomes a saved image (the fault audit: shift 0 -> a black "synthetic" PNG,
height 0 -> the default size, a reversed cfg_interval -> guidance silently off, temperature NaN,
non-UTF-8 questions, -o naming a folder or a path under a file, silent overwrites)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from unimedvl.cli import app
from unimedvl.flow import GuidanceConfig, sampling_timesteps
from unimedvl.inference.pipeline import GeneratedImage, check_output_path
from unimedvl.inference.presets import SAMPLER_PRESETS, SamplerSettings, SettingError, sampler_settings
from unimedvl.inference.sampling import NonFiniteLatentsError

runner = CliRunner()
NAN, INF = float("nan"), float("inf")

# (field, bad value) for every image-sampler field: non-finite, out of range, wrong kind
BAD_SAMPLER_VALUES = [
    ("timestep_shift", 0), ("timestep_shift", 0.0), ("timestep_shift", -1.0), ("timestep_shift", NAN), ("timestep_shift", INF),
    ("timestep_shift", -INF), ("timestep_shift", 1e-30), ("timestep_shift", 1e39), ("timestep_shift", "3"),
    ("steps", 1), ("steps", 0), ("steps", -5), ("steps", 2.5), ("steps", NAN), ("steps", INF), ("steps", True),
    ("cfg_text_scale", -0.5), ("cfg_text_scale", NAN), ("cfg_text_scale", INF),
    ("cfg_img_scale", -1), ("cfg_img_scale", NAN), ("cfg_img_scale", INF),
    ("cfg_renorm_min", -0.1), ("cfg_renorm_min", 1.5), ("cfg_renorm_min", NAN),
    ("cfg_interval", (1.0, 0.4)), ("cfg_interval", (0.5, 0.5)), ("cfg_interval", (-0.1, 1.0)), ("cfg_interval", (0.0, 1.1)),
    ("cfg_interval", (NAN, 1.0)), ("cfg_interval", (0.0, INF)), ("cfg_interval", (0.1, 0.2, 0.3)), ("cfg_interval", ("a", "b")),
    ("cfg_renorm_type", "globall"),
]


@pytest.mark.parametrize("field,value", BAD_SAMPLER_VALUES)
@pytest.mark.parametrize("task", ["text-to-image", "image-to-image"])
def test_every_bad_sampler_value_is_refused_naming_its_field(task, field, value):
    with pytest.raises(SettingError, match=field) as caught:
        sampler_settings(task, **{field: value})
    assert caught.value.field == field
    assert caught.value.option == "--" + field.replace("_", "-")


def test_good_values_still_pass_and_are_normalised():
    s = sampler_settings("text-to-image", steps=3.0, timestep_shift=0.5, cfg_interval=[0, 1], cfg_text_scale=0)
    assert (s.steps, s.timestep_shift, s.cfg_interval, s.cfg_text_scale) == (3, 0.5, (0.0, 1.0), 0.0)
    assert isinstance(s.steps, int)
    for preset in SAMPLER_PRESETS.values():  # every shipped preset is valid under the stricter rules
        assert SamplerSettings(**{f: getattr(preset, f) for f in ("steps", "cfg_text_scale", "cfg_img_scale", "cfg_interval",
                                                                 "cfg_renorm_type", "cfg_renorm_min", "timestep_shift")})


@pytest.mark.parametrize("kwargs,name", [
    (dict(cfg_interval=(1.0, 0.4)), "cfg_interval"), (dict(cfg_interval=(0.3, 0.3)), "cfg_interval"),
    (dict(cfg_interval=(NAN, 1.0)), "cfg_interval"), (dict(cfg_text_scale=NAN), "cfg_text_scale"),
    (dict(cfg_img_scale=INF), "cfg_img_scale"), (dict(cfg_renorm_min=NAN), "cfg_renorm_min"),
    (dict(cfg_renorm_min=2.0), "cfg_renorm_min"),
])
def test_guidance_config_itself_refuses_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GuidanceConfig(**kwargs)


@pytest.mark.parametrize("shift", [0.0, -1.0, -0.5, NAN, INF, 1e-6, 1e-30, 1e39, 1e300])
def test_the_schedule_refuses_a_shift_that_would_make_nan(shift):
    with pytest.raises(ValueError, match="timestep_shift"):
        sampling_timesteps(5, shift)


@pytest.mark.parametrize("shift", [1e-3, 0.01, 0.5, 1.0, 3.0, 100.0, 1e30])
def test_every_allowed_shift_gives_a_finite_schedule_from_1_to_0(shift):
    sampler_settings("text-to-image", timestep_shift=shift)
    ts = sampling_timesteps(6, shift)
    assert torch.isfinite(ts).all() and float(ts[0]) == pytest.approx(1.0, abs=1e-3) and float(ts[-1]) == 0.0
    assert (ts[1:] <= ts[:-1]).all()


# ---- the Python API: sizes, decoding settings, text ----------------------------------------------------

BAD_SIDES = [0, -64, -16, 8, 33, 40, 4096, 2.5, NAN, True, "64"]


@pytest.mark.parametrize("side", ["height", "width"])
@pytest.mark.parametrize("value", BAD_SIDES)
def test_generate_refuses_a_bad_side_naming_it_before_any_model_work(pipe, forward_tokens, side, value):
    with pytest.raises(SettingError, match=side) as caught:
        pipe.generate_image("A chest X-ray.", steps=2, **{"height": 32, "width": 32, side: value})
    assert caught.value.field == side
    assert forward_tokens == []  # refused before any forward


@pytest.mark.parametrize("side", ["height", "width"])
@pytest.mark.parametrize("value", [0, -64, 24])
def test_edit_refuses_a_bad_side_naming_it(pipe, image, forward_tokens, side, value):
    with pytest.raises(SettingError, match=side):
        pipe.edit([image], "Denoise.", steps=2, analyze=False, **{side: value})
    assert forward_tokens == []


@pytest.mark.parametrize("kwargs,name", [
    (dict(temperature=NAN), "temperature"), (dict(temperature=INF), "temperature"), (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=NAN), "top_p"), (dict(top_p=-1), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=-3), "max_new_tokens"),
])
def test_ask_refuses_bad_decoding_settings_naming_them(pipe, image, forward_tokens, kwargs, name):
    with pytest.raises(SettingError, match=name):
        pipe.ask([image], "What is shown?", **kwargs)
    assert forward_tokens == []


BAD_TEXT = ["bad \udcff\udcfe bytes", "\udcc3", "ok\ud800"]  # what surrogateescape makes of non-UTF-8 bytes, and a lone surrogate


@pytest.mark.parametrize("text", BAD_TEXT)
def test_text_that_is_not_utf8_is_refused_naming_the_argument(pipe, image, text):
    with pytest.raises(SettingError, match="question.*UTF-8"):
        pipe.ask([image], text)
    with pytest.raises(SettingError, match="prompt.*UTF-8"):
        pipe.generate_image(text, height=32, width=32, steps=2)
    with pytest.raises(SettingError, match="instruction.*UTF-8"):
        pipe.edit([image], text, steps=2)
    with pytest.raises(SettingError, match="question.*UTF-8"):
        pipe.ask_batch([([image], "fine"), ([image], text)])


# ---- NaN never becomes an image ----------------------------------------------------------------------


def test_nan_latents_raise_instead_of_returning_an_image(pipe, monkeypatch):
    import unimedvl.inference.sampling as sampling

    monkeypatch.setattr(sampling, "combine_guidance", lambda v, *a, **k: torch.full_like(v, NAN))
    with pytest.raises(NonFiniteLatentsError, match="non-finite latents at step 1"):
        pipe.generate_image("A chest X-ray.", height=32, width=32, steps=3)


def test_nan_noise_and_nan_decoded_pixels_raise(pipe, monkeypatch):
    noise = torch.zeros(4, pipe.engine.config.patch_latent_dim)
    noise[0, 0] = NAN
    with pytest.raises(NonFiniteLatentsError, match="initial noise"):
        pipe.generate_image("A chest X-ray.", height=32, width=32, steps=2, noise=noise)
    monkeypatch.setattr(pipe.engine, "decode_latents", lambda tokens, grid: torch.full((3, 32, 32), NAN))
    with pytest.raises(NonFiniteLatentsError, match="non-finite pixels"):
        pipe.generate_image("A chest X-ray.", height=32, width=32, steps=2)


def test_cli_writes_nothing_when_sampling_turns_nan(fixture_a, tmp_path, monkeypatch):
    import unimedvl.inference.sampling as sampling

    monkeypatch.setattr(sampling, "combine_guidance", lambda v, *a, **k: torch.full_like(v, NAN))
    out = tmp_path / "g.png"
    r = runner.invoke(app, ["generate", "A chest X-ray.", "-o", str(out), "-m", str(fixture_a), "--dtype", "fp32",
                            "--height", "32", "--width", "32", "--steps", "3"])
    assert r.exit_code == 2, r.output
    assert "non-finite latents" in r.output and "no image was written" in r.output
    assert list(tmp_path.iterdir()) == []  # not even a temporary file


# ---- the command line: refused before the model loads ---------------------------------------------------

# (options, the option the error must name); -m names a missing folder, so an error about the
# option (not "no such model directory") shows the value was refused before loading
CLI_BAD = [
    (["--timestep-shift", "0"], "--timestep-shift"), (["--timestep-shift", "-2"], "--timestep-shift"),
    (["--timestep-shift", "nan"], "--timestep-shift"), (["--timestep-shift", "inf"], "--timestep-shift"),
    (["--height", "0"], "--height"), (["--height", "-64"], "--height"), (["--width", "0"], "--width"), (["--width", "-32"], "--width"),
    (["--cfg-interval", "1.0", "0.4"], "--cfg-interval"), (["--cfg-interval", "0.5", "0.5"], "--cfg-interval"),
    (["--cfg-interval", "nan", "1"], "--cfg-interval"), (["--cfg-interval", "0", "2"], "--cfg-interval"),
    (["--cfg-text-scale", "nan"], "--cfg-text-scale"), (["--cfg-text-scale", "-1"], "--cfg-text-scale"),
    (["--cfg-img-scale", "inf"], "--cfg-img-scale"), (["--cfg-renorm-min", "nan"], "--cfg-renorm-min"),
    (["--cfg-renorm-type", "nope"], "--cfg-renorm-type"), (["--steps", "1"], "--steps"), (["--steps", "0"], "--steps"),
    (["--preset", "fast"], "unknown sampler preset"),
]


@pytest.mark.parametrize("options,named", CLI_BAD)
@pytest.mark.parametrize("command", ["generate", "edit"])
def test_cli_refuses_bad_sampler_options_before_loading(command, options, named, tmp_path, fixture_a):
    out = tmp_path / "o.png"
    args = [command, "A chest X-ray.", "-o", str(out)] if command == "generate" else \
        [command, str(fixture_a / "test_image.png"), "-i", "Denoise.", "-o", str(out)]
    r = runner.invoke(app, args + ["-m", str(tmp_path / "no-model")] + options)
    assert r.exit_code == 2, r.output
    assert named in r.output and "no such model directory" not in r.output, r.output
    assert not out.exists()


@pytest.mark.parametrize("side,value", [("--height", "40"), ("--width", "24"), ("--height", "4096")])
def test_cli_size_rule_of_the_model_names_the_option(side, value, tmp_path, fixture_a):
    out = tmp_path / "o.png"
    r = runner.invoke(app, ["generate", "A chest X-ray.", "-o", str(out), "-m", str(fixture_a), "--dtype", "fp32",
                            "--height", "32", "--width", "32", "--steps", "2", side, value])
    assert r.exit_code == 2 and f"{side} must be a positive multiple of 16" in r.output, r.output
    assert not out.exists()


@pytest.mark.parametrize("options,named", [
    (["--temperature", "nan"], "--temperature"), (["--temperature", "-1"], "--temperature"), (["--temperature", "inf"], "--temperature"),
    (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--top-p", "nan"], "--top-p"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["-q", "bad \udcff bytes"], "--question"), (["-q", "   "], "--question"),
])
def test_cli_ask_refuses_bad_options_before_loading(options, named, tmp_path, fixture_a):
    r = runner.invoke(app, ["ask", str(fixture_a / "test_image.png"), "-q", "What is shown?", "-m", str(tmp_path / "no-model")] + options)
    assert r.exit_code == 2 and named in r.output and "no such model directory" not in r.output, r.output


@pytest.mark.parametrize("command", ["report", "chat"])
@pytest.mark.parametrize("value", ["nan", "-0.5"])
def test_cli_report_and_chat_refuse_a_bad_temperature(command, value, tmp_path, fixture_a):
    args = [command] + ([str(fixture_a / "test_image.png")] if command == "report" else [])
    r = runner.invoke(app, args + ["-m", str(tmp_path / "no-model"), "--temperature", value])
    assert r.exit_code == 2 and "--temperature" in r.output, r.output


def test_cli_non_utf8_argv_bytes_give_a_clean_error(tmp_path, fixture_a):
    """Real bytes on the command line, as a shell passes them: no traceback, the option named."""
    exe = Path(sys.executable).with_name("unimedvl")
    env = {**os.environ, "LC_ALL": "C.UTF-8", "GRADIO_ANALYTICS_ENABLED": "False"}
    for command in ([b"ask", os.fsencode(fixture_a / "test_image.png"), b"-q", b"\xff\xfe what?"],
                    [b"generate", b"\xc3 chest", b"-o", os.fsencode(tmp_path / "g.png")]):
        p = subprocess.run([os.fsencode(exe), *command, b"-m", os.fsencode(tmp_path / "no-model")],
                           capture_output=True, env=env, timeout=300)
        err = p.stderr.decode("utf-8", "replace")
        assert p.returncode == 2, err
        assert "Traceback" not in err and "not valid UTF-8" in err and ("--question" in err or "PROMPT" in err), err


# ---- -o: checked before any work; no silent overwrite ----------------------------------------------------


def _generate(fixture_a, out, *extra, model=None):
    return runner.invoke(app, ["generate", "A chest X-ray.", "-o", str(out), "-m", str(model or fixture_a), "--dtype", "fp32",
                               "--height", "32", "--width", "32", "--steps", "2", *extra])


def test_cli_out_naming_a_folder_or_a_path_under_a_file_is_refused_before_loading(tmp_path, fixture_a):
    folder = tmp_path / "folder.png"
    folder.mkdir()
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    missing_model = tmp_path / "no-model"
    for out, says in ((folder, "is a folder"), (a_file / "g.png", "is a file, not a folder"),
                      (a_file / "deeper" / "g.png", "is a file, not a folder")):
        r = _generate(fixture_a, out, model=missing_model)
        assert r.exit_code == 2 and "--out" in r.output and says in r.output and "no such model directory" not in r.output, r.output
        r = runner.invoke(app, ["edit", str(fixture_a / "test_image.png"), "-i", "Denoise.", "-o", str(out), "-m", str(missing_model)])
        assert r.exit_code == 2 and says in r.output, r.output
    assert a_file.read_bytes() == b"x" and folder.is_dir() and list(folder.iterdir()) == []


def test_cli_refuses_an_existing_out_without_overwrite(tmp_path, fixture_a):
    out = tmp_path / "g.png"
    r = _generate(fixture_a, out)
    assert r.exit_code == 0, r.output
    first = np.asarray(Image.open(out))
    out.write_bytes(b"keep me")
    r = _generate(fixture_a, out, model=tmp_path / "no-model")  # refused before the model loads
    assert r.exit_code == 2 and "exists" in r.output and "--overwrite" in r.output, r.output
    assert out.read_bytes() == b"keep me"
    r = _generate(fixture_a, out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.asarray(Image.open(out)), first)  # replaced by the same seed's image


def test_cli_refuses_an_out_that_appears_while_drawing(tmp_path, fixture_a, monkeypatch):
    from unimedvl.inference import UniMedVLPipeline

    out = tmp_path / "g.png"
    original = UniMedVLPipeline.generate_image

    def drawing_while_someone_writes(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        out.write_bytes(b"theirs")
        return result

    monkeypatch.setattr(UniMedVLPipeline, "generate_image", drawing_while_someone_writes)
    r = _generate(fixture_a, out)
    assert r.exit_code == 2 and "exists" in r.output, r.output
    assert out.read_bytes() == b"theirs"


def test_api_save_refuses_a_folder_or_a_path_under_a_file(tmp_path):
    result = GeneratedImage(Image.new("RGB", (16, 16)), torch.zeros(1, 1), {})
    a_file = tmp_path / "f.png"
    a_file.write_bytes(b"x")
    for bad in (tmp_path, a_file / "x.png"):
        with pytest.raises(SettingError, match="out"):
            result.save(bad)
    with pytest.raises(SettingError, match="--overwrite"):
        check_output_path(a_file, overwrite=False)
    assert check_output_path(tmp_path / "new" / "x.png", overwrite=False) == tmp_path / "new" / "x.png"
