"""Training-step throughput against the machine's own matrix-multiply peak.

    python benchmarks/train_step.py [--preset small] [--threads 2] [--steps 5] [--device cuda]
                                    [--activation-checkpointing]

Measures, in one run: the fp32 matmul peak (a large square product) and the median time of one
full training step (packed forward, CE + flow loss, backward, AdamW) on a synthetic packed batch
of an understanding sample (a 224-px image + a 40-token answer) and a generation sample
(a 256-px target + a 30-token caption).  Model FLOPs per step come from
:mod:`unimedvl.training.flops` (6 x weights x tokens through each token's own weights, plus
attention); ``fraction_of_peak`` is achieved / measured-peak FLOP/s over the whole step,
``fraction_of_peak_forward_backward`` over the network's forward and backward alone; ``phase_ms``
splits the step into batch building (including the frozen-VAE encode), forward + backward, and
the optimiser.  On a GPU (``--device cuda``) the step runs in bf16 autocast as the trainer does,
and ``mfu`` is achieved FLOP/s over the GPU's datasheet bf16 peak (``matmul_peak_gflops`` is then
the measured bf16 matmul peak).  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak_gflops(device: str = "cpu", n: int = 2048, repeats: int = 5) -> float:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if device.startswith("cuda"):
        n = 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--activation-checkpointing", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import numpy as np

    from unimedvl import UniMedVL, UniMedVLConfig
    from unimedvl.image_transforms import ImageTransform
    from unimedvl.tokenizer import SpecialTokens
    from unimedvl.training import DropoutConfig, PlanItem, build_batch, training_losses
    from unimedvl.training.flops import peak_flops, step_flops
    from unimedvl.training.parallelize import apply_activation_checkpointing

    cfg = UniMedVLConfig.from_preset(args.preset)
    model = UniMedVL.from_config(cfg, seed=0).to(args.device).train()
    if args.activation_checkpointing:  # as the trainer: recompute every decoder and ViT layer in backward
        apply_activation_checkpointing(model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda") else contextlib.nullcontext()
    for p in model.vae_model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)  # as the trainer
    v = cfg.llm.vocab_size
    special = SpecialTokens(v - 4, v - 3, v - 2, v - 1)
    rng = np.random.default_rng(0)
    plans = [
        [PlanItem("vit", pixels=rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)), PlanItem("text", ids=list(range(100, 120))),
         PlanItem("text", ids=list(range(200, 240)), loss=True)],
        [PlanItem("text", ids=list(range(300, 330))), PlanItem("vae", pixels=rng.integers(0, 255, (256, 256, 3), dtype=np.uint8), loss=True)],
    ]
    vit, vae = ImageTransform(224, 224, 14), ImageTransform(256, 256, 16)

    phases: dict[str, list[float]] = {"batch": [], "forward_backward": [], "optimizer": []}

    def step():
        t0 = time.perf_counter()
        tb = build_batch(model, plans, ["understanding", "generation"], special, generator=torch.Generator().manual_seed(0),
                         vit_transform=vit, vae_transform=vae, dropout=DropoutConfig(0, 0, 0))  # includes the frozen-VAE encode
        _sync(args.device)
        t1 = time.perf_counter()
        with autocast:
            losses = training_losses(model, tb)
        losses.total.backward()
        _sync(args.device)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(args.device)
        t3 = time.perf_counter()
        for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
            phases[name].append(dt)
        return tb

    tb = step()
    for v in phases.values():
        v.clear()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    fb_s = statistics.median(phases["forward_backward"])

    n_tokens = tb.batch.num_tokens
    n_vit = int(tb.batch.vit_patches.shape[0])
    flops = step_flops(cfg, tb.batch, int(tb.labels.numel()))
    peak = matmul_peak_gflops(args.device)
    datasheet = peak_flops(args.device)
    achieved = flops / step_s / 1e9
    achieved_fb = flops / fb_s / 1e9
    print(json.dumps({
        "preset": args.preset, "threads": args.threads, "tokens_per_step": n_tokens, "vit_patches": n_vit,
        "step_ms": round(step_s * 1000, 1), "tokens_per_s": round(n_tokens / step_s, 1),
        "model_gflop_per_step": round(flops / 1e9, 2), "achieved_gflops": round(achieved, 1),
        "matmul_peak_gflops": round(peak, 1), "fraction_of_peak": round(achieved / peak, 3),
        "phase_ms": {k: round(statistics.median(v) * 1000, 1) for k, v in phases.items()},
        "fraction_of_peak_forward_backward": round(achieved_fb / peak, 3),
        "device": args.device, "activation_checkpointing": args.activation_checkpointing,
        "mfu": round(achieved * 1e9 / datasheet, 3) if datasheet else None,
    }))


if __name__ == "__main__":
    main()
