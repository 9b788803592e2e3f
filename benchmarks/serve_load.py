"""Chat throughput of the HTTP server under load: answers batched (``max_batch``) against one at a time.

    python benchmarks/serve_load.py                                   # random `small` model, 32 clients, 60 s x 3 runs
    python benchmarks/serve_load.py --model DIR --dtype bf16 --batch 16 --workloads text
    python benchmarks/serve_load.py --seconds 3 --runs 2 --clients 4 --out /tmp/serve_load.json   # a quick look

One model is loaded once: without ``--model``, a random checkpoint with the `small` preset's shapes
built in memory (seed 0, the vocabulary of the fixture tokenizer, ``--vocab``, whose tokenizer
files it is served with; weights in fp32 on a CPU unless ``--dtype`` says otherwise - the same
model and dtype policy as ``benchmarks/inference.py``).  The server runs in this process (uvicorn
in a thread on a free loopback port, web UI off, a queue large enough that nothing is refused,
a generous request timeout), started anew for each ``max_batch`` setting - 1 and ``--batch``
(default: the server's default, 16) - over the same model object.  The random model does not
stop early in practice, so its answers are ``max_tokens`` long (``completion_tokens_per_request``
shows it).

For each setting and workload, ``--runs`` equal runs: ``--clients`` concurrent clients (asyncio
and httpx in the main thread, one connection each) send requests back to back for ``--seconds``;
a request under way at the end is waited for, and the run's wall time includes that wait.
Before the runs of a workload, one request per batch slot warms the server up (not counted).

* ``text``: a question of about 20 tokens, worded a little differently in every request, greedy
  (temperature 0), ``max_tokens`` 64;
* ``image``: a VQA question about a random RGB image whose side the model's understanding
  transform keeps as it is and cuts into 27 x 27 ViT patches (378 px at a 14 px patch; the
  JSON's ``config.image.vit_patches`` is what was computed for the loaded model), ``max_tokens`` 32.

The JSON (stdout; also ``--out``, written atomically; progress goes to stderr):

* ``machine``: CPUs, torch threads, and floors measured in a child process by
  ``benchmarks/scale.py``'s ``measure_floors`` (streaming read bandwidth over 1 GiB; matmul
  GFLOP/s at bf16 and fp32);
* ``runs[setting][workload]``: per run, completion tokens/s (sum of ``usage.completion_tokens``
  over wall seconds), requests/s, p50/p99 latency of the answered requests, errors (every
  non-200, counted by status or by the client's exception name), the share of the server's
  model time spent in prefill (from ``unimedvl_prefill_seconds_total`` and
  ``unimedvl_decode_seconds_total`` in ``GET /metrics`` before and after the run; ``null`` when
  the server does not export them; ``prefill_s_per_request`` likewise), the mean number of answers
  per decoding step (``unimedvl_decode_batch_tokens_total`` / ``unimedvl_decode_steps_total``,
  when exported), the server process's RSS after the run (the clients run in a child process)
  and glibc's account of its heap (``malloc_mb``: in use, free, mapped);
* ``summary[workload]``: medians over runs; ``tokens_per_s_ratio`` = batched / one at a time;
  ``rss_growth_pct`` of each setting between runs 2 and 3 (the last two runs when there are
  fewer); ``amdahl_bound`` = 1 / (p + (1 - p) / B), the speed-up batching decode alone can give
  when a share p of the one-at-a-time server time is prefill, and ``ratio_over_bound`` (the
  image workload is the one that matters for it; above 1 means prefill itself got cheaper per
  request in the batched setting - compare ``prefill_s_per_request_median``); ``targets``:
  booleans for the text workload's ratio >= 4 and a p50 latency no worse than one at a time,
  and for every workload zero errors and RSS growth <= 2 % in both settings.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FIXTURE = REPO.parent / "shared" / "fixtures" / "official_tiny_a"  # its tokenizer: 1505 ids
sys.path.insert(0, str(REPO / "tests"))  # serving_helpers: RunningServer, free_port

WORKLOADS = {"text": 64, "image": 32}  # workload -> max_tokens
VIT_GRID = 27  # 27 x 27 = 729 ViT patches, a VQA-sized image
TOPICS = ["chest", "abdomen", "brain", "knee", "spine", "pelvis", "heart", "liver", "hand", "shoulder", "neck", "foot"]
FLOORS = ("import json, sys; sys.path.insert(0, sys.argv[1]); from scale import measure_floors; "
          "print(json.dumps(measure_floors(int(sys.argv[2]))))")
PREFILL, DECODE = "unimedvl_prefill_seconds_total", "unimedvl_decode_seconds_total"
STEPS, BATCH_TOKENS = "unimedvl_decode_steps_total", "unimedvl_decode_batch_tokens_total"  # optional: the mean decode batch


def log(msg: str) -> None:
    print(f"[serve_load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def question(client: int, n: int) -> str:
    """About 20 tokens, different in every request (client, sequence number)."""
    return f"Case {client}-{n}: which modality is shown, and which part of the {TOPICS[n % len(TOPICS)]}?"


# ---- the model and the image -------------------------------------------------------------------


def load_pipeline(args):
    from unimedvl.inference import UniMedVLPipeline

    if args.model is not None:
        return UniMedVLPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype), str(args.model)
    from unimedvl import UniMedVL, UniMedVLConfig
    from unimedvl.tokenizer import Tokenizer

    cfg = UniMedVLConfig.from_preset("small", llm={"vocab_size": args.vocab})
    model = UniMedVL.from_config(cfg, device=args.device, dtype=args.dtype, seed=0)
    tokenizer = Tokenizer(FIXTURE)
    if len(tokenizer) > args.vocab:
        raise SystemExit(f"--vocab {args.vocab} is smaller than the fixture tokenizer ({len(tokenizer)} tokens)")
    dtype = next(model.parameters()).dtype
    desc = f"random small preset (seed 0, vocab {args.vocab}, {str(dtype).removeprefix('torch.')}), tokenizer of {FIXTURE.name}"
    return UniMedVLPipeline(model, tokenizer, name="small-random"), desc


def vqa_image(pipeline, grid: int = VIT_GRID) -> tuple[str, dict]:
    """A PNG data URL of a square random image that the understanding transform turns into
    ``grid x grid`` ViT patches, and what was computed about it."""
    import numpy as np
    from PIL import Image

    transform = pipeline.transform("understanding_vit")
    patch = pipeline.model.config.vit.patch_size
    want = grid * patch

    def patches(side: int) -> tuple[int, int, int]:
        w, h = transform.target_size(side, side)
        return w, h, (w // patch) * (h // patch)

    side = want
    if patches(side)[:2] != (want, want):  # not kept as it is: the smallest side that lands there
        side = next((s for s in range(patch, 4 * transform.max_size) if patches(s)[:2] == (want, want)), want)
        if patches(side)[:2] != (want, want):
            log(f"warning: no square image becomes {grid}x{grid} patches under {transform}; sending {side} px")
    w, h, n = patches(side)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return url, {"sent_px": side, "model_px": f"{w}x{h}", "patch_px": patch, "vit_patches": n,
                 "transform": list(pipeline.model.config.transforms.understanding_vit), "png_bytes": len(buf.getvalue())}


def body(workload: str, image_url: str | None, client: int, n: int) -> bytes:
    text = {"type": "text", "text": question(client, n)}
    content = [{"type": "image_url", "image_url": {"url": image_url}}, text] if workload == "image" else [text]
    return json.dumps({"messages": [{"role": "user", "content": content}],
                       "max_tokens": WORKLOADS[workload], "temperature": 0}).encode()


# ---- load and measurements ---------------------------------------------------------------------


def scrape(url: str) -> dict[str, float] | None:
    """Every sample of ``GET /metrics``, summed over labels, by metric name."""
    import httpx

    try:
        r = httpx.get(url + "/metrics", timeout=30)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    out: dict[str, float] = {}
    for line in r.text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name.partition("{")[0]] = out.get(name.partition("{")[0], 0.0) + float(value)
        except ValueError:
            continue
    return out


async def load(url: str, workload: str, image_url: str | None, clients: int, seconds: float | None,
               requests_each: int | None, timeout_s: float) -> dict:
    """``clients`` clients sending requests back to back, each until ``seconds`` pass (or
    ``requests_each`` requests are sent)."""
    import httpx

    latencies: list[float] = []
    statuses: Counter = Counter()
    completion = prompt = 0
    stop = time.monotonic() + seconds if seconds is not None else float("inf")
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"content-type": "application/json"}

    async def client(http, k: int) -> None:
        nonlocal completion, prompt
        n = 0
        while time.monotonic() < stop and (requests_each is None or n < requests_each):
            data = body(workload, image_url, k, n)
            n += 1
            t = time.perf_counter()
            try:
                r = await http.post("/v1/chat/completions", content=data, headers=headers)
                status = r.status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            dt = time.perf_counter() - t
            statuses[status] += 1
            if status == 200:
                usage = r.json()["usage"]
                latencies.append(dt)
                completion += usage["completion_tokens"]
                prompt += usage["prompt_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http, k) for k in range(clients)))
        wall = time.perf_counter() - t0
    ok = len(latencies)
    lat = sorted(latencies)

    def pct(q: float) -> float | None:
        if not lat:
            return None
        import numpy as np

        return round(float(np.percentile(lat, q)), 3)

    return {"wall_s": round(wall, 2), "requests_ok": ok, "requests_per_s": round(ok / wall, 3),
            "completion_tokens": completion, "tokens_per_s": round(completion / wall, 2),
            "completion_tokens_per_request": round(completion / ok, 1) if ok else None,
            "prompt_tokens_per_request": round(prompt / ok, 1) if ok else None,
            "p50_s": pct(50), "p99_s": pct(99), "errors": sum(v for s, v in statuses.items() if s != 200),
            "statuses": {str(s): v for s, v in sorted(statuses.items(), key=lambda kv: str(kv[0]))}}


def _load_in_child(*load_args) -> dict:
    return asyncio.run(load(*load_args))


def client_load(*load_args) -> dict:
    """:func:`load` in a child process (spawned: stdlib and httpx only), so that the RSS measured
    here is the server's own and not the clients' request bodies awaiting collection."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_load_in_child, *load_args).result()


