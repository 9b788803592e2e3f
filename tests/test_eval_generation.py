"""Generation metrics: the FID Inception network and its weights file, BiomedCLIP towers, the
per-image feature cache and the text-to-image evaluation end to end."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from unimedvl.evaluation.features import (FeatureCache, FeatureWeightsError, ImageSource, load_feature_extractor,
                                          register_feature_extractor)
from unimedvl.evaluation.fid import feature_statistics, fid_from_features, frechet_distance

# ---- FID arithmetic ---------------------------------------------------------------------------


def test_sample_space_fid_equals_the_covariance_square_root_route():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 64)), rng.normal(1.0, 2.0, size=(30, 64))  # n < d: sample-space route
    direct = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert fid_from_features(a, b) == pytest.approx(direct, rel=1e-6)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="same d"):
        fid_from_features(a, b[:, :10])


# ---- Inception-v3 (FID) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A randomly initialised FID Inception saved in the pytorch-fid layout (without the BN counters,
    as the ported file has none)."""
    from unimedvl.evaluation.inception import InceptionV3FID

    torch.manual_seed(0)
    net = InceptionV3FID()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics, so loading them matters
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return path, net.eval()


def test_inception_has_the_pytorch_fid_module_tree():
    from unimedvl.evaluation.inception import InceptionV3FID

    state = InceptionV3FID().state_dict()
    params = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    # the torchvision/pytorch-fid Inception-v3 without the auxiliary head, 1008-way fc
    assert sum(v.numel() for k, v in params.items() if not k.endswith(("running_mean", "running_var"))) == 23_850_960
    assert tuple(state["Mixed_7c.branch_pool.conv.weight"].shape) == (192, 2048, 1, 1)
    assert tuple(state["Mixed_6e.branch7x7dbl_5.conv.weight"].shape) == (192, 192, 1, 7)
    assert tuple(state["fc.weight"].shape) == (1008, 2048)
    assert not any(k.startswith("AuxLogits") for k in state)


def test_inception_extractor_loads_the_file_and_resizes_any_image(inception_file):
    path, net = inception_file
    extractor = load_feature_extractor("inception-v3-fid", path)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 255, (299, 299), dtype=np.uint8))]  # grayscale, other size
    feats = extractor(images)
    assert feats.shape == (2, 2048)
    with torch.no_grad():  # the network resizing the whole batch gives what the extractor's per-image resize gives
        for feat, im in zip(feats, images):
            ref = net(torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None])
            assert np.allclose(feat, ref[0].numpy(), atol=1e-5)
    assert (feats >= 0).all()  # pooled ReLU outputs


