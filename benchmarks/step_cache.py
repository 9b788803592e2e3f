"""Step caching: the speed on the `small` preset and the speed/quality curve on real models.

    python benchmarks/step_cache.py                         # speed (small, 256^2, 50 steps) + the fixture's curve
    python benchmarks/step_cache.py --demo runs/demo        # + the trained demo model's curve and modality agreement

Prints one JSON object.

* ``speed``: a random `small`-preset model (fp32, in memory) making a 50-step text-to-image at
  256^2 with the default text-to-image preset: the prompt prefill, the denoising loop uncached and
  under each cache setting (full forwards run and skipped), and the autoencoder decode, each timed
  on its own; the guided and unguided denoising step beside the matmul floor of the step
  (its FLOPs / the matmul throughput measured in the same run at the step's own matrix shapes,
  and at a large square-ish shape), and where the step's time goes (``step_breakdown``: the
  products, the attention kernel, the understanding expert's rows, the rest), eager and, where a
  C++ compiler is present, compiled (``step_breakdown_compiled``, ``--compile``).  Speed only: a fresh model's velocity head is zero-initialised,
  so its images are blank (the matrix products cost the same); quality is measured on the models below.
* ``quality``: for each model (the fixture ``official_tiny_a``; the demo model with ``--demo``),
  every prompt generated at 50 steps uncached and under each cache setting from the same seed:
  PSNR / SSIM of each cached image against its uncached twin (scikit-image), and for the demo
  model the modality classifier's agreement with the prompted modality (the demo's own check).
* ``chosen``: the cache setting with the fewest full forwards whose demo agreement stays within
  one prompt of uncached and whose every image stays at >= 40 dB PSNR against its uncached twin
  (the agreement of a tiny model's classifier is coarse: it did not move even at one forward in
  five, where single images fell to 33 dB); ties go to the better worst image.  Without
  ``--demo`` the fixture's PSNR rule alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FIXTURE = REPO.parent / "shared" / "fixtures" / "official_tiny_a"
sys.path.insert(0, str(HERE))  # scale.measure_floors

# name -> a step-cache setting (unimedvl.inference.step_cache); "none" is the uncached baseline
SETTINGS: dict[str, object] = {
    "none": None,
    "taylorseer-safe": "taylorseer-safe",
    "taylorseer": "taylorseer",
    "taylorseer-fast": "taylorseer-fast",
    "reuse-i3": {"interval": 3, "order": 0, "warmup": 2},  # order 0: the last velocity reused (FORA-like)
    "order2-i3": {"interval": 3, "order": 2, "warmup": 3},
    "taylorseer-i4": {"interval": 4},
}
STEPS = 50
FIXTURE_PROMPTS = ["Frontal chest radiograph", "Axial CT image", "Axial brain MRI", "Ultrasound image",
                   "H&E-stained histopathology tile", "Colour fundus photograph", "Retinal OCT B-scan", "Endoscopic view"]


def log(msg: str) -> None:
    print(f"[step_cache {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t) * 1000


def median_ms(fn, repeats: int) -> float:
    fn()
    return round(statistics.median(timed(fn)[1] for _ in range(repeats)), 2)


# ---- the floor ---------------------------------------------------------------------------------


def step_gemms(config, n_tokens: int) -> list[tuple[int, int, int]]:
    """The ``(m, k, n)`` matrix products of one denoising forward over ``n_tokens`` latent tokens
    (every branch together), in the shapes the inference path runs them: per decoder layer of the
    generation expert the fused Q/K/V product, O, the fused gate/up product and down; and the
    latent projections in and out."""
    llm = config.llm
    h, q, kv, inter = llm.hidden_size, llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim, llm.intermediate_size
    per_layer = [(n_tokens, h, q + 2 * kv), (n_tokens, q, h), (n_tokens, h, 2 * inter), (n_tokens, inter, h)]
    return per_layer * llm.num_layers + [(n_tokens, config.patch_latent_dim, h), (n_tokens, h, config.patch_latent_dim)]


def step_flops(config, n_tokens: int, context_lengths: list[int], tokens_per_branch: int) -> float:
    """Forward FLOPs of one denoising step: ``2 m k n`` per product above, and attention
    (``QK^T`` and ``AV``: ``4 x heads x head_dim x queries x keys`` per layer and branch; the keys
    are the branch's context plus its own latent block)."""
    llm = config.llm
    linear = sum(2 * m * k * n for m, k, n in step_gemms(config, n_tokens))
    attention = sum(4 * llm.num_layers * llm.num_heads * llm.head_dim * tokens_per_branch * (c + tokens_per_branch)
                    for c in context_lengths)
    return float(linear + attention)


def gemm_seconds(shapes: list[tuple[int, int, int]], repeats: int = 5) -> float:
    """The best time of the products themselves, each on its own ready operands."""
    import torch

    total = 0.0
    by_shape: dict[tuple, int] = {}
    for s in shapes:
        by_shape[s] = by_shape.get(s, 0) + 1
    for (m, k, n), count in by_shape.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        best = min(timed(lambda: a @ b)[1] for _ in range(repeats)) / 1000
        total += best * count
    return total


def step_floor(config, tokens_per_branch: int, context_lengths: list[int]) -> dict:
    """The matmul floor of a denoising step over one latent block per context (a guided step: the
    contexts are its branches): its FLOPs at the throughput measured now on its own matrix shapes."""
    n_tokens = tokens_per_branch * len(context_lengths)
    shapes = step_gemms(config, n_tokens)
    linear = sum(2 * m * k * n for m, k, n in shapes)
    flops = step_flops(config, n_tokens, context_lengths, tokens_per_branch)
    gflops = linear / gemm_seconds(shapes) / 1e9
    return {"flops": flops, "linear_flops": linear, "matmul_gflops_at_step_shapes": round(gflops, 1),
            "floor_ms": round(flops / gflops / 1e6, 1)}


def step_breakdown(model, query, x, repeats: int, floor_shapes: list[tuple[int, int, int]], flops: float) -> dict:
    """Where one guided denoising step's time goes, and the step against its floor, in interleaved
    rounds (this machine's speed drifts by tens of percent within minutes, so a floor measured a
    minute away from the step can be off by as much).  Each round times:

    * ``gemm_ms``: the generation expert's products of every layer on all query rows, with the
      model's own (fused) weights, one after another as the step runs them (``gemm_best_ms``: the
      best round);
    * ``attention_ms``: the step's attention function (``attend_contexts``: context keys joined,
      grouped query heads, torch's SDPA kernel) at the step's shapes, per layer;
    * ``understanding_rows_ms``: the understanding expert's products on its few rows (the image
      markers): the work there is reading that expert's weights;
    * ``other_ms``: the rest of the step (norms, RoPE, SiLU, residuals, copies, indexing, the
      Python and dispatch cost of every operator call), the step minus the parts above;
    * ``floor_ms``: the floor as :func:`step_floor` defines it (``flops`` at the throughput of
      ``floor_shapes``, each product on its own ready operands);
    * ``operator_calls``: top-level torch operator calls in one step (torch.profiler).

    ``step_over_floor`` is the median over the rounds of step / floor, ``bound_over_floor`` that of
    (products + attention + understanding rows) / floor: the ratio the step would reach if
    everything in ``other_ms`` cost nothing.
    """
    import torch

    from unimedvl.model.attention import attend_contexts
    from unimedvl.model.layers import linear as model_linear

    plan, lm = query.plan.attention, model.language_model.model
    rows, marker_rows = query.batch.num_tokens, query.batch.num_tokens - int(query.batch.latent_index.numel())
    cfg = model.config.llm
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, cfg.hidden_size, generator=g)
    inter = torch.randn(rows, cfg.intermediate_size, generator=g)

    def products(n: int, sfx: str):  # as the step runs them (linear: few rows go weights-first)
        for layer in lm.layers:
            attn, mlp = layer.self_attn, getattr(layer, "mlp" + sfx)
            model_linear(hidden[:n], attn.qkv[sfx].weight, attn.qkv[sfx].bias)
            model_linear(hidden[:n], getattr(attn, "o_proj" + sfx).weight)
            model_linear(hidden[:n], mlp.gate_up.weight)
            model_linear(inter[:n], mlp.down_proj.weight)

    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    lengths = [sl.stop - sl.start for sl in plan.slices]  # each branch's query rows
    aq, ak, av = (torch.randn(sum(lengths), h, d, generator=g) for h in (hq, hkv, hkv))
    contexts = [(torch.randn(hkv, c.length, d, generator=g), torch.randn(hkv, c.length, d, generator=g)) if c.length else (None, None)
                for c in plan.caches]

    def attention():  # the step's attention function (context keys joined, grouped heads, kernel)
        for _ in lm.layers:
            attend_contexts(aq, ak, av, contexts, lengths, d**-0.5)

    linear = sum(2 * m * k * n for m, k, n in floor_shapes)
    parts = {"step_ms": lambda: query(x, 0.8), "gemm_ms": lambda: products(rows, "_moe_gen"),
             "attention_ms": attention, "understanding_rows_ms": lambda: products(marker_rows, ""),
             "floor_ms": lambda: gemm_seconds(floor_shapes, repeats=1)}
    times: dict[str, list[float]] = {k: [] for k in parts}
    with torch.no_grad():
        for fn in parts.values():
            fn()  # warm
        for _ in range(repeats):  # interleaved, so that every part sees the same machine (it drifts by tens of %)
            for k, fn in parts.items():
                result, ms = timed(fn)
                times[k].append(ms if k != "floor_ms" else result * 1000 * flops / linear)
        out = {k: round(statistics.median(v), 2) for k, v in times.items()}
        out["gemm_best_ms"] = round(min(times["gemm_ms"]), 2)
        rounds = list(zip(*(times[k] for k in ("step_ms", "gemm_ms", "attention_ms", "understanding_rows_ms", "floor_ms"))))
        out["step_over_floor"] = round(statistics.median(s / f for s, _, _, _, f in rounds), 3)
        out["bound_over_floor"] = round(statistics.median((g + a + u) / f for _, g, a, u, f in rounds), 3)
        from torch.profiler import profile

        with profile() as prof:
            query(x, 0.8)
    out["other_ms"] = round(out["step_ms"] - out["gemm_ms"] - out["attention_ms"] - out["understanding_rows_ms"], 2)
    out["operator_calls"] = sum(1 for e in prof.events() if e.cpu_parent is None)
    out["shares"] = {k[:-3]: round(out[k] / out["step_ms"], 3) for k in ("gemm_ms", "attention_ms", "understanding_rows_ms", "other_ms")}
    return out