def measured_run(server_url: str, workload: str, image_url: str | None, args) -> dict:
    from unimedvl.serving.host_memory import malloc_stats

    before = scrape(server_url)
    result = client_load(server_url, workload, image_url, args.clients, args.seconds, None, args.timeout)
    after = scrape(server_url)

    def delta(name: str) -> float | None:
        if before is None or after is None or name not in before or name not in after:
            return None
        return after[name] - before[name]

    prefill_s, decode_s = delta(PREFILL), delta(DECODE)
    steps, advanced = delta(STEPS), delta(BATCH_TOKENS)
    share = None
    if prefill_s is not None and decode_s is not None and prefill_s + decode_s > 0:
        share = round(prefill_s / (prefill_s + decode_s), 4)
    ok = result["requests_ok"]
    result.update({"prefill_s": None if prefill_s is None else round(prefill_s, 3),
                   "decode_s": None if decode_s is None else round(decode_s, 3), "prefill_share": share,
                   "prefill_s_per_request": round(prefill_s / ok, 4) if prefill_s is not None and ok else None,
                   "mean_decode_batch": round(advanced / steps, 2) if steps and advanced is not None else None,
                   "metrics_scraped": before is not None and after is not None, "rss_mb": round(rss_mb(), 1),
                   "malloc_mb": malloc_stats()})
    return result


