"""The 14B shape on this machine: understanding in bf16, int8 quantised loading and generation.

    python benchmarks/scale.py --preset unimedvl-14b                  # all phases
    python benchmarks/scale.py --preset unimedvl-14b --phases a,d     # some of them
    python benchmarks/scale.py --preset small --cache /tmp/scale      # the same pipeline in minutes

A random checkpoint of the preset's shape is written once in the official layout under ``--cache``
(default ``.cache/scale/<preset>``, ignored by git): ``ema.safetensors`` in bf16 (29.2 GB for
``unimedvl-14b``), streamed tensor by tensor (:func:`unimedvl.formats.safetensors_stream`), each
tensor drawn from its own seed so the file is the same on every machine; a full-size FLUX-shaped
``ae.safetensors`` (fp32); configs; the test tokenizer of ``../shared/fixtures`` (its ids fit
the 152,064-row embedding).  ``scale_checkpoint.json``, written last, marks it complete; a
checkpoint with that marker is reused.  Before writing, free disk is checked against what the
checkpoint and the int8 copy of phase (c) need.

Each phase runs in a fresh process (``--child``), so its peak RSS (``VmHWM``) is its own:

* (a) ``understand``: understanding-only (``visual_gen=False``) bf16 load, then a question about a
  real DICOM (pydicom's ``CT_small.dcm``: the VQA transform makes it 729 ViT patches) and 16
  new tokens;
* (b) ``quantize_on_load``: the whole model (both experts, autoencoder) quantised to int8 while loading;
* (c) ``quantize_command`` then ``prequantized_load``: ``unimedvl quantize --scheme int8`` writes a
  pre-quantised copy, which a fresh process loads;
* (d) ``generate_step``: on that int8 model, one guided 256x256 denoising step (text-conditioned
  and unconditioned branches in one packed forward) and the autoencoder decode of a 256x256 latent
  (``--sizes 256,512,1024``: also at those sides, each in its own process);
* (e) phase (a) again, understanding-only, on the int8 copy;
* (f) phase (a) with int4 weights quantised while loading.

Floors are measured in the same run, in their own process: streaming read bandwidth (sum over a
1 GiB buffer, best of several) and dense matmul throughput at bf16 and fp32.  Decoding reads every
weight of the understanding path once per token, so its floor is those bytes / bandwidth; the
denoising step's floor is its matmul FLOPs / bf16 matmul throughput.  Ratios are ours / floor.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "official_tiny_a"
QUESTION = "Which imaging modality is shown, and which part of the body?"  # 20 tokens with the test tokenizer
NEW_TOKENS = 16
MARKER = "scale_checkpoint.json"
GB = 1e9


# ---- process measurements ---------------------------------------------------------------------


def status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def meminfo_mb(field: str) -> float:
    for line in open("/proc/meminfo"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def swap_used_mb() -> float:
    return meminfo_mb("SwapTotal") - meminfo_mb("SwapFree")


# ---- the random checkpoint --------------------------------------------------------------------


def checkpoint_bytes(config) -> tuple[int, int]:
    """(bytes of ``ema.safetensors`` in bf16, bytes of ``ae.safetensors`` in fp32)."""
    from unimedvl.formats.checkpoint import official_manifest

    manifest = official_manifest(config)
    return 2 * manifest["ema_params"], 4 * manifest["ae_params"]


def random_tensor(key: str, shape: tuple[int, ...], dtype, seed: int):
    """Tensor ``key`` of the random checkpoint: its own generator, so the bytes do not depend on order.
    Norm scales are ones, other vectors (biases) zeros, matrices ``N(0, 1/fan_in)``, which keeps
    activations in range through 28 layers."""
    import torch

    if len(shape) == 1:
        return (torch.ones if "norm" in key else torch.zeros)(shape, dtype=dtype)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    g = torch.Generator().manual_seed(seed ^ zlib.crc32(key.encode()))
    return torch.empty(shape).normal_(0.0, fan_in**-0.5, generator=g).to(dtype)


def ensure_checkpoint(preset: str, directory: Path, seed: int, reserve_bytes: int) -> dict:
    """Write the random checkpoint of ``preset`` into ``directory`` unless a complete one is there."""
    import torch

    from unimedvl import UniMedVLConfig
    from unimedvl.formats.checkpoint import AE_WEIGHTS, PATCH_EMBED_KEY, official_manifest, write_config
    from unimedvl.formats.safetensors_stream import write_safetensors_stream
    from unimedvl.tokenizer import Tokenizer

    wanted = {"preset": preset, "seed": seed, "format": 1}
    marker = directory / MARKER
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if {k: recorded.get(k) for k in wanted} == wanted:
            return {"reused": True, **recorded}
        raise SystemExit(f"{directory} holds a different benchmark checkpoint ({recorded}); remove it or pass another --cache")
    config = UniMedVLConfig.from_preset(preset)
    ema_bytes, ae_bytes = checkpoint_bytes(config)
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    need = ema_bytes + ae_bytes + reserve_bytes
    if free < need:
        raise SystemExit(
            f"not enough disk for the {preset} benchmark under {directory}: it needs {need / GB:.1f} GB "
            f"({ema_bytes / GB:.1f} GB checkpoint + {ae_bytes / GB:.2f} GB autoencoder + {reserve_bytes / GB:.1f} GB for the "
            f"int8 copy), the disk has {free / GB:.1f} GB free; free space or pass --cache on a larger disk"
        )
    manifest = official_manifest(config)
    vit = config.vit
    conv_patch = (vit.hidden_size, 3, vit.patch_size, vit.patch_size)  # the official SigLIP conv layout
    ema_specs = [(k, torch.bfloat16, conv_patch if k == PATCH_EMBED_KEY else tuple(s)) for k, s in manifest["ema"].items()]
    ae_specs = [(k, torch.float32, tuple(s)) for k, s in manifest["ae"].items()]
    shapes = {k: s for k, _, s in ema_specs + ae_specs}
    from tqdm import tqdm

    t0 = time.perf_counter()
    for name, specs in (("ema.safetensors", ema_specs), (AE_WEIGHTS, ae_specs)):
        dtypes = {k: d for k, d, _ in specs}
        sizes = {k: torch.Size(s).numel() * d.itemsize for k, d, s in specs}  # bytes per tensor
        with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc=f"writing {name}", file=sys.stderr) as bar:

            def produce(key, dtypes=dtypes):
                return random_tensor(key, shapes[key], dtypes[key], seed)

            write_safetensors_stream(directory / name, specs, produce, on_tensor=lambda k, sizes=sizes: bar.update(sizes[k]))
    tokenizer = Tokenizer(FIXTURE)
    tokenizer.save(directory)
    write_config(config, directory, (tokenizer.special.bos, tokenizer.special.eos))
    record = {**wanted, "ema_params": manifest["ema_params"], "ae_params": manifest["ae_params"],
              "ema_bytes": (directory / "ema.safetensors").stat().st_size, "ae_bytes": (directory / AE_WEIGHTS).stat().st_size,
              "write_s": round(time.perf_counter() - t0, 1)}
    marker.write_text(json.dumps(record, indent=1))
    return {"reused": False, **record}


# ---- floors -----------------------------------------------------------------------------------


def measure_floors(threads: int) -> dict:
    """Streaming read bandwidth (the best of two pure-read kernels over 1 GiB, each byte read once:
    a float32 sum and a bf16 matrix-vector product) and dense matmul throughput."""
    import torch

    torch.set_num_threads(threads)

    def best_s(fn, repeats: int = 7) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    buf = torch.empty(2**28, dtype=torch.float32).uniform_()  # 1 GiB, far larger than any cache
    sum_bw = buf.nbytes / best_s(buf.sum)
    matrix = buf.view(torch.bfloat16).view(2**15, 2**14)  # the same 1 GiB read as bf16 [32768, 16384]
    vector = torch.randn(2**14, dtype=torch.bfloat16)
    mv_bw = matrix.nbytes / best_s(lambda: torch.mv(matrix, vector))
    del buf, matrix
    out = {"read_bandwidth_gb_s": round(max(sum_bw, mv_bw) / GB, 2),
           "read_bandwidth_sum_fp32_gb_s": round(sum_bw / GB, 2), "read_bandwidth_mv_bf16_gb_s": round(mv_bw / GB, 2)}
    from unimedvl.precision import CPU_HAS_BF16_UNITS

    out["cpu_bf16_units"] = CPU_HAS_BF16_UNITS
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        # the shape of a decoder MLP matmul over a 512-token block: [512, 3584] x [3584, 4096];
        # torch's own bf16 kernel on a CPU without bf16 units runs at well under 1 GFLOP/s, where
        # that product would take a minute a call: there 32 rows, timed once, give the throughput
        rows, repeats = (32, 1) if dtype == torch.bfloat16 and not CPU_HAS_BF16_UNITS else (512, 5)
        a, b = torch.randn(rows, 3584, dtype=dtype), torch.randn(3584, 4096, dtype=dtype)
        out[f"matmul_{name}_gflops"] = round(2 * rows * 3584 * 4096 / best_s(lambda: a @ b, repeats) / 1e9, 1)
    return out


# ---- FLOP and byte counts ---------------------------------------------------------------------


def understanding_bytes_per_token(model) -> int:
    """Bytes a decoded token reads: every decoder weight of the understanding expert, the final
    norm and the LM head (the embedding reads one row; the ViT and the generation path none)."""
    total = 0
    for key, t in model.state_dict().items():
        if key.startswith("language_model.") and "_moe_gen" not in key and "embed_tokens" not in key:
            total += t.numel() * t.element_size()
    return total


def guided_step_flops(config, context_lengths: list[int], tokens: int) -> float:
    """Matmul FLOPs of one denoising step: ``tokens`` latent tokens per branch through the
    generation expert, the latent adapters and attention over each branch's context + block."""
    from unimedvl.training.flops import decoder_weights_per_token

    llm = config.llm
    adapters = 2 * config.patch_latent_dim * llm.hidden_size  # vae2llm + llm2vae
    linear = 2 * (decoder_weights_per_token(config) + adapters) * tokens * len(context_lengths)
    attention = sum(4 * llm.num_layers * llm.num_heads * llm.head_dim * tokens * (n + tokens) for n in context_lengths)
    return float(linear + attention)


