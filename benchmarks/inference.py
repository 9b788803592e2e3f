"""Inference speed and memory: prefill, decoding, denoising steps, text-to-image, the autoencoder.

    python benchmarks/inference.py                         # a random `small`-like checkpoint, fp32, 2 threads
    python benchmarks/inference.py --model DIR --dtype bf16 --threads 16

Prints one JSON object (medians over ``--repeats``).  Without ``--model`` a random checkpoint with
the `small` preset's shapes (LLM 512 x 8 layers, ViT 384 x 6 layers, the full FLUX autoencoder) is
written to a temporary folder first, in a child process so that this process's memory figures
only see the load.  Its vocabulary is ``--vocab`` (default 1505, the fixture tokenizer's): with
Qwen's 152,064 rows the fp32 LM head alone reads 311 MB per decoded token and dominates decoding.

Alongside our figures the JSON carries ``baseline_*`` figures measured in the same run with the
straightforward approach (a packed batch built for every decoded token; guidance branches as
separate forwards) and the reference implementation's figures quoted for this configuration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from step_cache import step_floor, timed  # beside this file: a script's folder is on sys.path

REFERENCE_SMALL_FP32 = {  # the reference implementation, replayed on a 2-core CPU at this config
    "prefill_ms": 488.0,
    "decode_ms_per_token": 17.7,
    "step_ms_cfg": 281.0,
    "step_ms_nocfg": 154.0,
    "vae_decode_ms": 4000.0,
    "peak_rss_mb": 1360.0,
}

WRITE_CHECKPOINT = r"""
import sys, torch
from unimedvl import UniMedVL, UniMedVLConfig, save_pretrained
cfg = UniMedVLConfig.from_preset("small", llm={"vocab_size": int(sys.argv[2])})
model = UniMedVL.from_config(cfg, seed=0)
save_pretrained(model, sys.argv[1], dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[3]])
"""


def status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 2)


def paired_median_ms(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Medians of two functions timed alternately, so that machine noise hits both alike."""
    fn_a(), fn_b()
    a, b = [], []
    for _ in range(repeats):
        for fn, acc in ((fn_a, a), (fn_b, b)):
            t = time.perf_counter()
            fn()
            acc.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(a), 2), round(statistics.median(b), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: a random small-like checkpoint)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=1505, help="vocabulary of the random checkpoint")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    tmp = None
    model_dir = args.model
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="unimedvl-bench-")
        model_dir = Path(tmp.name)
        subprocess.run([sys.executable, "-c", WRITE_CHECKPOINT, str(model_dir), str(args.vocab), args.dtype], check=True)

    import torch

    torch.set_num_threads(args.threads)
    import safetensors.torch  # noqa: F401  (imports before the baseline)
    import transformers  # noqa: F401

    from unimedvl import load_pretrained
    from unimedvl.image_transforms import VQA_VIT
    from unimedvl.inference.engine import Engine, Sampler
    from unimedvl.inference.presets import SamplerSettings, sampler_settings
    from unimedvl.inference.sampling import DenoisingQuery, sample_image, velocities
    from unimedvl.tokenizer import SpecialTokens

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    rss_before = status_mb("VmRSS")
    t0 = time.perf_counter()
    model, tokenizer = load_pretrained(model_dir, dtype=dtype, device=args.device)
    load_s = time.perf_counter() - t0
    load_rise = status_mb("VmHWM") - rss_before
    with torch.no_grad():  # touch every weight (memory-mapped weights become resident), as a first forward would
        for p in model.parameters():
            p.sum()
    touched_rise = status_mb("VmHWM") - rss_before
    weights_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    cfg = model.config
    vocab = cfg.llm.vocab_size
    if tokenizer is not None:
        sp = tokenizer.special
    else:
        sp = SpecialTokens(vocab - 4, vocab - 3, vocab - 2, vocab - 1)
    engine = Engine(model, sp)
    # for timing, decoding never stops early: its <|im_end|> is an id the model cannot produce
    decoder = Engine(model, SpecialTokens(sp.bos, -1, sp.start_of_image, sp.end_of_image))
    g = torch.Generator().manual_seed(0)
    question = torch.randint(0, vocab - 8, (20,), generator=g).tolist()
    from PIL import Image
    import numpy as np

    # a 256x256 image, like the fixture's test image: the VQA transform makes it 378x378 (729 patches)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    vit_pixels = VQA_VIT(image)
    out: dict = {
        "config": {
            "model": str(args.model) if args.model else f"random small preset, vocab {vocab}",
            "dtype": args.dtype, "threads": args.threads, "repeats": args.repeats, "device": args.device,
            "llm": f"{cfg.llm.hidden_size}x{cfg.llm.num_layers}", "vit": f"{cfg.vit.hidden_size}x{cfg.vit.num_layers}",
            "vqa_image_patches": (vit_pixels.shape[1] // cfg.vit.patch_size) * (vit_pixels.shape[2] // cfg.vit.patch_size),
        },
        "load_s": round(load_s, 2),
    }

    def prefill():
        ctx = engine.new_context()
        engine.add_vit_image(ctx, vit_pixels)
        engine.add_text(ctx, question)
        return ctx

    out["prefill_ms"] = median_ms(prefill, args.repeats)
    ctx = prefill()
    steps = 65  # <|im_start|> + 64 generated tokens

    def decode():
        stream = decoder.stream_text(ctx, steps, sampler=Sampler())
        for _ in stream:
            pass

    def decode_packed_baseline():
        work = ctx.fork()
        token = sp.bos
        for _ in range(steps):
            o = engine._update(work, lambda b: b.add_tokens([token], logits=True))
            token = int(o.logits[-1].argmax())

    ours, base = paired_median_ms(decode, decode_packed_baseline, max(2, args.repeats // 2))
    out["decode_ms_per_token"] = round(ours / steps, 2)
    out["baseline_decode_ms_per_token"] = round(base / steps, 2)

    if cfg.visual_gen:
        grid = (16, 16)  # 256x256 pixels
        text_ctx = engine.new_context()
        engine.add_text(text_ctx, question)
        empty = engine.new_context()
        x = torch.randn(256, cfg.patch_latent_dim, generator=g)
        with torch.no_grad():
            q_cfg = DenoisingQuery(engine, [text_ctx, empty], grid)
            q_plain = DenoisingQuery(engine, [text_ctx], grid)
            out["step_ms_cfg"], out["baseline_step_ms_cfg_sequential"] = paired_median_ms(
                lambda: q_cfg(x, 0.8),
                lambda: (velocities(engine, [text_ctx], x, 0.8, grid), velocities(engine, [empty], x, 0.8, grid)),
                args.repeats,
            )
            out["step_ms_nocfg"] = median_ms(lambda: q_plain(x, 0.8), args.repeats)
            # the guided step's matmul floor: its FLOPs at the throughput of its own matrix shapes
            floor = step_floor(cfg, grid[0] * grid[1], [text_ctx.length, empty.length])
            out["step_cfg_gflop"] = round(floor["flops"] / 1e9, 2)
            out["step_matmul_gflops_at_its_shapes"] = floor["matmul_gflops_at_step_shapes"]
            out["step_cfg_floor_ms"] = floor["floor_ms"]
            out["step_cfg_over_floor"] = round(out["step_ms_cfg"] / floor["floor_ms"], 3)

            def loop(cache):  # the default text-to-image preset at 50 steps, the prompt prefilled
                settings = sampler_settings("text-to-image", None, steps=50, cache=cache)
                return sample_image(engine, text_ctx, empty, text_ctx, x, grid, settings)

            (uncached, uncached_ms), (cached, cached_ms) = timed(lambda: loop("none")), timed(lambda: loop("taylorseer"))
            out["t2i_loop_50_steps"] = {"uncached_ms": round(uncached_ms), "taylorseer_ms": round(cached_ms),
                                        "speedup": round(uncached_ms / cached_ms, 2), "full_forwards": [uncached.full_steps, cached.full_steps]}

            def t2i():
                c = engine.new_context()
                engine.add_text(c, question)
                sample = sample_image(
                    engine, c, engine.new_context(), c, torch.randn(256, cfg.patch_latent_dim, generator=g), grid,
                    SamplerSettings(steps=5, timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.0, 1.0)),
                )
                engine.decode_latents(sample.latents, grid)

            out["t2i_ms"] = median_ms(t2i, max(1, args.repeats // 2), warmup=0)
            pixels = torch.rand(3, 256, 256, generator=g) * 2 - 1
            noise = torch.randn(cfg.ae.z_channels, 32, 32, generator=g)
            out["vae_encode_ms"] = median_ms(lambda: engine.encode_latents(pixels, noise), args.repeats)
            tokens, _ = engine.encode_latents(pixels, noise)
            out["vae_decode_ms"] = median_ms(lambda: engine.decode_latents(tokens, grid), args.repeats)

    out["load_peak_rss_mb"] = round(load_rise, 1)
    out["weights_mb"] = round(weights_mb, 1)
    out["load_rise_over_weights"] = round(load_rise / weights_mb, 3)
    out["rss_rise_after_touching_weights_mb"] = round(touched_rise, 1)
    out["touched_rise_over_weights"] = round(touched_rise / weights_mb, 3)
    out["peak_rss_mb"] = round(status_mb("VmHWM"), 1)
    out["decode_speedup_vs_baseline"] = round(out["baseline_decode_ms_per_token"] / out["decode_ms_per_token"], 2)
    if "step_ms_cfg" in out:
        out["cfg_step_over_baseline"] = round(out["step_ms_cfg"] / out["baseline_step_ms_cfg_sequential"], 3)
    if args.model is None and cfg.llm.hidden_size == 512:
        ref = REFERENCE_SMALL_FP32
        out["reference_small_fp32"] = ref
        out["vs_reference"] = {
            "decode_speedup": round(ref["decode_ms_per_token"] / out["decode_ms_per_token"], 2),
            "cfg_step_ratio": round(out.get("step_ms_cfg", float("nan")) / ref["step_ms_cfg"], 3),
            "nocfg_step_ratio": round(out.get("step_ms_nocfg", float("nan")) / ref["step_ms_nocfg"], 3),
            "prefill_ratio": round(out["prefill_ms"] / ref["prefill_ms"], 3),
            "vae_decode_ratio": round(out.get("vae_decode_ms", float("nan")) / ref["vae_decode_ms"], 3),
        }
    print(json.dumps(out))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