def serve_setting(pipeline, max_batch: int, workloads: list[str], image_url: str | None, args, model_thread=None) -> dict:
    from serving_helpers import RunningServer, free_port
    from unimedvl.serving import ServeConfig, create_app

    config = ServeConfig(max_batch=max_batch, max_queue=max(1024, 4 * args.clients), request_timeout_s=args.timeout, ui=False)
    server = RunningServer(create_app(pipeline, config, model_thread=model_thread), free_port())
    log(f"max_batch {max_batch}: serving at {server.url}")
    out: dict = {}
    try:
        for workload in workloads:
            warm = client_load(server.url, workload, image_url, min(args.clients, max_batch), None, 1, args.timeout)
            log(f"max_batch {max_batch} {workload}: warmed up ({warm['requests_ok']} ok, {warm['errors']} errors, {warm['wall_s']} s)")
            runs = []
            for i in range(args.runs):
                r = measured_run(server.url, workload, image_url, args)
                runs.append({"run": i + 1, **r})
                log(f"max_batch {max_batch} {workload} run {i + 1}/{args.runs}: {r['tokens_per_s']} tok/s, "
                    f"{r['requests_per_s']} req/s, p50 {r['p50_s']} s, p99 {r['p99_s']} s, errors {r['errors']}, "
                    f"prefill share {r['prefill_share']}, RSS {r['rss_mb']} MB (malloc {r['malloc_mb']}), wall {r['wall_s']} s")
            out[workload] = runs
    finally:
        server.stop()
    return out