def prefill_flops(config, vit_patches: int, tokens: int) -> float:
    """Matmul FLOPs of a prefill: ``vit_patches`` through the ViT and connector, then all ``tokens``
    of the context (the image's included) through the understanding expert."""
    from unimedvl.training.flops import decoder_weights_per_token, vit_weights_per_patch

    llm, vit = config.llm, config.vit
    linear = 2 * (vit_weights_per_patch(config) * vit_patches + decoder_weights_per_token(config) * tokens)
    attention = 4 * (llm.num_layers * llm.num_heads * llm.head_dim * tokens * tokens
                     + vit.num_layers * vit.hidden_size * vit_patches * vit_patches)
    return float(linear + attention)


# ---- phases (each in a fresh process) ---------------------------------------------------------


def _weights_mb(model) -> float:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20


def _no_eos_engine(engine):
    from unimedvl.inference.engine import Engine
    from unimedvl.tokenizer import SpecialTokens

    sp = engine.special  # decoding never stops early: its end token is an id the model cannot produce
    return Engine(engine.model, SpecialTokens(sp.bos, -1, sp.start_of_image, sp.end_of_image))


def phase_understand(model_dir: Path, dicom: str, quantize: str | None = None) -> dict:
    """Understanding-only load (bf16; int8 when ``model_dir`` is pre-quantised; ``quantize``: that
    scheme, quantised while loading) and one question."""
    import torch

    from unimedvl.inference.engine import Sampler
    from unimedvl.inference.pipeline import UniMedVLPipeline

    before = status_mb("VmRSS")
    t = time.perf_counter()
    pipe = UniMedVLPipeline.from_pretrained(model_dir, dtype=torch.bfloat16, visual_gen=False, quantize=quantize)
    out = {"load_s": round(time.perf_counter() - t, 2), "load_peak_rss_rise_mb": round(status_mb("VmHWM") - before, 1),
           "weights_mb": round(_weights_mb(pipe.model), 1),
           "generation_expert_loaded": any("_moe_gen" in k for k in pipe.model.state_dict())}
    t = time.perf_counter()
    pipe.chat().add_user(QUESTION, [dicom])  # the first question pages the weights in from the file
    out["first_prefill_s"] = round(time.perf_counter() - t, 3)
    conv = pipe.chat()
    t = time.perf_counter()
    ctx = conv.add_user(QUESTION, [dicom])  # reads the DICOM, ViT, connector, decoder prefill
    out["prefill_s"] = round(time.perf_counter() - t, 3)
    out["context_tokens"] = ctx.length
    (image, _meta), = pipe.load_images(dicom)
    pixels = pipe.transform("understanding_vit")(image)  # [3, h, w]
    out["vit_patches"] = pixels.shape[1] * pixels.shape[2] // pipe.model.config.vit.patch_size**2
    out["question_tokens"] = len(pipe.tokenizer.encode(QUESTION))
    stream = _no_eos_engine(pipe.engine).stream_text(ctx, NEW_TOKENS + 1, sampler=Sampler())  # <|im_start|> + 16
    times = []
    t = time.perf_counter()
    for _ in stream:
        now = time.perf_counter()
        times.append(now - t)
        t = now
    out["new_tokens"] = len(stream.ids)
    out["decode_ms_per_token"] = round(1000 * statistics.median(times[1:]), 1)  # the first includes <|im_start|>
    out["ask_s"] = round(out["prefill_s"] + sum(times), 2)
    out["bytes_per_token"] = understanding_bytes_per_token(pipe.model)
    out["peak_rss_mb"] = round(status_mb("VmHWM"), 1)
    return out


