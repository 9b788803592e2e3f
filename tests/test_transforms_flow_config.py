"""Image transforms, guidance maths, configs and tokenizer rules that the official scripts fix."""

import pytest
import torch
from PIL import Image

from unimedvl.config import ConfigError, UniMedVLConfig
from unimedvl.flow import GuidanceConfig, combine_guidance, euler_step, sampling_timesteps
from unimedvl.image_transforms import GEN_VAE, GEN_VIT, VQA_VIT, ImageTransform, normalize_u8, to_rgb, to_uint8_image
from unimedvl.model.layers import sincos_2d_table, timestep_frequencies
from unimedvl.tokenizer import Tokenizer


@pytest.mark.parametrize(
    "transform,size,expected",
    [
        (VQA_VIT, (256, 256), (378, 378)),  # upscaled to the minimum side, snapped to 14
        (GEN_VIT, (256, 256), (392, 392)),  # 387 is not a multiple of 14: round(27.64)*14
        (GEN_VAE, (200, 150), (192, 144)),  # round(12.5) = 12: Python's half-to-even
        (GEN_VAE, (3000, 1000), (1024, 336)),  # long side capped at 1024
        (ImageTransform(980, 224, 14), (100, 2000), (56, 980)),  # min side first, then capped: round(3.5) = 4 patches
    ],
)
def test_resize_rule(transform, size, expected):
    assert transform.target_size(*size) == expected


def test_max_pixels_branch_uses_the_area_ratio_as_a_linear_factor():
    # 992x992 exceeds a 500,000-pixel budget: each side is scaled by the *area* ratio 0.508
    # (a linear ratio would give 704); 504 px then snaps to 512
    t = ImageTransform(1024, 16, 16, max_pixels=500_000)
    assert t.target_size(1000, 1000) == (512, 512)


def test_transparent_images_are_composited_on_white_and_normalised():
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    rgb = to_rgb(rgba)
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    x = VQA_VIT(rgb)
    assert x.shape == (3, 378, 378) and float(x.min()) == 1.0
    assert torch.equal(normalize_u8(to_uint8_image(x)), x)


def test_uint8_conversion_truncates():
    pixels = torch.tensor([0.999, -1.5, 2.0]).reshape(3, 1, 1)
    assert to_uint8_image(pixels).reshape(-1).tolist() == [254, 0, 255]  # (0.9995*255 = 254.87 -> 254)


def test_schedule_matches_the_reference_steps():
    ts = sampling_timesteps(5, 3.0)
    torch.testing.assert_close(ts[:-1], torch.tensor([1.0, 0.9, 0.75, 0.5]))
    assert float(ts[-1]) == 0.0
    assert sampling_timesteps(50, 1.0).shape == (50,)


def test_guidance_interval_is_open_below_and_closed_above():
    g = GuidanceConfig(4.0, 2.0, (0.4, 1.0))
    assert g.scales_at(1.0) == (4.0, 2.0) and g.scales_at(0.4) == (1.0, 1.0) and g.scales_at(0.41) == (4.0, 2.0)


