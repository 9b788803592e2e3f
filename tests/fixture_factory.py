"""Write a fixture in the format of ``fixtures/FORMAT.md`` with other dimensions than the shared one.

Its goldens are computed with *full* packed forwards (no KV cache: every velocity and logit comes
from one forward over the whole sequence), so replaying it through the cached inference engine
also checks that the two paths agree.  Dimensions, image size (non-square), vocabulary padding,
prompts, step counts and guidance settings all differ from ``official_tiny_a``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from unimedvl.flow import GuidanceConfig, combine_guidance, euler_step, sampling_timesteps
from unimedvl.image_transforms import GEN_VAE, GEN_VIT, VQA_VIT, normalize_u8, to_uint8_image
from unimedvl.model.patching import latent_to_tokens, patchify, unpatchify
from unimedvl.model.layers import grid_position_ids
from unimedvl.model.packing import PackedBatchBuilder
from unimedvl.formats.checkpoint import save_pretrained
from unimedvl.tokenizer import Tokenizer

from conftest import random_model, tiny_config

PROMPTS = {
    "vqa": "What abnormality does this knee MRI show?",
    "t2i": "Generate an axial brain MRI with a small lesion.",
    "edit": "Turn this T2 image into a FLAIR image.",
}
T2I = {"cfg_text_scale": 3.0, "cfg_img_scale": 1.0, "cfg_interval": [0.3, 1.0], "timestep_shift": 2.0,
       "num_timesteps": 4, "cfg_renorm_min": 0.0, "cfg_renorm_type": "global", "seed": 1}
EDIT = {"cfg_text_scale": 3.0, "cfg_img_scale": 1.5, "cfg_interval": [0.0, 1.0], "timestep_shift": 2.0,
        "num_timesteps": 4, "cfg_renorm_min": 0.0, "cfg_renorm_type": "text_channel", "seed": 1}
N_NEW = 6


def _phantom(width: int, height: int) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width]
    r = ((xx - width / 2) / (width / 2.5)) ** 2 + ((yy - height / 2) / (height / 2.5)) ** 2
    img = np.stack([(r < 1) * 180 + xx % 40, (r < 0.4) * 220 + yy % 30, 255 * xx / width], -1)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_fixture(out: Path, tokenizer_dir: Path, seed: int = 11) -> Path:
    out.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, out / name)
    tok = Tokenizer(out)
    cfg = tiny_config(
        llm={"hidden_size": 96, "num_layers": 3, "num_heads": 6, "num_kv_heads": 2, "intermediate_size": 128,
             "vocab_size": (len(tok) + 63) // 64 * 64},
        vit={"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
    )
    model = random_model(cfg, seed=seed, dtype=torch.bfloat16)
    save_pretrained(model, out, tokenizer=tok)
    image = _phantom(200, 150)
    image.save(out / "test_image.png")

    special = tok.special
    ids = {k: tok.encode_segment(v) for k, v in PROMPTS.items()}
    vqa_u8 = np.asarray(VQA_VIT.resize(image))
    vae_u8 = np.asarray(GEN_VAE.resize(image))
    edit_vit_u8 = np.asarray(GEN_VIT.resize(Image.fromarray(vae_u8)))
    hw = list(vae_u8.shape[:2])
    grid = (hw[0] // 16, hw[1] // 16)
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(grid[0] * grid[1], 64, generator=g)
    tensors = {
        "inputs.vqa_vit_input_u8": torch.from_numpy(vqa_u8.copy()),
        "inputs.vqa_text_ids": torch.tensor(ids["vqa"]),
        "inputs.t2i_text_ids": torch.tensor(ids["t2i"]),
        "inputs.edit_text_ids": torch.tensor(ids["edit"]),
        "inputs.edit_vit_input_u8_0": torch.from_numpy(edit_vit_u8.copy()),
        "inputs.vae_input_u8": torch.from_numpy(vae_u8.copy()),
        "inputs.edit_vae_input_u8_0": torch.from_numpy(vae_u8.copy()),
        "inputs.flow_step_x_t": x_t,
    }
    meta = {
        "prompts": PROMPTS,
        "recipe": {
            "defaults": {"flow_step": {"t": 0.6, "cfg_text_scale": 3.0}},
            "t2i": T2I, "edit": EDIT, "t2i_hw": hw, "edit_hw": hw,
            "vqa_transform": {"max_image_size": 980, "min_image_size": 378, "image_stride": 14, "max_pixels": 2007040},
            "gen_vae_transform": [1024, 32, 16], "gen_vit_transform": [980, 387, 14],
        },
        "policies": {"fp32": {}, "bf16": {}},
        "aliases": {},
    }

    for policy, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        m = model.to(dtype)
        p = policy + "."

        def forward(build):
            b = PackedBatchBuilder(cfg, special)
            build(b)
            with torch.no_grad():
                return m(b.build())

        # vqa: greedy decoding by repeated full forwards
        vqa_px = normalize_u8(vqa_u8)
        with torch.no_grad():
            vit_out = m.vit_features(patchify(vqa_px, 14), grid_position_ids(vqa_px.shape[1] // 14, vqa_px.shape[2] // 14, 70), [vqa_px.shape[1] * vqa_px.shape[2] // 196])
            conn = m.connector(vit_out)
        greedy: list[int] = []
        for _ in range(N_NEW):
            res = forward(lambda b: (b.add_vit_image(vqa_px), b.add_tokens(ids["vqa"]), b.add_tokens([special.bos, *greedy], logits=True)))
            greedy.append(int(res.logits[-1].float().argmax()))
        logits = res.logits.float()
        top2 = logits.topk(2, dim=-1).values
        tensors.update({p + "vqa.vit_output": vit_out.float(), p + "vqa.connector_output": conn.float(),
                        p + "vqa.logits": logits, p + "vqa.logits_step0": logits[0], p + "vqa.greedy_ids": torch.tensor(greedy)})
        n_vit = vqa_px.shape[1] * vqa_px.shape[2] // 196
        meta[p + "vqa.info"] = {"kv_len_after_prefill": [n_vit + 2 + len(ids["vqa"])], "start_token_position_id": 1 + len(ids["vqa"]),
                                "top1_minus_top2_logit_margin": (top2[:, 0] - top2[:, 1]).tolist()}

        def velocity(context, x, t):
            res = forward(lambda b: (context(b), b.add_latent_image(x, grid, t, noisy=True)))
            return res.velocities.float()[-x.shape[0]:]  # the noisy block is the last latent block

        text = lambda key: (lambda b: b.add_tokens(ids[key]))  # noqa: E731
        empty = lambda b: None  # noqa: E731
        v_c, v_u = velocity(text("t2i"), x_t, 0.6), velocity(empty, x_t, 0.6)
        tensors.update({p + "flow_step.v_cond": v_c, p + "flow_step.v_uncond_text": v_u,
                        p + "flow_step.v_cfg_global": combine_guidance(v_c, v_u, None, 3.0, 1.0, "global"),
                        p + "flow_step.v_cfg_text_channel": combine_guidance(v_c, v_u, None, 3.0, 1.0, "text_channel")})
        meta[p + "flow_step.info"] = {"image_hw": hw, "t": 0.6, "cfg_text_scale": 3.0, "cfg_renorm_min": 0.0}

        def sample(exp, hyper, ctx_c, ctx_t, ctx_i, noise):
            guidance = GuidanceConfig(hyper["cfg_text_scale"], hyper["cfg_img_scale"], tuple(hyper["cfg_interval"]),
                                      hyper["cfg_renorm_type"], hyper["cfg_renorm_min"])
            ts = sampling_timesteps(hyper["num_timesteps"], hyper["timestep_shift"])
            x, vs = noise.clone(), []
            for k in range(hyper["num_timesteps"] - 1):
                st, si = guidance.scales_at(float(ts[k]))
                vc = velocity(ctx_c, x, float(ts[k]))
                vt = velocity(ctx_t, x, float(ts[k])) if st > 1 else None
                vi = velocity(ctx_i, x, float(ts[k])) if st > 1 and si > 1 else None
                v = combine_guidance(vc, vt, vi, st, si, guidance.cfg_renorm_type, guidance.cfg_renorm_min)
                vs.append(v)
                x = euler_step(x, v, ts[k], ts[k + 1])
            with torch.no_grad():
                img = m.vae_model.decode(unpatchify(x, *grid, 2)[None])[0]
            tensors.update({p + exp + ".v_per_step": torch.stack(vs), p + exp + ".final_latent": x,
                            p + exp + ".image_u8": torch.from_numpy(to_uint8_image(img))})
            meta[p + exp + ".info"] = {"image_hw": hw}

        noise = torch.randn(grid[0] * grid[1], 64, generator=g)
        tensors[p + "t2i.noise0"] = noise
        sample("t2i", T2I, text("t2i"), empty, text("t2i"), noise)

        vae_px = normalize_u8(vae_u8)
        post = torch.randn(1, 16, hw[0] // 8, hw[1] // 8, generator=g).to(dtype)
        with torch.no_grad():
            z = m.vae_model.encode(vae_px[None], post)[0]
        clean = latent_to_tokens(z.float(), *grid)
        edit_vit_px = normalize_u8(edit_vit_u8)
        images = lambda b: (b.add_latent_image(clean, grid, 0.0, noisy=False), b.add_vit_image(edit_vit_px))  # noqa: E731
        noise1 = torch.randn(grid[0] * grid[1], 64, generator=g)
        tensors.update({p + "edit.noise0": post, p + "edit.noise1": noise1})
        sample("edit", EDIT, lambda b: (images(b), b.add_tokens(ids["edit"])), images, text("edit"), noise1)

        with torch.no_grad():
            mean, logvar = m.vae_model.moments(vae_px[None])
            z = m.vae_model.encode(vae_px[None], post)
            decoded = m.vae_model.decode(z)
        tensors.update({p + "vae.encoder_moments": torch.cat([mean, logvar], 1), p + "vae.posterior_noise": post,
                        p + "vae.z": z, p + "vae.decoded": decoded, p + "vae.decoded_u8": torch.from_numpy(to_uint8_image(decoded[0]))})

    (out / "golden").mkdir()
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(out / "golden" / "reference_outputs.safetensors"))
    (out / "golden" / "reference_outputs.json").write_text(json.dumps(meta, indent=1))
    return out
