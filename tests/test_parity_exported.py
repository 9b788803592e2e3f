"""Parity replay on an exported model that carries its own inference transforms.

An exported model (``unimedvl_config.json`` from a plan's ``inference:`` section) may resize
images by its own rule (the demo's 64 px); the fixture recorded the official rule.  The replay
must feed the recorded inputs and rules whatever the model's own, and a model that cannot replay a
fixture at all must be named in one line, without a traceback.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from unimedvl.evaluation.parity import FORMAT_LOGIT_RMS, FixtureMismatch, logits_tolerance, replay

from conftest import random_model, tiny_config

OWN_TRANSFORMS = {"image_transforms": {"understanding_vit": [56, 56, 14], "generation_vit": [56, 56, 14],
                                       "generation_vae": [64, 16, 16], "image_size": 64}}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "unimedvl", "parity", *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference_count(fixture_a):
    rows = replay(fixture_a)
    return sum(r.ok for r in rows), len(rows)


@pytest.fixture
def exported(tmp_path, fixture_a):
    out = tmp_path / "exported"
    shutil.copytree(fixture_a, out)
    (out / "unimedvl_config.json").write_text(json.dumps(OWN_TRANSFORMS))
    return out


def test_replay_ignores_the_models_own_transforms(exported, reference_count):
    notes = []
    rows = replay(exported, on_note=notes.append)
    assert (sum(r.ok for r in rows), len(rows)) == reference_count
    assert reference_count[0] == reference_count[1] >= 59
    assert len(notes) == 1 and "[56, 56, 14]" in notes[0] and "[980, 378, 14, 2007040]" in notes[0]


def test_cli_replays_an_exported_model_without_a_traceback(exported, reference_count):
    result = _cli(exported)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == f"parity: {reference_count[0]}/{reference_count[1]} within tolerance"
    assert sum(line.startswith("note: ") for line in lines) == 1


def _other_model_with_recording(tmp_path, fixture_a):
    """Fixture A's recording beside a model of other dimensions (LLM hidden 96, ViT hidden 32)."""
    from unimedvl.formats.checkpoint import save_pretrained
    from unimedvl.tokenizer import Tokenizer

    out = tmp_path / "mismatched"
    out.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "test_image.png"):
        shutil.copyfile(fixture_a / name, out / name)
    shutil.copytree(fixture_a / "golden", out / "golden")
    tok = Tokenizer(out)
    cfg = tiny_config(llm={"hidden_size": 96, "num_layers": 1, "num_heads": 6, "num_kv_heads": 2, "intermediate_size": 128,
                           "vocab_size": len(tok)},
                      vit={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64})
    save_pretrained(random_model(cfg, seed=3, dtype=torch.bfloat16), out, tokenizer=tok)
    return out


def test_a_model_that_does_not_fit_the_recording_is_named_in_one_line(tmp_path, fixture_a):
    other = _other_model_with_recording(tmp_path, fixture_a)
    with pytest.raises(FixtureMismatch, match=r"LLM hidden size 96 \(the fixture's fp32.vqa.connector_output has 64\)"):
        replay(other, policies=["fp32"])
    result = _cli(other, "--policy", "fp32")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "cannot replay this fixture" in errors[0]
    assert "ViT hidden size 32" in errors[0]
    # the Python API can also point a recording at another model directory
    with pytest.raises(FixtureMismatch, match="LLM hidden size 96"):
        replay(fixture_a, policies=["fp32"], model_dir=other)


def test_logits_max_abs_is_relative_to_the_logits_scale(fixture_a):
    """FORMAT's max_abs 3e-2 holds as written on logits of fixture A's scale (RMS 1.0) and grows
    with larger (trained) logits; rel_l2 is never changed."""
    from unimedvl.evaluation.parity import TOLERANCES, Fixture

    ref = Fixture(fixture_a).get("fp32.vqa.logits").float()
    tol, note = logits_tolerance("fp32", ref)
    assert tol == TOLERANCES["logits"]["fp32"] and note == ""  # A's own scale: FORMAT's number as written
    tol, note = logits_tolerance("fp32", ref * 5)
    rms = float((ref * 5).double().pow(2).mean().sqrt())
    assert tol.max_abs == pytest.approx(3e-2 * rms / FORMAT_LOGIT_RMS) and tol.rel_l2 == 5e-3
    assert "scaled" in note
    tol, _ = logits_tolerance("fp32", ref * 0.1)
    assert tol.max_abs == 3e-2  # never tighter or looser than FORMAT below A's scale
    assert logits_tolerance("bf16", ref * 5)[0] == TOLERANCES["logits"]["bf16"]  # no max_abs in the bf16 column