def test_guidance_combination_rules():
    g = torch.Generator().manual_seed(0)
    vc, vt, vi = (torch.randn(8, 4, generator=g) for _ in range(3))
    # no text guidance -> no guidance at all, even with an image scale
    assert torch.equal(combine_guidance(vc, vt, vi, 1.0, 2.0), vc)
    # renorm_min 1 keeps the raw guided velocity only if its norm is below v_cond's; ratio clamps to <= 1
    raw = vt + 4.0 * (vc - vt)
    out = combine_guidance(vc, vt, None, 4.0, 1.0, "global", 0.0)
    torch.testing.assert_close(out.norm(), vc.norm())
    torch.testing.assert_close(out / out.norm(), raw / raw.norm())
    per_token = combine_guidance(vc, vt, None, 4.0, 1.0, "channel", 0.0)
    torch.testing.assert_close(per_token.norm(dim=-1), torch.minimum(vc.norm(dim=-1), raw.norm(dim=-1)))
    # text_channel: renorm after text guidance, none after image guidance
    tc = combine_guidance(vc, vt, vi, 4.0, 2.0, "text_channel", 0.0)
    renormed = raw * (vc.norm(dim=-1, keepdim=True) / (raw.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0, 1)
    torch.testing.assert_close(tc, vi + 2.0 * (renormed - vi))
    with pytest.raises(ValueError, match="cfg_renorm_type"):
        GuidanceConfig(cfg_renorm_type="per_pixel")


def test_euler_step_moves_toward_data():
    x0, eps = torch.zeros(2, 3), torch.ones(2, 3)
    t, t_next = torch.tensor(0.75), torch.tensor(0.5)
    x_t = (1 - t) * x0 + t * eps
    torch.testing.assert_close(euler_step(x_t, eps - x0, t, t_next), (1 - t_next) * x0 + t_next * eps)


def test_sincos_table_column_first_then_row():
    table = sincos_2d_table(4, 8)  # width 8: 2 frequencies per sin/cos half
    row, col = 2, 3
    v = table[row * 4 + col]
    torch.testing.assert_close(v[:4], torch.tensor([torch.sin(torch.tensor(3.0)), torch.sin(torch.tensor(0.03)),
                                                    torch.cos(torch.tensor(3.0)), torch.cos(torch.tensor(0.03))]))
    torch.testing.assert_close(v[4:6], torch.tensor([torch.sin(torch.tensor(2.0)), torch.sin(torch.tensor(0.02))]))


def test_timestep_features_put_cosines_first():
    f = timestep_frequencies(torch.tensor([0.0, 0.5]))
    assert f.shape == (2, 256)
    assert torch.equal(f[0, :128], torch.ones(128)) and torch.equal(f[0, 128:], torch.zeros(128))
    torch.testing.assert_close(f[1, 0], torch.cos(torch.tensor(0.5)))


def test_presets_and_overrides():
    cfg = UniMedVLConfig.from_preset("tiny", llm={"num_layers": 1})
    assert cfg.llm.num_layers == 1 and UniMedVLConfig.from_preset("tiny").llm.num_layers == 2
    assert UniMedVLConfig.from_preset("unimedvl-14b").latent_downsample == 16
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        UniMedVLConfig.from_preset("huge")
    with pytest.raises(ConfigError, match="llm.num_layer"):
        UniMedVLConfig.from_preset("tiny", llm={"num_layer": 1})
    with pytest.raises(ConfigError, match="not divisible by llm.num_kv_heads"):
        UniMedVLConfig.from_preset("tiny", llm={"num_kv_heads": 3})


def test_tokenizer_wraps_segments_and_decodes_like_the_reference(fixture_a):
    tok = Tokenizer(fixture_a)
    ids = tok.encode_segment("chest X-ray")
    assert ids[0] == tok.special.bos == 1501 and ids[-1] == tok.special.eos == 1502
    assert tok.special.start_of_image == 1503 and tok.special.end_of_image == 1504 and tok.num_added_tokens == 0
    generated = [tok.special.bos, *tok.encode(" normal lungs"), tok.special.eos, *tok.encode(" junk")]
    assert tok.decode_generation(generated) == " normal lungs"


def test_missing_special_tokens_are_added_as_the_official_loader_does(tmp_path, fixture_a):
    import json
    import shutil

    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(fixture_a / name, tmp_path / name)
    cfg = json.loads((fixture_a / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {"1500": cfg["added_tokens_decoder"]["1500"]}  # keep only <|endoftext|>
    cfg["additional_special_tokens"] = []
    cfg["eos_token"] = "<|endoftext|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer(tmp_path)
    assert tok.num_added_tokens == 4 and len(tok) == 1505
    assert tok.special == type(tok.special)(1501, 1502, 1503, 1504)
    assert tok.hf.convert_tokens_to_ids("<|vision_start|>") == 1503 and 1503 not in tok.encode("<|vision_start|>")  # text stays text
