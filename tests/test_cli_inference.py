"""The inference commands: a thin layer over the API, with clear errors."""

import json

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from unimedvl.cli import app
from unimedvl.inference.engine import TextStream
from unimedvl.formats.generated import read_png_metadata

runner = CliRunner()


def test_ask_json_and_streaming_agree(fixture_a, monkeypatch):
    img = str(fixture_a / "test_image.png")
    base = ["ask", img, "-q", "What is shown?", "-m", str(fixture_a), "--dtype", "fp32", "--max-new-tokens", "10", "--temperature", "0"]
    js = runner.invoke(app, base + ["--json"])
    assert js.exit_code == 0, js.output
    answer = json.loads(js.stdout)["answer"]

    decoded = [0]  # ids decoded so far; and per printed piece, how many had been decoded
    printed = []
    next_id, echo = TextStream.__next__, typer.echo

    def counting_next(self):
        token = next_id(self)
        decoded[0] += 1
        return token

    def recording_echo(message=None, *args, **kwargs):
        if message:
            printed.append(decoded[0])
        return echo(message, *args, **kwargs)

    monkeypatch.setattr(TextStream, "__next__", counting_next)
    monkeypatch.setattr(typer, "echo", recording_echo)
    streamed = runner.invoke(app, base)
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout.rstrip("\n") == answer
    assert decoded[0] > 1 and printed[0] < decoded[0]  # the first piece is printed before the last id is decoded


def test_generate_writes_a_synthetic_png_with_its_settings(fixture_a, tmp_path):
    out = tmp_path / "sub" / "g.png"
    r = runner.invoke(app, ["generate", "A chest X-ray.", "-o", str(out), "-m", str(fixture_a), "--height", "32", "--width", "48",
                            "--steps", "3", "--seed", "9", "--cfg-interval", "0.0", "1.0", "--dtype", "fp32"])
    assert r.exit_code == 0, r.output
    meta = read_png_metadata(out)["unimedvl"]
    assert meta["seed"] == 9 and meta["sampler"]["cfg_interval"] == [0.0, 1.0] and meta["sampler"]["num_timesteps"] == 3
    assert Image.open(out).size == (48, 32)


def test_edit_reads_dicom_with_a_window_and_writes_dicom(fixture_a, tmp_path):
    from pydicom.data import get_testdata_file
    import pydicom

    out = tmp_path / "e.dcm"
    r = runner.invoke(app, ["edit", get_testdata_file("CT_small.dcm"), "-i", "Denoise this CT slice.", "-o", str(out), "-m", str(fixture_a),
                            "--steps", "2", "--no-analyze", "--window", "40,400", "--dtype", "fp32"])
    assert r.exit_code == 0, r.output
    ds = pydicom.dcmread(out)
    assert ds.ConversionType == "SYN" and ds.Rows == 128 and ds.Columns == 128


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns while failing on the corrupt file
def test_errors_name_the_problem(fixture_a, tmp_path):
    r = runner.invoke(app, ["ask", "x.png", "-q", "hi", "-m", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "no such model directory" in r.output
    r = runner.invoke(app, ["ask", str(tmp_path / "nope.png"), "-q", "hi", "-m", str(fixture_a)])
    assert r.exit_code == 2 and "nope.png: no such image file" in r.output
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    r = runner.invoke(app, ["ask", str(bad), "-q", "hi", "-m", str(fixture_a)])
    assert r.exit_code == 2 and "bad.dcm" in r.output
    r = runner.invoke(app, ["generate", "x", "-o", str(tmp_path / "g.jpg"), "-m", str(fixture_a)])
    assert r.exit_code == 2 and ".png or .dcm" in r.output
    r = runner.invoke(app, ["ask", "--window", "4O,400", str(fixture_a / "test_image.png"), "-q", "hi", "-m", str(fixture_a)])
    assert r.exit_code == 2 and "CENTER,WIDTH" in r.output
    r = runner.invoke(app, ["ask", "--window", "lung", str(fixture_a / "test_image.png"), "-q", "hi", "-m", str(fixture_a)])
    assert r.exit_code == 2 and "apply to DICOM" in r.output


def test_chat_keeps_the_conversation(fixture_a):
    img = fixture_a / "test_image.png"
    script = f"/image {img}\nWhat is shown?\nAnd where?\n/reset\nHello\n/quit\n"
    r = runner.invoke(app, ["chat", "-m", str(fixture_a), "--max-new-tokens", "4", "--temperature", "0", "--dtype", "fp32"], input=script)
    assert r.exit_code == 0, r.output
    assert r.output.count("model>") == 3
    assert "(attached test_image.png" in r.output and "(new conversation)" in r.output


def test_presets_prints_the_sampler_table_with_the_task_defaults():
    from unimedvl.inference.presets import DEFAULT_PRESET, PRESET_SOURCES, SAMPLER_PRESETS, SamplerSettings

    r = runner.invoke(app, ["presets", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert list(doc["presets"]) == list(SAMPLER_PRESETS) and doc["defaults"] == DEFAULT_PRESET
    for name, row in doc["presets"].items():
        fields = {k: v for k, v in row.items() if k not in ("default_for", "source")}
        assert SamplerSettings(**fields, name=name) == SAMPLER_PRESETS[name]  # every field, as the presets define it
        assert row["source"] == PRESET_SOURCES[name]
        assert row["default_for"] == [task for task, preset in DEFAULT_PRESET.items() if preset == name]

    r = runner.invoke(app, ["presets"])
    assert r.exit_code == 0, r.output
    for name in SAMPLER_PRESETS:
        assert f"{name}: {PRESET_SOURCES[name][:30]}" in r.output
    assert "--cfg-text-scale" in r.output and "text_channel" in r.output


def test_chat_reports_a_question_that_is_not_utf8_and_goes_on(fixture_a):
    # bytes that are not UTF-8 typed at the prompt: refused by name, then the next question is answered
    script = b"\xff\xfe what is this?\nHello\n/quit\n"
    r = runner.invoke(app, ["chat", "-m", str(fixture_a), "--max-new-tokens", "3", "--temperature", "0", "--dtype", "fp32"],
                      input=script)
    assert r.exit_code == 0, r.output
    assert "not valid UTF-8 text" in r.output and "Traceback" not in r.output
    assert r.output.count("model>") == 1  # only "Hello" was answered