def compiled_step(model, query, x, repeats: int, floor_shapes, flops: float) -> dict | None:
    """:func:`step_breakdown` of the same step compiled (unimedvl.inference.compilation), with the
    compilation's own time; ``None`` where torch.compile has no C++ compiler here.  The model is
    left uncompiled afterwards."""
    import torch

    from unimedvl.inference.compilation import CompilationUnavailable, compile_denoising, uncompile_denoising

    try:
        compile_denoising(model)
    except CompilationUnavailable as e:
        log(f"compiled step skipped: {e}")
        return None
    lm = model.language_model.model
    compiled_layer = lm.context_query_layer
    try:
        with torch.no_grad():
            _, first_ms = timed(lambda: query(x, 0.8))  # the first step compiles (or loads the compiler's cache)
            out = step_breakdown(model, query, x, repeats, floor_shapes, flops)
            ratios = []  # compiled / eager, the two timed back to back in each round
            for _ in range(repeats):
                _, compiled_ms = timed(lambda: query(x, 0.8))
                uncompile_denoising(model)
                _, eager_ms = timed(lambda: query(x, 0.8))
                lm.context_query_layer = compiled_layer
                ratios.append(compiled_ms / eager_ms)
    finally:
        uncompile_denoising(model)
    out["compiled_over_eager"] = round(statistics.median(ratios), 3)
    out["first_step_with_compilation_s"] = round(first_ms / 1000, 1)
    log(f"compiled step breakdown: {out}")
    return out


