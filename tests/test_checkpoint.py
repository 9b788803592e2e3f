"""Checkpoint I/O: official layout round trips bit-exactly; bad checkpoints fail loudly and specifically."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from unimedvl import load_pretrained, save_pretrained
from unimedvl.formats.checkpoint import CheckpointError, official_manifest
from unimedvl.tokenizer import Tokenizer

from conftest import random_model


def _copy_fixture(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("golden"))
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def _rewrite(path, edit):
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_bit_exact(tmp_path, fixture_a, dtype):
    model = random_model(seed=5, dtype=dtype)
    tok = Tokenizer(fixture_a)
    save_pretrained(model, tmp_path / "ckpt", tokenizer=tok)
    loaded, loaded_tokenizer = load_pretrained(tmp_path / "ckpt", dtype=None)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype, k
        assert torch.equal(a[k], b[k]), k
    assert loaded_tokenizer is not None and loaded_tokenizer.special == tok.special
    assert loaded.config == model.config
    assert not loaded.vit_pos_embed.pos_embed.requires_grad and loaded.llm2vae.weight.requires_grad


def test_official_fixture_reloads_and_resaves_identically(tmp_path, fixture_a):
    model, tokenizer = load_pretrained(fixture_a, dtype=None)
    assert model.dtype == torch.bfloat16
    save_pretrained(model, tmp_path / "out", tokenizer=tokenizer)
    for name in ("ema.safetensors", "ae.safetensors"):
        ours, ref = load_file(str(tmp_path / "out" / name)), load_file(str(fixture_a / name))
        assert ours.keys() == ref.keys()
        for k in ref:
            assert torch.equal(ours[k], ref[k]), f"{name}:{k}"
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (fixture_a / name).read_bytes()
    # the official config files keep the official conventions (ViT json lists one extra layer)
    assert json.loads((tmp_path / "out" / "vit_config.json").read_text())["num_hidden_layers"] == 3
    assert json.loads((tmp_path / "out" / "llm_config.json").read_text())["hidden_size"] == 64


def test_fp32_load_widens_bf16_exactly(fixture_a):
    model = load_pretrained(fixture_a, dtype=torch.float32)[0]
    with safe_open(str(fixture_a / "ema.safetensors"), "pt") as f:
        ref = f.get_tensor("language_model.lm_head.weight")
    assert model.language_model.lm_head.weight.dtype == torch.float32
    assert torch.equal(model.language_model.lm_head.weight, ref.float())


def test_missing_key_is_named(tmp_path, fixture_a):
    d = _copy_fixture(fixture_a, tmp_path / "m")
    _rewrite(d / "ema.safetensors", lambda t: t.pop("language_model.model.layers.1.mlp_moe_gen.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys 1: language_model\.model\.layers\.1\.mlp_moe_gen\.up_proj\.weight"):
        load_pretrained(d)[0]


def test_mis_shaped_key_is_named_with_both_shapes(tmp_path, fixture_a):
    d = _copy_fixture(fixture_a, tmp_path / "m")
    _rewrite(d / "ema.safetensors", lambda t: t.__setitem__("connector.fc1.bias", torch.zeros(65, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=r"connector\.fc1\.bias \(checkpoint \[65\], model \[64\]\)"):
        load_pretrained(d)[0]


def test_extra_key_is_named(tmp_path, fixture_a):
    d = _copy_fixture(fixture_a, tmp_path / "m")
    _rewrite(d / "ema.safetensors", lambda t: t.__setitem__("language_model.model.layers.2.mlp.up_proj.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match=r"unexpected keys 1: language_model\.model\.layers\.2\.mlp\.up_proj\.weight"):
        load_pretrained(d)[0]


def test_many_missing_keys_are_counted(tmp_path, fixture_a):
    d = _copy_fixture(fixture_a, tmp_path / "m")
    _rewrite(d / "ae.safetensors", lambda t: [t.pop(k) for k in list(t) if k.startswith("decoder.")])
    with pytest.raises(CheckpointError, match=r"missing keys \d+: vae_model\.decoder\..*\(\+\d+ more\)"):
        load_pretrained(d)[0]


@pytest.mark.parametrize("name", ["llm_config.json", "vit_config.json", "ae.safetensors"])
def test_missing_file_is_named(tmp_path, fixture_a, name):
    d = _copy_fixture(fixture_a, tmp_path / "m")
    (d / name).unlink()
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + " is missing"):
        load_pretrained(d)[0]


def test_missing_weights_and_wrong_directory(tmp_path, fixture_a):
    d = _copy_fixture(fixture_a, tmp_path / "m")
    (d / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weight file found.*ema_bf16.safetensors, ema.safetensors"):
        load_pretrained(d)[0]
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")[0]


def test_truncated_weight_file_is_reported(tmp_path, fixture_a):
    d = _copy_fixture(fixture_a, tmp_path / "m")
    data = (d / "ema.safetensors").read_bytes()
    (d / "ema.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ema\.safetensors"):
        load_pretrained(d)[0]


def test_bf16_variant_is_preferred_and_raw_weights_selectable(tmp_path, fixture_a):
    d = _copy_fixture(fixture_a, tmp_path / "m")
    shutil.copy(d / "ema.safetensors", d / "model.safetensors")
    _rewrite(d / "model.safetensors", lambda t: t.__setitem__("llm2vae.bias", torch.full_like(t["llm2vae.bias"], 0.5)))
    shutil.copy(d / "ema.safetensors", d / "ema_bf16.safetensors")
    _rewrite(d / "ema_bf16.safetensors", lambda t: t.__setitem__("llm2vae.bias", torch.full_like(t["llm2vae.bias"], 0.25)))
    assert float(load_pretrained(d)[0].llm2vae.bias.detach()[0]) == 0.25
    assert float(load_pretrained(d, weights="model")[0].llm2vae.bias.detach()[0]) == 0.5


def test_conv_patch_embedding_and_module_prefix_and_vae_override(tmp_path, fixture_a):
    d = _copy_fixture(fixture_a, tmp_path / "m")
    ref = load_pretrained(fixture_a, dtype=torch.float32)[0]
    linear = ref.vit_model.vision_model.embeddings.patch_embedding.weight  # [D, P*P*3]
    conv = linear.reshape(linear.shape[0], 14, 14, 3).permute(0, 3, 1, 2).contiguous().to(torch.bfloat16)

    def edit_main(t):
        t["vit_model.vision_model.embeddings.patch_embedding.weight"] = conv
        t["vae_model.decoder.conv_out.bias"] = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
        t["vae_batch_norm.running_mean"] = torch.zeros(16)

    _rewrite(d / "ema.safetensors", edit_main)
    _rewrite(d / "ae.safetensors", lambda t: t.update({"module." + k: t.pop(k) for k in list(t)}))
    m = load_pretrained(d, dtype=torch.float32)[0]
    assert torch.equal(m.vit_model.vision_model.embeddings.patch_embedding.weight, linear)
    assert m.vae_model.decoder.conv_out.bias.tolist() == [1.0, 2.0, 3.0]
    torch.testing.assert_close(m.vae_model.encoder.conv_in.weight, ref.vae_model.encoder.conv_in.weight, rtol=0, atol=0)


def test_understanding_only_load_needs_no_autoencoder(tmp_path, fixture_a):
    d = _copy_fixture(fixture_a, tmp_path / "m")
    (d / "ae.safetensors").unlink()
    m = load_pretrained(d, visual_gen=False)[0]
    assert not hasattr(m, "vae_model") and not hasattr(m, "llm2vae")
    full = load_pretrained(fixture_a, dtype=None)[0].state_dict()
    # the reference's understanding model keeps 102 of 111 checkpoint keys (9 adapter keys dropped);
    # ours also drops the generation expert, which understanding tokens never use
    gen_expert = [k for k in full if "_moe_gen" in k]
    assert len(gen_expert) == 14 * m.config.llm.num_layers + 1  # per layer: q,k,v (weight, bias), o, q/k norms, 3 MLP, 2 norms; final norm
    assert not any("_moe_gen" in k for k in m.state_dict())
    assert len(m.state_dict()) == 102 - len(gen_expert)


def test_understanding_only_load_reads_no_generation_tensor(tmp_path, fixture_a, monkeypatch):
    """Only the tensors an image question uses are read from the checkpoint files."""
    from unimedvl.formats import checkpoint

    read: list[str] = []
    opened = checkpoint.open_safetensors

    class Recording:
        def __init__(self, handle):
            self.handle = handle

        def get_tensor(self, key):
            read.append(key)
            return self.handle.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    monkeypatch.setattr(checkpoint, "open_safetensors", lambda path: Recording(opened(path)))
    m = load_pretrained(fixture_a, visual_gen=False)[0]
    assert sorted(read) == sorted(m.state_dict())  # every parameter read once, nothing else
    assert not [k for k in read if checkpoint.GENERATION_ONLY.match(k) or k.startswith("vae_model.")]
    read.clear()
    load_pretrained(fixture_a)
    assert any("_moe_gen" in k for k in read) and any(k.startswith("vae_model.") or "encoder." in k for k in read)


def test_manifest_matches_official_14b_layout(fixture_a):
    ref = json.loads((fixture_a.parent / "official_14b_manifest.json").read_text())
    from unimedvl import UniMedVLConfig

    assert official_manifest(UniMedVLConfig.from_preset("unimedvl-14b")) == ref


def test_fixture_config_is_read_with_official_overrides(fixture_a):
    from unimedvl.formats.checkpoint import read_config

    cfg = read_config(fixture_a)
    assert cfg.vit.num_layers == 2  # json says 3: the official loaders drop one
    assert cfg.ae.ch == 32 and cfg.max_latent_size == 64 and cfg.vit_grid == 70
    assert cfg.llm.head_dim == 16 and cfg.llm.vocab_size == 1505
