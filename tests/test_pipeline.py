"""The Python API (ask / report / generate_image / edit) on the shared fixture model."""

import json

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from unimedvl import UniMedVLPipeline
from unimedvl.image_transforms import GEN_VAE, GEN_VIT, normalize_u8
from unimedvl.inference import PromptTooLongError
from unimedvl.inference.prompts import parse_report, report_prompt, split_thinking
from unimedvl.formats.generated import read_png_metadata


def test_streaming_yields_the_same_text_as_one_call(pipe, image):
    whole = pipe.ask([image], "Describe the findings.", max_new_tokens=24, temperature=0.7, seed=3)
    stream = pipe.ask([image], "Describe the findings.", max_new_tokens=24, temperature=0.7, seed=3, stream=True)
    pieces, decoded = [], []  # decoded: how many ids had been decoded when each piece arrived
    for piece in stream:
        pieces.append(piece)
        decoded.append(len(stream.stream.ids))
    assert len(pieces) > 1
    assert "".join(pieces) == whole.text
    assert stream.answer.token_ids == whole.token_ids
    assert decoded[0] < len(whole.token_ids)  # pieces arrive while decoding, not all at the end
    assert decoded == sorted(decoded)


def test_a_plain_answer_is_detokenized_once(pipe, image, monkeypatch):
    calls = []
    decode = pipe.tokenizer.decode
    monkeypatch.setattr(pipe.tokenizer, "decode", lambda ids, **kw: calls.append(len(ids)) or decode(ids, **kw))
    answer = pipe.ask([image], "Describe the findings.", max_new_tokens=12, temperature=0)
    assert len(answer.token_ids) > 1
    assert calls == [len(answer.token_ids) + 1]  # <|im_start|> + the answer, once


def test_same_seed_same_answer_and_sampling_depends_on_it(pipe, image):
    a = pipe.ask([image], "What is shown?", max_new_tokens=16, temperature=5.0, seed=1)
    b = pipe.ask([image], "What is shown?", max_new_tokens=16, temperature=5.0, seed=1)
    c = pipe.ask([image], "What is shown?", max_new_tokens=16, temperature=5.0, seed=2)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_follow_up_reuses_the_cached_conversation(pipe, image):
    first = pipe.ask([image], "What is shown?", max_new_tokens=12, temperature=0)
    before = pipe.engine.forwarded_tokens
    second = pipe.ask(None, "Where exactly?", history=first.conversation, max_new_tokens=8, temperature=0)
    ran = pipe.engine.forwarded_tokens - before
    question = len(pipe.tokenizer.encode("Where exactly?")) + 2
    decode_steps = len(second.token_ids) + 1  # <|im_start|> + every fed id
    # one token closes the first answer, then only the new question and the new answer run (the
    # 729-patch image is not recomputed)
    assert ran == 1 + question + decode_steps

    # The reused context equals one built from scratch with the answer as a text item.
    eng = pipe.engine
    from unimedvl.image_transforms import VQA_VIT

    ctx = eng.new_context()
    eng.add_vit_image(ctx, VQA_VIT(image))
    eng.add_text(ctx, pipe.tokenizer.encode("What is shown?"))
    eng.add_text(ctx, first.token_ids)
    eng.add_text(ctx, pipe.tokenizer.encode("Where exactly?"))
    fresh = eng.generate_text(ctx, 8)
    assert fresh.ids == second.token_ids
    assert len(second.conversation.turns) == 4