# ---- the summary -------------------------------------------------------------------------------


def median(values, digits: int = 4):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), digits) if values else None


def rss_growth(runs: list[dict]) -> dict | None:
    if len(runs) < 2:
        return None
    a, b = (runs[1], runs[2]) if len(runs) >= 3 else (runs[-2], runs[-1])
    return {"from_run": a["run"], "to_run": b["run"], "pct": round(100 * (b["rss_mb"] - a["rss_mb"]) / a["rss_mb"], 2)}


def summarise(workload: str, one: list[dict], many: list[dict], batch: int) -> dict:
    k1, kb = "max_batch_1", f"max_batch_{batch}"
    tps = {k1: median(r["tokens_per_s"] for r in one), kb: median(r["tokens_per_s"] for r in many)}
    p50 = {k1: median(r["p50_s"] for r in one), kb: median(r["p50_s"] for r in many)}
    ratio = round(tps[kb] / tps[k1], 3) if tps[k1] and tps[kb] is not None else None
    errors = {k1: sum(r["errors"] for r in one), kb: sum(r["errors"] for r in many)}
    growth = {k1: rss_growth(one), kb: rss_growth(many)}
    p = median(r["prefill_share"] for r in one)
    bound = round(1 / (p + (1 - p) / batch), 3) if p is not None else None
    out = {"tokens_per_s_median": tps, "tokens_per_s_ratio": ratio,
           "requests_per_s_median": {k1: median(r["requests_per_s"] for r in one), kb: median(r["requests_per_s"] for r in many)},
           "p50_s_median": p50,
           "p99_s_median": {k1: median(r["p99_s"] for r in one), kb: median(r["p99_s"] for r in many)},
           "errors": errors, "rss_growth_pct": growth,
           "prefill_share_max_batch_1": p, "prefill_share_batched": median(r["prefill_share"] for r in many),
           "prefill_s_per_request_median": {k1: median(r["prefill_s_per_request"] for r in one),
                                            kb: median(r["prefill_s_per_request"] for r in many)},
           "mean_decode_batch_median": {k1: median(r["mean_decode_batch"] for r in one), kb: median(r["mean_decode_batch"] for r in many)},
           "amdahl_bound": bound, "ratio_over_bound": round(ratio / bound, 3) if ratio is not None and bound else None}
    growth_ok = all(g is not None and g["pct"] <= 2.0 for g in growth.values())
    targets = {"zero_errors": not any(errors.values()), "rss_growth_le_2pct": growth_ok}
    if workload == "text":
        targets = {"ratio_ge_4": ratio is not None and ratio >= 4,
                   "p50_not_worse": None not in p50.values() and p50[kb] <= p50[k1], **targets}
    out["targets"] = targets
    out["targets_met"] = all(targets.values())
    return out


