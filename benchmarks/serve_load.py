"""Load test of the HTTP API on loopback: N concurrent clients for a bounded time.

    python benchmarks/serve_load.py [--model DIR] [--clients 32] [--seconds 30] [--max-tokens 8] [--max-queue 64]

Starts ``unimedvl serve`` in-process (uvicorn in a thread, the UI off) with the given model
(default: the reference fixture), then runs ``clients`` threads that each send chat requests with
an image back to back until ``seconds`` pass.  Prints one JSON object: requests/s, p50/p99 latency,
the count of each status (429 = refused by the bounded queue, an intended answer under overload;
anything else non-200 is an error) and the process RSS before and after each of ``runs`` equal runs (the first
warms allocators and caches; a leak shows as growth that continues run after run).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def image_url() -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run_clients(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    import httpx

    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url()}},
                                                      {"type": "text", "text": "What is shown?"}]}],
            "max_tokens": max_tokens, "temperature": 0}
    latencies, statuses, lock = [], Counter(), threading.Lock()
    stop = time.monotonic() + seconds

    def client():
        with httpx.Client(timeout=300) as http:
            while time.monotonic() < stop:
                t = time.perf_counter()
                try:
                    status = http.post(url + "/v1/chat/completions", json=body).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                with lock:
                    statuses[status] += 1
                    if status == 200:
                        latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    errors = sum(n for s, n in statuses.items() if s not in (200, 429))
    return {"requests_ok": len(latencies), "requests_per_s": round(len(latencies) / wall, 3),
            "p50_s": round(float(np.percentile(lat, 50)), 3), "p99_s": round(float(np.percentile(lat, 99)), 3),
            "statuses": {str(k): v for k, v in statuses.items()}, "errors": errors, "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official_tiny_a"))
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2, help="Equal runs back to back; RSS is read after each.")
    args = ap.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import torch

    from serving_helpers import RunningServer, free_port
    from unimedvl.inference import UniMedVLPipeline
    from unimedvl.serving import ServeConfig, create_app

    torch.set_num_threads(args.threads)
    pipe = UniMedVLPipeline.from_pretrained(args.model, dtype=args.dtype)
    server = RunningServer(create_app(pipe, ServeConfig(max_queue=args.max_queue, ui=False)), free_port())
    rss = [round(rss_mb(), 1)]
    runs = []
    for _ in range(args.runs):
        runs.append(run_clients(server.url, args.clients, args.seconds, args.max_tokens))
        rss.append(round(rss_mb(), 1))
    server.stop()
    print(json.dumps({"clients": args.clients, "seconds_per_run": args.seconds, "max_tokens": args.max_tokens,
                      "max_queue": args.max_queue, "runs": runs, "errors": sum(r["errors"] for r in runs),
                      "rss_mb_start_then_after_each_run": rss,
                      "rss_growth_last_run_mb": round(rss[-1] - rss[-2], 1)}, indent=1))


if __name__ == "__main__":
    main()