def phase_quantize_on_load(model_dir: Path) -> dict:
    import torch

    from unimedvl import load_pretrained

    before = status_mb("VmRSS")
    t = time.perf_counter()
    model, _ = load_pretrained(model_dir, dtype=torch.bfloat16, quantize="int8")
    load_s = time.perf_counter() - t
    rise = status_mb("VmHWM") - before
    weights = _weights_mb(model)
    return {"load_s": round(load_s, 1), "load_peak_rss_rise_mb": round(rise, 1), "quantized_weights_mb": round(weights, 1),
            "rise_over_quantized_weights": round(rise / weights, 3), "peak_rss_mb": round(status_mb("VmHWM"), 1)}


def phase_prequantized_load(quantized_dir: Path) -> dict:
    import torch

    from unimedvl import load_pretrained

    before = status_mb("VmRSS")
    t = time.perf_counter()
    model, _ = load_pretrained(quantized_dir, dtype=torch.bfloat16)
    load_s = time.perf_counter() - t
    load_rise = status_mb("VmHWM") - before
    with torch.no_grad():  # page in every weight, as a first forward would
        for v in model.state_dict().values():
            v.float().sum() if v.dtype == torch.int8 else v.sum()
    return {"load_s": round(load_s, 2), "load_peak_rss_rise_mb": round(load_rise, 1),
            "peak_rss_rise_after_touching_weights_mb": round(status_mb("VmHWM") - before, 1),
            "quantized_weights_mb": round(_weights_mb(model), 1), "peak_rss_mb": round(status_mb("VmHWM"), 1)}


