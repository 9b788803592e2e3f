"""Weight-only int8: quantised while loading, within tolerance of fp32 on the reference fixture."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from unimedvl import UniMedVLPipeline, load_pretrained
from unimedvl.model.quantized import Int8Linear, quantize_int8, quantize_model

QUESTION = "What is shown in this image?"


@pytest.fixture(scope="module")
def int8_pipe(fixture_a):
    return UniMedVLPipeline.from_pretrained(fixture_a, dtype="fp32", quantize="int8")


def test_int8_round_trip_error_is_bounded_per_row():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    w[3] = 0.0  # an all-zero row stays zero
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())  # rounding: at most half a step per row
    assert not q[3].any()


def test_quantised_layers_and_kept_ones(int8_pipe):
    m = int8_pipe.model
    quantised = {n for n, mod in m.named_modules() if isinstance(mod, Int8Linear)}
    linears = {n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert len(quantised) == 14 * m.config.llm.num_layers + 6 * m.config.vit.num_layers + 2  # 7 per expert, 6 per ViT layer, connector
    assert linears == {"language_model.lm_head", "vit_model.vision_model.embeddings.patch_embedding", "time_embedder.mlp.0",
                       "time_embedder.mlp.2", "vae2llm", "llm2vae"}
    assert m.language_model.model.embed_tokens.weight.dtype == torch.float32
    assert all(mod.weight.dtype == torch.int8 for mod in m.modules() if isinstance(mod, Int8Linear))


def test_quantise_while_loading_equals_quantising_the_loaded_model(fixture_a, int8_pipe):
    full, _ = load_pretrained(fixture_a, dtype="fp32")
    quantize_model(full, "int8")
    ours = int8_pipe.model.state_dict()
    theirs = full.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k  # the same arithmetic on the same weights: bit-exact


def test_int8_logits_within_2_percent_and_greedy_ids_on_decisive_steps(pipe, int8_pipe, image):
    answer = pipe.ask([image], QUESTION, temperature=0, max_new_tokens=24)
    ids = answer.token_ids + [pipe.tokenizer.special.eos]

    def teacher_forced(p) -> torch.Tensor:
        ctx = p.chat().add_user(QUESTION, [image])
        return p.engine.generate_text(ctx, len(ids), forced_ids=ids).logits  # [steps, V]

    ref, q = teacher_forced(pipe), teacher_forced(int8_pipe)
    rel_l2 = float((q - ref).norm() / ref.norm())
    assert rel_l2 <= 2e-2, rel_l2  # measured 1.2e-2
    # a step is decisive when fp32's top-1 margin exceeds twice the largest logit error: int8 cannot flip it
    top2 = ref.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * float((q - ref).abs().max())
    assert int(decisive.sum()) >= len(ids) // 2
    assert torch.equal(q.argmax(-1)[decisive], ref.argmax(-1)[decisive])


def test_int8_generation_stays_close_to_fp32(pipe, int8_pipe):
    a = np.asarray(pipe.generate_image("Chest X-ray", height=32, width=32, steps=4, seed=1).image, dtype=np.float64)
    b = np.asarray(int8_pipe.generate_image("Chest X-ray", height=32, width=32, steps=4, seed=1).image, dtype=np.float64)
    psnr = 10 * np.log10(255**2 / max(((a - b) ** 2).mean(), 1e-12))
    assert psnr > 35, psnr  # measured 53.9 dB on the fixture


def test_unknown_scheme_is_refused_before_reading(fixture_a, monkeypatch):
    from unimedvl.formats import checkpoint

    monkeypatch.setattr(checkpoint, "_open", lambda path: pytest.fail("read a file"))
    with pytest.raises(ValueError, match=r"unknown quantisation scheme 'int3'; available: int8"):
        load_pretrained(fixture_a, quantize="int3")


def test_cli_quantize_answers_like_the_python_api(fixture_a, int8_pipe):
    import json

    from typer.testing import CliRunner

    from unimedvl.cli import app

    image = str(fixture_a / "test_image.png")
    base = ["ask", image, "-q", QUESTION, "-m", str(fixture_a), "--dtype", "fp32", "--temperature", "0", "--max-new-tokens", "8"]
    result = CliRunner().invoke(app, [*base, "--quantize", "int8", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["answer"] == int8_pipe.ask([image], QUESTION, temperature=0, max_new_tokens=8).text
    refused = CliRunner().invoke(app, [*base, "--quantize", "nf5"])
    assert refused.exit_code == 2 and "unknown quantisation scheme 'nf5'" in refused.output


# ---- pre-quantised checkpoints ---------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized_dir(fixture_a, tmp_path_factory):
    from typer.testing import CliRunner

    from unimedvl.cli import app

    out = tmp_path_factory.mktemp("q") / "int8"
    result = CliRunner().invoke(app, ["quantize", "--model", str(fixture_a), "--out", str(out), "--scheme", "int8"])
    assert result.exit_code == 0, result.output
    return out


def test_stream_writer_is_read_back_by_safetensors(tmp_path):
    from safetensors import safe_open

    from unimedvl.formats.safetensors_stream import write_safetensors_stream

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g).bfloat16(), "b": torch.randint(-127, 127, (7,), dtype=torch.int8, generator=g),
               "c": torch.randn(2, generator=g)}
    write_safetensors_stream(tmp_path / "x.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()],
                             lambda k: tensors[k], {"note": "streamed"})
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"note": "streamed"} and sorted(f.keys()) == ["a", "b", "c"]
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)
    with pytest.raises(ValueError, match="c was declared"):
        write_safetensors_stream(tmp_path / "y.safetensors", [("c", torch.float32, (3,))], lambda k: tensors[k])
    assert not (tmp_path / "y.safetensors").exists() and not list(tmp_path.glob(".y.*"))  # nothing partial left


def test_pre_quantised_checkpoint_describes_itself_and_loads_bit_exact(fixture_a, quantized_dir, int8_pipe, monkeypatch):
    import json

    from safetensors import safe_open

    from unimedvl.formats import checkpoint

    meta = json.loads((quantized_dir / "quantization.json").read_text())
    assert meta["unimedvl_quantization"] == "int8" and meta["group_size"] == "row" and meta["source_file"] == "ema.safetensors"
    import hashlib

    assert meta["source_sha256"] == hashlib.sha256((fixture_a / "ema.safetensors").read_bytes()).hexdigest()
    with safe_open(str(quantized_dir / "ema.safetensors"), "pt") as f, safe_open(str(fixture_a / "ema.safetensors"), "pt") as src:
        assert f.metadata()["unimedvl_quantization"] == "int8"
        stored = {k: f.get_tensor(k) for k in f.keys()}
        for k in src.keys():  # quantised weights are int8 with a scale beside them; the rest is copied as stored
            if stored[k].dtype == torch.int8:
                assert stored[k.removesuffix("weight") + "scale"].shape == (stored[k].shape[0],)
            else:
                assert torch.equal(stored[k], src.get_tensor(k)), k
        assert sum(v.dtype == torch.int8 for v in stored.values()) == 14 * 2 + 6 * 2 + 2  # the fixture: 2 LLM, 2 ViT layers
    for name in ("llm_config.json", "vit_config.json", "ae.safetensors", "vocab.json", "merges.txt"):
        assert (quantized_dir / name).read_bytes() == (fixture_a / name).read_bytes()

    monkeypatch.setattr(checkpoint, "quantize_int8", lambda *a: pytest.fail("re-quantised a pre-quantised checkpoint"))
    model, tokenizer = load_pretrained(quantized_dir, dtype="fp32")
    assert tokenizer is not None
    ours, theirs = model.state_dict(), int8_pipe.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _rewrite(src, dst, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    change(tensors)
    save_file(tensors, str(dst), metadata=meta)


def test_mismatched_or_corrupt_quantised_files_name_the_key_and_scheme(quantized_dir, tmp_path):
    import shutil

    from unimedvl.formats.checkpoint import CheckpointError
    from unimedvl.formats.quantized_checkpoint import quantize_checkpoint

    key = "language_model.model.layers.0.mlp.up_proj.weight"
    cases = {
        "float": (lambda t: t.__setitem__(key, t[key].float()), rf"int8-quantised.*{re.escape(key)} is F32"),
        "no_scale": (lambda t: t.pop(key.replace("weight", "scale")), r"int8-quantised.*missing keys.*up_proj\.scale"),
        "shape": (lambda t: t.__setitem__(key, t[key][:-1]), rf"int8-quantised.*mis-shaped.*{re.escape(key)}"),
    }
    for name, (change, message) in cases.items():
        d = tmp_path / name
        shutil.copytree(quantized_dir, d)
        _rewrite(quantized_dir / "ema.safetensors", d / "ema.safetensors", change)
        with pytest.raises(CheckpointError, match=message):
            load_pretrained(d)
    d = tmp_path / "truncated"
    shutil.copytree(quantized_dir, d)
    (d / "ema.safetensors").write_bytes((quantized_dir / "ema.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read as safetensors"):
        load_pretrained(d)
    with pytest.raises(CheckpointError, match="already quantised"):
        quantize_checkpoint(quantized_dir, tmp_path / "twice")