def test_inception_weights_with_missing_or_misshapen_keys_are_named(inception_file, tmp_path):
    path, _ = inception_file
    state = torch.load(path, weights_only=True)
    broken = dict(state)
    del broken["Mixed_6b.branch7x7_2.conv.weight"]
    torch.save(broken, tmp_path / "missing.pth")
    with pytest.raises(FeatureWeightsError, match="missing.pth.*Mixed_6b.branch7x7_2.conv.weight"):
        load_feature_extractor("inception-v3-fid", tmp_path / "missing.pth")
    broken = dict(state)
    broken["Conv2d_1a_3x3.conv.weight"] = torch.zeros(32, 3, 5, 5)
    torch.save(broken, tmp_path / "shape.pth")
    with pytest.raises(FeatureWeightsError, match=r"shape.pth .*mis-shaped keys 1: Conv2d_1a_3x3.conv.weight \(checkpoint \[32, 3, 5, 5\], model \[32, 3, 3, 3\]\)"):
        load_feature_extractor("inception-v3-fid", tmp_path / "shape.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FeatureWeightsError, match="junk.pth: not a readable state dict"):
        load_feature_extractor("inception-v3-fid", tmp_path / "junk.pth")
    with pytest.raises(FeatureWeightsError, match="nothing is downloaded"):
        load_feature_extractor("inception-v3-fid", tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="unknown feature extractor 'nope'"):
        load_feature_extractor("nope", path)


# ---- a tiny registered extractor and the per-image cache ------------------------------------------


class ColourStats:
    """Per-channel mean, std and 90th percentile: a cheap 9-d feature for the tests."""

    name, dim = "colour-stats", 9

    def __init__(self):
        self.images_seen = 0

    def __call__(self, images):
        self.images_seen += len(images)
        out = []
        for im in images:
            a = np.asarray(im.convert("RGB"), dtype=np.float64) / 255
            out.append(np.concatenate([a.mean((0, 1)), a.std((0, 1)), np.percentile(a, 90, axis=(0, 1))]))
        return np.stack(out)


COLOUR_STATS = ColourStats()
register_feature_extractor("colour-stats", lambda weights, device: COLOUR_STATS)


def _png(seed: int, tint=(0, 0, 0), size=(32, 24)) -> bytes:
    rng = np.random.default_rng(seed)
    a = np.clip(rng.integers(0, 200, (size[1], size[0], 3)) + np.array(tint), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_feature_cache_extracts_each_image_once_by_content(tmp_path):
    extractor = ColourStats()
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(_png(0))
    b.write_bytes(_png(1))
    cache = FeatureCache(tmp_path / "cache", extractor)
    first = cache.features([ImageSource.from_path(a), ImageSource.from_path(b)], batch_size=1)
    assert extractor.images_seen == 2
    (tmp_path / "copy.png").write_bytes(a.read_bytes())  # same bytes under another name: cached
    again = cache.features([ImageSource.from_path(tmp_path / "copy.png"), ImageSource.from_path(b)])
    assert extractor.images_seen == 2
    assert np.array_equal(first, again)
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.png: not a readable image"):
        cache.features([ImageSource.from_path(tmp_path / "bad.png")])


# ---- BiomedCLIP --------------------------------------------------------------------------------

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "chest", "x", "-", "ray", "with", "a", "large", "opacity",
         "normal", "brain", "mri", "fundus", "photograph", "."]


@pytest.fixture(scope="module")
def biomedclip_dir(tmp_path_factory):
    """A tiny BiomedCLIP-layout checkpoint (ViT 32 px / patch 8 / width 128, BERT width 128) with an
    open_clip config and a BiomedBERT-style vocab.txt."""
    from transformers import BertConfig, BertModel

    from unimedvl.evaluation.clip_towers import ClipTowers, TextTower, Visual, VisionTransformer

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(VOCAB), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=256, max_position_embeddings=64), add_pooling_layer=False)
    towers = ClipTowers(Visual(VisionTransformer(32, 8, 128, 2, 2, 256), 48, 128), TextTower(bert, 128, 48))
    with torch.no_grad():
        for p in towers.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # move off zero/one inits so every tensor matters
    d = tmp_path_factory.mktemp("biomedclip")
    torch.save(towers.state_dict(), d / "open_clip_pytorch_model.bin")
    (d / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": 48, "vision_cfg": {"image_size": 32, "timm_pool": "", "timm_proj": "linear"},
                      "text_cfg": {"context_length": 12, "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler"}},
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }))
    tok = d / "tokenizer"
    tok.mkdir()
    (tok / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return d


def test_vision_tower_matches_the_transformers_vit(biomedclip_dir):
    """The timm-layout ViT equals transformers' ViTModel given the same weights (qkv split apart)."""
    from transformers import ViTConfig, ViTModel

    from unimedvl.evaluation.biomedclip import load_biomedclip

    clip = load_biomedclip(biomedclip_dir, biomedclip_dir / "tokenizer")
    trunk = clip.towers.visual.trunk
    hf = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=256, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True),
                  add_pooling_layer=False).eval()
    t = {k: v for k, v in trunk.state_dict().items()}
    mapped = {"embeddings.cls_token": t["cls_token"], "embeddings.position_embeddings": t["pos_embed"],
              "embeddings.patch_embeddings.projection.weight": t["patch_embed.proj.weight"],
              "embeddings.patch_embeddings.projection.bias": t["patch_embed.proj.bias"],
              "layernorm.weight": t["norm.weight"], "layernorm.bias": t["norm.bias"]}
    for i in range(2):  # transformers 5 names: layers.N.attention.{q,k,v,o}_proj, mlp.fc1/fc2
        b, h = f"blocks.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            for part, name in zip(t[b + "attn.qkv." + kind].chunk(3), ("q", "k", "v")):
                mapped[h + f"attention.{name}_proj.{kind}"] = part
            pairs = {"attn.proj": "attention.o_proj", "norm1": "layernorm_before", "norm2": "layernorm_after",
                     "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
            for ours, theirs in pairs.items():
                mapped[h + theirs + "." + kind] = t[b + ours + "." + kind]
    missing, unexpected = hf.load_state_dict(mapped, strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k]
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(trunk(pixels), hf(pixel_values=pixels).last_hidden_state[:, 0], atol=1e-5)


def test_biomedclip_scores_are_normalised_cosines_in_both_scalings(biomedclip_dir):
    from unimedvl.evaluation.biomedclip import clip_score, load_biomedclip

    clip = load_biomedclip(biomedclip_dir, biomedclip_dir / "tokenizer")
    assert (clip.image_size, clip.context_length, clip.dim) == (32, 12, 48)
    images = [Image.open(io.BytesIO(_png(s, size=(40, 30)))) for s in range(3)]
    emb = clip(images)
    assert emb.shape == (3, 48) and np.allclose(np.linalg.norm(emb, axis=1), 1.0)
    prompts = ["chest x-ray with a large opacity.", "normal brain mri.", "fundus photograph."]
    cos = clip.cosine(emb, prompts)
    text = clip.embed_texts(prompts)
    assert np.allclose(cos, (emb * text).sum(1)) and np.all(np.abs(cos) <= 1 + 1e-9)
    assert np.allclose(clip_score(cos), 2.5 * np.maximum(cos, 0))
    assert clip_score([-0.3, 0.4]).tolist() == pytest.approx([0.0, 1.0])
    # centre crop: a wide image scores like its centred square
    wide = Image.open(io.BytesIO(_png(7, size=(64, 32))))
    assert np.allclose(clip([wide]), clip([wide.crop((16, 0, 48, 32))]), atol=1e-6)
    # prompts longer than the context are truncated, not rejected: only the first 12 tokens count
    long_a = "chest x-ray with a large opacity " * 6 + "normal"
    long_b = "chest x-ray with a large opacity " * 6 + "fundus"
    assert np.allclose(clip.embed_texts([long_a]), clip.embed_texts([long_b]))


def test_biomedclip_checkpoint_problems_are_specific(biomedclip_dir, tmp_path):
    from unimedvl.evaluation.biomedclip import load_biomedclip

    with pytest.raises(FeatureWeightsError, match="tokenizer"):
        load_biomedclip(biomedclip_dir)  # vocab.txt lives in a sub-folder
    state = torch.load(biomedclip_dir / "open_clip_pytorch_model.bin", weights_only=True)
    del state["text.proj.2.weight"]
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.txt").write_text("\n".join(VOCAB))
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(FeatureWeightsError, match="missing key.*text.proj.2.weight"):
        load_biomedclip(tmp_path, tmp_path / "tokenizer")
    del state["visual.trunk.cls_token"]
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(FeatureWeightsError, match="not an open_clip ViT \\+ BERT checkpoint .*visual.trunk.cls_token"):
        load_biomedclip(tmp_path, tmp_path / "tokenizer")


# ---- text-to-image evaluation ---------------------------------------------------------------------


def _prompt_set(tmp_path):
    """Parquet prompt set: CXR (6 prompts), MRI (5), and an unmapped 'Dermoscopy' (2) - Parquet
    image bytes; generated images tinted per modality, two prompts left without an image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i in range(6):
        rows.append({"id": f"cxr/{i}", "caption": "chest x-ray with a large opacity.", "modality": "X-ray", "image": {"bytes": _png(i), "path": None}})
    for i in range(5):
        rows.append({"id": f"mri-{i}", "caption": "normal brain mri.", "modality": "MRI", "image": {"bytes": _png(10 + i, (40, 0, 0)), "path": None}})
    for i in range(2):
        rows.append({"id": f"derm-{i}", "caption": "fundus photograph.", "modality": "Dermoscopy", "image": {"bytes": _png(20 + i), "path": None}})
    path = tmp_path / "eval_generation.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    gen = tmp_path / "generated"
    gen.mkdir()
    from unimedvl.evaluation.t2i import image_file_name

    for r in rows:
        if r["id"] in ("cxr/5", "mri-4"):
            continue  # not generated
        (gen / image_file_name(r["id"])).write_bytes(_png(100 + len(r["id"]) + int(r["id"][-1]), (0, 30, 0)))
    return path, gen


def test_t2i_evaluation_per_modality_with_counts_paper_table_and_cache(tmp_path, biomedclip_dir):
    from unimedvl.evaluation.biomedclip import load_biomedclip
    from unimedvl.evaluation.fid import kernel_inception_distance
    from unimedvl.evaluation.t2i import evaluate_t2i, image_file_name, load_prompts

    path, gen = _prompt_set(tmp_path)
    extractor = ColourStats()
    clip = load_biomedclip(biomedclip_dir, biomedclip_dir / "tokenizer")
    out = tmp_path / "out"
    results = evaluate_t2i(path, gen, out, feature_extractor=extractor, biomedclip=clip, batch_size=4, progress=False)
    assert (results["n_prompts"], results["n_generated"], results["missing"]) == (13, 11, 2)
    assert sorted(results["missing_ids"]) == ["cxr/5", "mri-4"]
    cxr, mri = results["modalities"]["CXR"], results["modalities"]["MRI"]
    assert (cxr["n_generated"], cxr["n_reference"], mri["n_generated"], mri["n_reference"]) == (5, 6, 4, 5)
    prompts = load_prompts(path)
    real = extractor([ImageSource.from_bytes(p.reference.read_bytes(), "").image() for p in prompts if p.modality == "CXR"])
    fake = extractor([Image.open(gen / image_file_name(p.id)) for p in prompts if p.modality == "CXR" and p.id != "cxr/5"])
    assert cxr["fid"] == pytest.approx(fid_from_features(fake, real), rel=1e-9)
    assert cxr["kid"] == pytest.approx(kernel_inception_distance(fake, real, subset_size=1000)[0], rel=1e-9)
    # the unmapped modality is scored under its own name but left out of the Average
    assert results["average"]["over"] == ["CXR", "MRI"]
    assert results["average"]["fid"] == pytest.approx((cxr["fid"] + mri["fid"]) / 2)
    derm = results["modalities"]["Dermoscopy"]
    assert derm["fid"] is not None and derm["biomedclip_cosine"] is not None
    scored = [json.loads(line) for line in (out / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == 13 and sum(r["generated"] for r in scored) == 11
    cxr_cos = [r["biomedclip_cosine"] for r in scored if r["modality"] == "CXR" and r["generated"]]
    assert cxr["biomedclip_cosine"] == pytest.approx(np.mean(cxr_cos))
    assert cxr["biomedclip_clipscore"] == pytest.approx(np.mean(2.5 * np.maximum(cxr_cos, 0)))
    md = (out / "results.md").read_text()
    assert "gFID Bagel (paper)" in md and "215.49" in md and "BioMedCLIP UniMedVL (paper)" in md and "5 / 6" in md
    assert Image.open(out / "fid.png").size[0] > 0 and Image.open(out / "biomedclip.png").size[0] > 0
    # rerun: every image's features come from the cache
    seen = extractor.images_seen
    again = evaluate_t2i(path, gen, out, feature_extractor=extractor, batch_size=4, progress=False)
    assert extractor.images_seen == seen and again["modalities"]["CXR"]["fid"] == pytest.approx(cxr["fid"])


def test_prompt_files_with_problems_name_file_and_line(tmp_path):
    from unimedvl.evaluation.t2i import PromptFileError, load_prompts

    (tmp_path / "a.png").write_bytes(_png(0))
    good = {"prompt": "chest x-ray.", "modality": "cxr", "image": "a.png"}
    lines = [good, {"prompt": "brain mri.", "modality": "MRI", "image": "absent.png"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(PromptFileError, match=r"p.jsonl, line 2: reference image .*absent.png not found"):
        load_prompts(tmp_path / "p.jsonl")
    (tmp_path / "q.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "x", "image": "a.png"}) + "\n")
    with pytest.raises(PromptFileError, match=r"q.jsonl, line 2: expected non-empty 'prompt'.*'modality'"):
        load_prompts(tmp_path / "q.jsonl")
    (tmp_path / "r.jsonl").write_text(json.dumps({**good, "id": 7}) + "\n" + json.dumps({**good, "id": "7"}) + "\n")
    with pytest.raises(PromptFileError, match=r"r.jsonl, line 2: duplicate id '7'"):
        load_prompts(tmp_path / "r.jsonl")
    (tmp_path / "ok.jsonl").write_text(json.dumps(good) + "\n")
    [p] = load_prompts(tmp_path / "ok.jsonl")
    assert (p.id, p.modality) == ("0", "CXR")


def test_generate_missing_resumes_and_marks_images_synthetic(tmp_path, pipe):
    from unimedvl.evaluation.t2i import T2IPrompt, generate_missing, image_file_name
    from unimedvl.formats.generated import read_png_metadata

    prompts = [T2IPrompt(f"p/{i}", "Frontal chest radiograph.", "CXR", ImageSource.from_bytes(b"", "-")) for i in range(3)]
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / image_file_name("p/1")).write_bytes(_png(0))  # produced by an earlier, interrupted run
    report = generate_missing(pipe, prompts, gen, height=32, width=32, steps=3, progress=False)
    assert (report["generated_now"], report["already_present"], report["failed"]) == (2, 1, {})
    meta = read_png_metadata(gen / image_file_name("p/0"))
    assert meta["Synthetic"] == "true" and meta["unimedvl"]["seed"] == 42
    sampler = meta["unimedvl"]["sampler"]
    assert (sampler["cfg_renorm_type"], sampler["cfg_text_scale"], sampler["cfg_interval"], sampler["num_timesteps"]) == ("text_channel", 4.0, [0.0, 1.0], 3)
    assert not list(gen.glob(".*partial"))


def test_cli_t2i_generates_the_missing_images_then_scores(tmp_path, fixture_a, biomedclip_dir):
    from typer.testing import CliRunner

    from unimedvl.cli import app
    from unimedvl.evaluation.t2i import image_file_name

    path, gen = _prompt_set(tmp_path)
    weights = tmp_path / "unused.pth"
    weights.write_bytes(b"")  # the colour-stats extractor needs no weights
    args = ["eval", "t2i", "--prompts", str(path), "--generated", str(gen), "--out", str(tmp_path / "out"),
            "--extractor", "colour-stats", "--feature-weights", str(weights),
            "--biomedclip", str(biomedclip_dir), "--biomedclip-tokenizer", str(biomedclip_dir / "tokenizer")]
    result = CliRunner().invoke(app, args + ["--model", str(fixture_a), "--dtype", "fp32", "--height", "32", "--width", "32", "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert "generated 2 image(s), 11 already present" in result.output
    assert (gen / image_file_name("cxr/5")).is_file() and (gen / image_file_name("mri-4")).is_file()
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["missing"] == 0 and saved["modalities"]["CXR"]["n_generated"] == 6
    assert "gFID, this run" in result.output and "BioMedCLIP cos, this run" in result.output

    none = CliRunner().invoke(app, ["eval", "t2i", "--prompts", str(path), "--generated", str(gen), "--out", str(tmp_path / "o2")])
    assert none.exit_code == 2 and "nothing is downloaded" in none.output
    missing = CliRunner().invoke(app, ["eval", "t2i", "--prompts", str(path), "--generated", str(gen), "--out", str(tmp_path / "o3"),
                                       "--feature-weights", str(tmp_path / "absent.pth")])
    assert missing.exit_code == 2 and "absent.pth: weights file not found" in missing.output