def test_prompt_longer_than_the_context_window_is_refused(pipe, image, monkeypatch):
    monkeypatch.setattr(pipe.model.config.llm, "max_position_embeddings", 40)
    with pytest.raises(PromptTooLongError, match="context window is 40"):
        pipe.ask([image], "word " * 60, max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        pipe.ask([image], "   ")


def test_report_sections_and_prompt_helpers():
    r = parse_report("Findings: clear lungs.\nNo effusion.\nImpression: Normal chest.")
    assert r.findings == "clear lungs.\nNo effusion." and r.impression == "Normal chest."
    assert parse_report("just text").findings == "just text" and parse_report("just text").impression == ""
    assert split_thinking("<think> plan it </think> the answer") == ("plan it", "the answer")
    assert split_thinking("no tags") == (None, "no tags")


def test_report_uses_the_dicom_modality(pipe):
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    rep = pipe.report(path, max_new_tokens=6, temperature=0)
    assert rep.modality == "CT"
    want = pipe.ask([path], report_prompt("CT"), max_new_tokens=6, temperature=0)
    assert want.token_ids and rep.answer.token_ids == want.token_ids
    assert rep.text == want.text
    sections = parse_report(want.text)
    assert (rep.findings, rep.impression) == (sections.findings, sections.impression)


def test_generate_image_is_reproducible_and_marked_synthetic(pipe, tmp_path):
    kw = dict(height=64, width=96, steps=4)
    a = pipe.generate_image("A chest X-ray of a healthy adult.", seed=5, **kw)
    b = pipe.generate_image("A chest X-ray of a healthy adult.", seed=5, **kw)
    c = pipe.generate_image("A chest X-ray of a healthy adult.", seed=6, **kw)
    assert a.image.size == (96, 64)
    assert np.array_equal(np.array(a.image), np.array(b.image))
    assert not torch.equal(a.latents, c.latents)

    png = a.save(tmp_path / "cxr.png")
    meta = read_png_metadata(png)
    assert meta["Synthetic"] == "true"
    rec = meta["unimedvl"]
    assert rec["synthetic"] is True and rec["prompt"] == "A chest X-ray of a healthy adult." and rec["seed"] == 5
    assert rec["sampler"]["num_timesteps"] == 4 and rec["sampler"]["cfg_text_scale"] == 3.0
    assert np.array_equal(np.array(Image.open(png).convert("RGB")), np.array(a.image))

    dcm = pydicom.dcmread(a.save(tmp_path / "cxr.dcm"))
    assert dcm.ConversionType == "SYN" and list(dcm.ImageType) == ["DERIVED", "SECONDARY"]
    assert dcm.PatientName.family_name == "SYNTHETIC" and dcm.BurnedInAnnotation == "NO"
    assert json.loads(dcm.ImageComments)["prompt"] == rec["prompt"]
    assert np.array_equal(dcm.pixel_array.reshape(64, 96, -1)[..., 0], np.array(a.image)[..., 0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cxr.dcm", "cxr.png"]  # no partial files left

    with pytest.raises(ValueError, match="multiple of 16"):
        pipe.generate_image("x", height=70, width=64, steps=2)


def test_interrupted_save_leaves_no_file(pipe, tmp_path, monkeypatch):
    result = pipe.generate_image("A brain MRI.", height=32, width=32, steps=2)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        result.save(tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


def test_image_guidance_branch_equal_to_the_conditional_one_is_not_run_twice(pipe):
    """Text-to-image: c_I equals c, so a guided step runs two branches, not three."""
    before = pipe.engine.forwarded_tokens
    pipe.generate_image("A knee MRI.", height=32, width=32, steps=3, cfg_interval=(0.0, 1.0))
    ran = pipe.engine.forwarded_tokens - before
    prompt_tokens = len(pipe.tokenizer.encode("A knee MRI.")) + 2
    block = 2 * 2 + 2  # 2x2 latent tokens + the two markers
    assert ran == prompt_tokens + 2 * 2 * block


def test_edit_keeps_the_input_size_and_conditions_on_the_analysis(pipe, image):
    src = image.resize((300, 200))
    out_w, out_h = GEN_VAE.target_size(300, 200)
    plain = pipe.edit([src], "Stain this tile.", steps=3, analyze=False)
    assert plain.image.size == (out_w, out_h)
    assert plain.analysis is None and plain.record["conditioning_text"] == "Stain this tile."
    analysed = pipe.edit([src], "Stain this tile.", steps=3, max_analysis_tokens=6, explain=True, max_explanation_tokens=5)
    assert analysed.record["conditioning_text"] == "Stain this tile.\n\n" + analysed.analysis
    assert analysed.record["explanation"] == analysed.explanation
    # The explanation is the greedy answer after: VAE + ViT blocks of the input, the conditioning
    # text, the generated latents and the generated image as a ViT block.
    eng, tok = pipe.engine, pipe.tokenizer
    vae_image = GEN_VAE.resize(src)
    z, down = pipe.model.config.ae.z_channels, pipe.model.config.ae.downsample
    posterior = torch.randn(z, out_h // down, out_w // down, generator=torch.Generator().manual_seed(42))  # edit's first seeded draw
    ctx = eng.new_context()
    eng.add_vae_image(ctx, normalize_u8(np.asarray(vae_image)), posterior)
    eng.add_vit_image(ctx, GEN_VIT(vae_image))
    eng.add_text(ctx, tok.encode(analysed.record["conditioning_text"]))
    eng.add_latent_tokens(ctx, analysed.latents, eng.latent_grid(out_h, out_w))
    eng.add_vit_image(ctx, GEN_VIT(analysed.image))
    explained = eng.generate_text(ctx, 5)
    assert explained.ids
    assert analysed.explanation == tok.decode_generation([tok.special.bos, *explained.ids])
    assert not torch.equal(plain.latents, analysed.latents)  # the pre-pass answer conditions the image
    same = pipe.edit([src], "Stain this tile.", steps=3, analyze=False)
    assert torch.equal(plain.latents, same.latents)


def test_edit_checks_the_sampler_settings_before_any_work(pipe, image, monkeypatch):
    eng = pipe.engine
    work = []
    forward, encode = eng.forward, eng.encode_latents
    monkeypatch.setattr(eng, "forward", lambda *a, **k: work.append("forward") or forward(*a, **k))
    monkeypatch.setattr(eng, "encode_latents", lambda *a, **k: work.append("encode") or encode(*a, **k))
    with pytest.raises(ValueError, match="cfg_renorm_type"):
        pipe.edit([image], "Stain this tile.", cfg_renorm_type="bogus", max_analysis_tokens=4)
    with pytest.raises(ValueError, match="steps must be >= 2"):
        pipe.edit([image], "Stain this tile.", steps=1, max_analysis_tokens=4)
    with pytest.raises(ValueError, match="steps must be >= 2"):
        pipe.generate_image("A knee MRI.", height=32, width=32, steps=1, think=True, max_think_tokens=4)
    assert work == []


def test_understanding_only_model_refuses_generation(fixture_a, pipe):
    understanding = UniMedVLPipeline.from_pretrained(fixture_a, dtype="fp32", visual_gen=False)
    assert not hasattr(understanding.model, "vae_model") and not hasattr(understanding.model, "llm2vae")
    got = understanding.ask([], "Hello?", max_new_tokens=8, temperature=0)
    want = pipe.ask([], "Hello?", max_new_tokens=8, temperature=0)  # the full model answers alike
    assert got.token_ids and got.token_ids == want.token_ids and got.finished == want.finished
    assert not any("_moe_gen" in name for name, _ in understanding.model.named_parameters())
    with pytest.raises(RuntimeError, match=r"visual_gen=False.*no generation expert"):
        understanding.generate_image("x", height=32, width=32)
    with pytest.raises(RuntimeError, match=r"visual_gen=False.*no generation expert"):
        understanding.edit([Image.new("RGB", (32, 32))], "x")