def phase_generate_step(quantized_dir: Path, side: int) -> dict:
    import torch

    from unimedvl.inference.pipeline import UniMedVLPipeline
    from unimedvl.inference.sampling import DenoisingQuery

    t = time.perf_counter()
    pipe = UniMedVLPipeline.from_pretrained(quantized_dir, dtype=torch.bfloat16)
    out = {"load_s": round(time.perf_counter() - t, 2)}
    engine, cfg = pipe.engine, pipe.model.config
    grid = engine.latent_grid(side, side)  # 16 x 16 latent tokens at 256 x 256
    text_ctx = engine.new_context()
    engine.add_text(text_ctx, pipe.tokenizer.encode("An axial CT of the chest with a small nodule in the right upper lobe."))
    empty = engine.new_context()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(grid[0] * grid[1], cfg.patch_latent_dim, generator=g)
    query = DenoisingQuery(engine, [text_ctx, empty], grid)
    times = []
    with torch.no_grad():
        for _ in range(3 if side <= 256 else 2):  # the first includes one-time work (kernel choice, page-in)
            t = time.perf_counter()
            query(x, 0.8)
            times.append(time.perf_counter() - t)
        out["first_step_s"] = round(times[0], 2)
        out["guided_step_s"] = round(statistics.median(times[1:]), 3)
        out["step_flops"] = guided_step_flops(cfg, [text_ctx.length, empty.length], grid[0] * grid[1])
        t = time.perf_counter()
        image = engine.decode_latents(x, grid)
        out["ae_decode_s"] = round(time.perf_counter() - t, 2)
    out["decoded_shape"] = list(image.shape)
    out["peak_rss_mb"] = round(status_mb("VmHWM"), 1)
    return out


def run_child(phase: str, args: list[str], threads: int) -> dict:
    """Run ``phase`` in a fresh interpreter; its JSON plus wall time and swap use around it."""
    swap_before = swap_used_mb()
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", phase, "--threads", str(threads), *args],
                          stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"error": f"phase {phase} exited with {proc.returncode}", "wall_s": round(wall, 1)}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(wall, 1)
    result["swap_growth_mb"] = round(swap_used_mb() - swap_before, 1)
    return result