# ---- speed on the small preset -------------------------------------------------------------------


def speed(args) -> dict:
    import torch

    from unimedvl import UniMedVL, UniMedVLConfig
    from unimedvl.inference import UniMedVLPipeline
    from unimedvl.inference.presets import sampler_settings
    from unimedvl.inference.sampling import DenoisingQuery, initial_noise, sample_image
    from unimedvl.tokenizer import Tokenizer

    cfg = UniMedVLConfig.from_preset("small", llm={"vocab_size": 1505})
    model = UniMedVL.from_config(cfg, dtype="fp32", seed=0)
    pipe = UniMedVLPipeline(model, Tokenizer(FIXTURE), name="small-random")
    engine, side = pipe.engine, 256
    grid = engine.latent_grid(side, side)
    prompt = "Axial T2-weighted brain MRI, normal study."

    def prefill():
        ctx = engine.new_context()
        engine.add_text(ctx, pipe.tokenizer.encode(prompt))
        return ctx, engine.new_context()

    out: dict = {"model": "random small preset (seed 0, vocab 1505, fp32)", "size": f"{side}x{side}", "steps": STEPS,
                 "preset": "driver (the text-to-image default)", "threads": torch.get_num_threads()}
    out["prefill_ms"] = median_ms(prefill, args.repeats)
    ctx, empty = prefill()
    noise = initial_noise(engine, grid, torch.Generator().manual_seed(0))
    # interleaved rounds, every setting once per round: the machine drifts by tens of percent
    # within a minute, so each speed-up is taken against the uncached loop of its own round
    times: dict[str, list[float]] = {name: [] for name in args.speed_settings}
    samples: dict = {}
    for r in range(args.loop_repeats):
        for name in args.speed_settings:
            settings = sampler_settings("text-to-image", None, steps=STEPS, cache=SETTINGS[name] or "none")
            samples[name], ms = timed(lambda: sample_image(engine, ctx, empty, ctx, noise, grid, settings))
            times[name].append(ms)
            log(f"speed round {r + 1}: {name} loop {ms:.0f} ms, {samples[name].full_steps} full forwards")
    loops: dict = {}
    for name in args.speed_settings:
        loops[name] = {"loop_ms": round(statistics.median(times[name]), 1), "full_forwards": samples[name].full_steps,
                       "skipped_forwards": samples[name].forecast_steps,
                       "speedup": round(statistics.median(b / t for b, t in zip(times["none"], times[name])), 3),
                       "speedup_per_round": [round(b / t, 3) for b, t in zip(times["none"], times[name])]}
    sample = samples[args.speed_settings[-1]]
    out["loops"] = loops
    out["vae_decode_ms"] = median_ms(lambda: engine.decode_latents(sample.latents, grid), max(1, args.repeats // 2))

    # one step, guided (2 branches: the driver preset's text guidance, c_I = c) and unguided, vs its floor;
    # the guided step is timed inside the breakdown's rounds, beside the parts it is made of
    x = noise.clone()
    with torch.no_grad():
        q_cfg, q_plain = DenoisingQuery(engine, [ctx, empty], grid), DenoisingQuery(engine, [ctx], grid)
        out["step_ms_unguided"] = median_ms(lambda: q_plain(x, 0.8), args.repeats)
    n = grid[0] * grid[1]
    shapes, flops = step_gemms(cfg, 2 * n), step_flops(cfg, 2 * n, [ctx.length, empty.length], n)
    out["step_breakdown"] = b = step_breakdown(model, q_cfg, x, max(args.repeats, 9), shapes, flops)
    out["step_ms_guided"] = b["step_ms"]
    compiled = compiled_step(model, q_cfg, x, max(args.repeats, 9), shapes, flops)
    if compiled is not None:
        out["step_breakdown_compiled"] = compiled
    from scale import measure_floors

    floors = measure_floors(torch.get_num_threads())
    large_floor_ms = round(flops / (floors["matmul_fp32_gflops"] * 1e9) * 1000, 1)
    linear = sum(2 * m * k * nn for m, k, nn in shapes)
    out["step_floor"] = {
        "flops_guided": flops, "linear_flops": linear,
        "matmul_gflops_at_step_shapes": round(flops / b["floor_ms"] / 1e6, 1),
        "matmul_gflops_large": floors["matmul_fp32_gflops"],
        "floor_ms_step_shapes": b["floor_ms"], "floor_ms_large_shape": large_floor_ms,
        "guided_step_over_floor": b["step_over_floor"],  # round by round (step_breakdown)
        "guided_step_compiled_over_floor": compiled["step_over_floor"] if compiled else None,
        "guided_step_over_large_shape_floor": round(b["step_ms"] / large_floor_ms, 3),
    }
    log(f"step breakdown: {out['step_breakdown']}")
    out["machine_floors"] = floors
    return out


# ---- quality ---------------------------------------------------------------------------------------


def quality(pipe, prompts: dict[str, list[str]], size: int, overrides: dict, classifier=None) -> dict:
    import numpy as np
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    images: dict[str, dict[str, list]] = {name: {} for name in SETTINGS}
    forwards: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for name, cache in SETTINGS.items():
        t = time.perf_counter()
        k = 0
        for modality, texts in sorted(prompts.items()):
            for text in texts:
                r = pipe.generate_image(text, height=size, width=size, seed=k, steps=STEPS, cache=cache or "none", **overrides)
                images[name].setdefault(modality, []).append(np.asarray(r.image.convert("RGB")))
                forwards[name] = r.full_steps
                k += 1
        seconds[name] = round(time.perf_counter() - t, 1)
        log(f"quality {pipe.name} {name}: {k} images, {seconds[name]} s")
    rows: dict = {}
    n_prompts = sum(len(v) for v in prompts.values())
    for name in SETTINGS:
        psnrs, ssims = [], []
        for modality in images[name]:
            for a, b in zip(images[name][modality], images["none"][modality]):
                if name != "none":
                    psnrs.append(float(peak_signal_noise_ratio(b, a, data_range=255)) if not np.array_equal(a, b) else float("inf"))
                    ssims.append(float(structural_similarity(b, a, data_range=255, channel_axis=2, win_size=7)))
        row = {"full_forwards": forwards[name], "of": STEPS - 1, "seconds": seconds[name]}
        if psnrs:
            finite = [p for p in psnrs if p != float("inf")]
            row.update({"psnr_mean": round(statistics.mean(finite), 2) if finite else None, "psnr_min": round(min(psnrs), 2),
                        "ssim_mean": round(statistics.mean(ssims), 4), "ssim_min": round(min(ssims), 4),
                        "psnr_per_image": [round(p, 2) for p in psnrs]})
        if classifier is not None:
            agreement, per = classifier.agreement(images[name])
            row["agreement"] = agreement
            row["agreeing_prompts"] = round(agreement * n_prompts) if agreement is not None else None
        rows[name] = row
    return {"prompts": n_prompts, "size": size, "sampler_overrides": overrides, "settings": rows}


MIN_PSNR_DB = 40.0


def choose(curve: dict, demo: bool) -> dict:
    rows = curve["settings"]
    ok = {k: v for k, v in rows.items() if k != "none" and v["psnr_min"] >= MIN_PSNR_DB}
    rule = f"fewest full forwards with every image >= {MIN_PSNR_DB:g} dB PSNR against uncached"
    if demo:
        floor = rows["none"]["agreeing_prompts"] - 1
        ok = {k: v for k, v in ok.items() if v["agreeing_prompts"] >= floor}
        rule += f" and modality agreement >= uncached - 1 prompt ({floor} of {curve['prompts']})"
    rule += "; ties: the better worst image"
    if not ok:
        return {"rule": rule, "setting": None}
    best = min(ok, key=lambda k: (ok[k]["full_forwards"], -ok[k]["psnr_min"]))
    return {"rule": rule, "setting": best, "cache": SETTINGS[best],
            **{k: ok[best].get(k) for k in ("full_forwards", "psnr_mean", "psnr_min", "ssim_mean", "agreement")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, help="a `unimedvl demo` output folder (its model/ and dataset/)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop-repeats", type=int, default=3, help="interleaved rounds of timed 50-step loops (every setting once per round)")
    ap.add_argument("--speed-settings", default="none,taylorseer-safe,taylorseer,taylorseer-fast")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    args.speed_settings = [s for s in args.speed_settings.split(",") if s]
    if "none" not in args.speed_settings or not set(args.speed_settings) <= set(SETTINGS):
        raise SystemExit(f"--speed-settings: a comma-separated subset of {','.join(SETTINGS)} including none")
    import torch

    torch.set_num_threads(args.threads)
    from unimedvl.inference import UniMedVLPipeline

    t0 = time.perf_counter()
    result: dict = {"settings": {k: v for k, v in SETTINGS.items()}}
    if not args.skip_speed:
        result["speed"] = speed(args)
    log("quality: the fixture")
    fixture = UniMedVLPipeline.from_pretrained(FIXTURE, dtype="fp32")
    result["quality"] = {"official_tiny_a": quality(fixture, {"any": FIXTURE_PROMPTS}, 32, {})}
    demo = args.demo is not None
    if demo:
        from unimedvl.demo.checks import SamplerChoice
        from unimedvl.demo.heldout import load_heldout
        from unimedvl.demo.modality_classifier import ModalityClassifier
        from unimedvl.demo.config import demo_preset

        config = demo_preset("default")
        held = load_heldout(args.demo / "dataset").limited(None, None, config.t2i_per_modality)
        classifier = ModalityClassifier(held.train_images)
        model = UniMedVLPipeline.from_pretrained(args.demo / "model", dtype="fp32")
        s = SamplerChoice()
        overrides = dict(cfg_text_scale=s.cfg_text_scale, cfg_img_scale=s.cfg_img_scale, timestep_shift=s.timestep_shift)
        log(f"quality: the demo model ({sum(len(v) for v in held.prompts.values())} held-out prompts)")
        result["quality"]["demo"] = quality(model, held.prompts, model.default_image_size, overrides, classifier)
    result["chosen"] = choose(result["quality"]["demo" if demo else "official_tiny_a"], demo)
    if demo:  # end to end on the demo model (prompt prefill, loop and decode of every image)
        q = result["quality"]["demo"]["settings"]
        result["demo_end_to_end_speedup"] = {k: round(q["none"]["seconds"] / v["seconds"], 2) for k, v in q.items()}
    result["elapsed_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(args.out)
    print(text)


if __name__ == "__main__":
    main()