def machine(args) -> dict:
    import torch

    out = {"cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
           "torch": torch.__version__, "device": args.device}
    if args.no_floors:
        out["floors"] = None
        return out
    log("measuring the machine's floors (child process)")
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", FLOORS, str(HERE), str(torch.get_num_threads())],
                          capture_output=True, text=True)
    if done.returncode == 0:
        out["floors"] = json.loads(done.stdout.strip().splitlines()[-1])
    else:
        out["floors"] = {"error": (done.stderr.strip().splitlines() or ["exit status %d" % done.returncode])[-1]}
    out["floors_s"] = round(time.perf_counter() - t, 1)
    if args.device.startswith("cuda"):
        sys.path.insert(0, str(HERE))
        from train_step import matmul_peak_gflops

        out["gpu"] = torch.cuda.get_device_name(args.device)
        out["gpu_matmul_bf16_gflops"] = round(matmul_peak_gflops(args.device), 1)
    return out


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="checkpoint directory with tokenizer files (default: a random small-preset model in memory)")
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="weights' dtype (auto: fp32 on a CPU, bf16 on CUDA)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    ap.add_argument("--vocab", type=int, default=1505, help="vocabulary of the random model (>= the fixture tokenizer's 1505)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60, help="sending time of each run")
    ap.add_argument("--runs", type=int, default=3, help="runs per (setting, workload)")
    ap.add_argument("--batch", type=int, help="the batched setting's max_batch, compared against 1 (default: the server's default)")
    ap.add_argument("--workloads", default="text,image", help="comma-separated subset of text,image")
    ap.add_argument("--timeout", type=float, default=1800, help="server request timeout and client timeout, seconds")
    ap.add_argument("--no-floors", action="store_true", help="skip the bandwidth/matmul floor measurement")
    ap.add_argument("--malloc-mmap-threshold", type=int, help="as `unimedvl serve --malloc-mmap-threshold` (default: its default; 0: glibc's adaptive threshold)")
    ap.add_argument("--out", type=Path, help="also write the JSON here (atomically)")
    args = ap.parse_args()
    workloads = [w for w in args.workloads.split(",") if w]
    if not workloads or not set(workloads) <= set(WORKLOADS):
        raise SystemExit(f"--workloads takes a comma-separated subset of {','.join(WORKLOADS)}, got {args.workloads!r}")
    if args.batch is None:
        from unimedvl.serving import ServeConfig

        args.batch = ServeConfig().max_batch
    if args.batch < 2:
        raise SystemExit("--batch must be at least 2 (it is compared against max_batch 1)")
    if args.clients < 1 or args.runs < 1 or args.seconds <= 0:
        raise SystemExit("--clients and --runs must be >= 1 and --seconds > 0")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    t_start = time.perf_counter()
    import torch

    from unimedvl.serving import ServeConfig
    from unimedvl.serving.host_memory import apply_host_memory_policy, model_thread_trimmer
    from unimedvl.serving.model_thread import ModelThread

    # the host allocator policy of `unimedvl serve` (process-wide: both settings run under it)
    threshold = ServeConfig(ui=False).malloc_mmap_threshold if args.malloc_mmap_threshold is None else (args.malloc_mmap_threshold or None)
    malloc_policy = apply_host_memory_policy(ServeConfig(ui=False, malloc_mmap_threshold=threshold))
    # the model is built, and every forward runs, on one thread, as `unimedvl serve` does it
    model_thread = ModelThread(after_call=model_thread_trimmer(ServeConfig(ui=False)))
    if args.threads:
        model_thread.run(torch.set_num_threads, args.threads)
    result: dict = {"machine": machine(args)}
    log("loading the model")
    t = time.perf_counter()
    pipeline, desc = model_thread.run(load_pipeline, args)
    load_s = time.perf_counter() - t
    image_url, image = model_thread.run(vqa_image, pipeline) if "image" in workloads else (None, None)
    result["config"] = {"model": desc, "dtype": str(next(pipeline.model.parameters()).dtype).removeprefix("torch."),
                        "load_s": round(load_s, 1), "clients": args.clients, "seconds_per_run": args.seconds, "runs": args.runs,
                        "settings": [1, args.batch], "workloads": {w: {"max_tokens": WORKLOADS[w], "temperature": 0} for w in workloads},
                        "question_example": question(0, 0),
                        "question_tokens": len(pipeline.tokenizer.encode(question(0, 0))),
                        "image": image, "rss_mb_after_load": round(rss_mb(), 1),
                        "malloc_mmap_threshold": threshold if malloc_policy else None,
                        "malloc_trim_interval_s": ServeConfig(ui=False).malloc_trim_interval_s}
    if image:
        log(f"image workload: {image['sent_px']} px -> {image['model_px']} -> {image['vit_patches']} ViT patches")
    runs = {}
    for max_batch in (1, args.batch):
        runs[f"max_batch_{max_batch}"] = serve_setting(pipeline, max_batch, workloads, image_url, args, model_thread)
    result["runs"] = runs
    result["summary"] = {w: summarise(w, runs["max_batch_1"][w], runs[f"max_batch_{args.batch}"][w], args.batch) for w in workloads}
    counters = any(r["prefill_share"] is not None for s in runs.values() for rs in s.values() for r in rs)
    result["notes"] = [] if counters else [f"{PREFILL} / {DECODE} not exported by the server: prefill shares and Amdahl bounds are null"]
    result["targets_met"] = all(s["targets_met"] for s in result["summary"].values())
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(result, indent=1)
    if args.out is not None:
        write_atomic(args.out, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