def run_quantize_command(model_dir: Path, out_dir: Path) -> dict:
    """``unimedvl quantize`` as a user runs it; its peak RSS from the kernel's accounting of the child."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cli = Path(sys.executable).with_name("unimedvl")
    command = [str(cli)] if cli.is_file() else [sys.executable, "-m", "unimedvl.cli"]
    t = time.perf_counter()
    proc = subprocess.Popen([*command, "quantize", "--model", str(model_dir), "--out", str(out_dir), "--scheme", "int8"],
                            stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if status != 0:
        return {"error": f"unimedvl quantize exited with status {status}"}
    size = sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "written_gb": round(size / GB, 2)}


def child_main(phase: str, model: Path, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    import safetensors.torch  # noqa: F401  (imports before the baselines)

    import unimedvl  # noqa: F401

    if phase == "floors":
        result = measure_floors(threads)
    elif phase.startswith("understand"):  # understand, understand_int4 (quantised while loading)
        from pydicom.data import get_testdata_file

        result = phase_understand(model, get_testdata_file("CT_small.dcm"), phase.partition("_")[2] or None)
    elif phase == "quantize_on_load":
        result = phase_quantize_on_load(model)
    elif phase == "prequantized_load":
        result = phase_prequantized_load(model)
    elif phase.startswith("generate_step_"):
        result = phase_generate_step(model, int(phase.removeprefix("generate_step_")))
    else:
        raise SystemExit(f"unknown phase {phase}")
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="unimedvl-14b")
    ap.add_argument("--cache", type=Path, help="where the random checkpoint lives (default .cache/scale/<preset>)")
    ap.add_argument("--phases", default="a,b,c,d,e,f", help="comma-separated subset of a,b,c,d,e,f")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", default="256", help="image sides of phase (d), each in its own process (e.g. 256,512,1024)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args.child, args.model, args.threads)
        return

    phases = set(args.phases.split(","))
    if not phases <= set("abcdef"):
        raise SystemExit(f"--phases takes a comma-separated subset of a,b,c,d,e,f, got {args.phases!r}")
    base = args.cache or REPO / ".cache" / "scale" / args.preset
    model_dir, quantized_dir = base / "bf16", base / "int8"
    from unimedvl import UniMedVLConfig

    ema_bytes, _ = checkpoint_bytes(UniMedVLConfig.from_preset(args.preset))
    reserve = int(0.55 * ema_bytes) if phases & {"c", "d", "e"} else 0  # the int8 copy: about half the bf16 file
    result: dict = {"preset": args.preset, "threads": args.threads,
                    "machine": {"cpus": os.cpu_count(), "memory_gb": round(meminfo_mb("MemTotal") / 1024, 1),
                                "swap_gb": round(meminfo_mb("SwapTotal") / 1024, 1)}}
    result["checkpoint"] = ensure_checkpoint(args.preset, model_dir, args.seed, reserve)
    floors = run_child("floors", [], args.threads)
    result["floors"] = floors
    bandwidth = floors["read_bandwidth_gb_s"] * GB
    bf16_flops = floors["matmul_bf16_gflops"] * 1e9

    cfg = UniMedVLConfig.from_preset(args.preset)

    def understand(directory: Path, phase: str = "understand") -> dict:
        a = run_child(phase, ["--model", str(directory)], args.threads)
        if "error" not in a:
            a["decode_bytes_floor_ms"] = round(1000 * a["bytes_per_token"] / bandwidth, 1)
            a["decode_over_bytes_floor"] = round(a["decode_ms_per_token"] / a["decode_bytes_floor_ms"], 3)
            flops = prefill_flops(cfg, a["vit_patches"], a["context_tokens"])  # patches pass the decoder too
            a["prefill_flops_floor_s"] = round(flops / bf16_flops, 4)
            a["prefill_over_flops_floor"] = round(a["prefill_s"] / a["prefill_flops_floor_s"], 3)
        return a

    if "a" in phases:
        result["a_understand_bf16"] = understand(model_dir)
    if "b" in phases:
        result["b_quantize_on_load_int8"] = run_child("quantize_on_load", ["--model", str(model_dir)], args.threads)
    if "c" in phases or (phases & {"d", "e"} and not (quantized_dir / "quantization.json").is_file()):
        result["c_quantize_command"] = run_quantize_command(model_dir, quantized_dir)
        result["c_prequantized_load"] = run_child("prequantized_load", ["--model", str(quantized_dir)], args.threads)
    if "e" in phases:
        result["e_understand_int8"] = understand(quantized_dir)
    if "f" in phases:
        result["f_understand_int4_quantized_on_load"] = understand(model_dir, "understand_int4")
    for side in (int(v) for v in args.sizes.split(",")) if "d" in phases else ():
        d = run_child(f"generate_step_{side}", ["--model", str(quantized_dir)], args.threads)
        if "error" not in d:
            d["step_flops_floor_s"] = round(d["step_flops"] / bf16_flops, 4)
            d["step_over_flops_floor"] = round(d["guided_step_s"] / d["step_flops_floor_s"], 3)
        result["d_generate_step_int8" + ("" if side == 256 else f"_{side}")] = d
    peaks = [v.get("peak_rss_mb", 0) for v in result.values() if isinstance(v, dict)]
    result["max_phase_peak_rss_gb"] = round(max(peaks) / 1024, 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
