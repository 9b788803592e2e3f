"""Batched benchmark answering against one question at a time, in the same run.

    python benchmarks/batched_answers.py [--model DIR] [--questions 8] [--max-new-tokens 64] [--threads 2]

Answers the same questions about one image with a loop of greedy ``ask`` and with ``ask_batch``
(one packed forward per decoding step for the whole batch), checks the answers are identical and
prints one JSON object: tokens, seconds and tokens/s of each, and the speed-up.  The default model
is the reference fixture (``../shared/fixtures/official_tiny_a``); pass a real checkpoint with
``--model`` (and ``--device cuda --dtype bf16`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

QUESTIONS = ["What is shown?", "Describe the findings.", "Is there a fracture?", "Which side is affected?",
             "Is there a pleural effusion?", "What modality is this?", "Any abnormality?", "Summarise the study."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official_tiny_a"))
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import numpy as np

    from unimedvl import UniMedVLPipeline

    pipe = UniMedVLPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype, visual_gen=False)
    image = np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    items = [([image], QUESTIONS[i % len(QUESTIONS)] + " " * (i // len(QUESTIONS))) for i in range(args.questions)]
    pipe.ask_batch(items[:2], max_new_tokens=4)  # warm-up
    pipe.ask(*items[0], max_new_tokens=4, temperature=0)

    start = time.perf_counter()
    one_by_one = [pipe.ask(images, q, max_new_tokens=args.max_new_tokens, temperature=0) for images, q in items]
    loop_s = time.perf_counter() - start
    start = time.perf_counter()
    batched = pipe.ask_batch(items, max_new_tokens=args.max_new_tokens, batch_size=args.questions)
    batch_s = time.perf_counter() - start
    identical = [a.token_ids for a in one_by_one] == [a.token_ids for a in batched]
    tokens = sum(len(a.token_ids) for a in batched)
    print(json.dumps({
        "model": args.model, "questions": args.questions, "max_new_tokens": args.max_new_tokens, "threads": args.threads,
        "tokens": tokens, "identical_answers": identical,
        "loop_s": round(loop_s, 3), "loop_tokens_per_s": round(tokens / loop_s, 1),
        "batch_s": round(batch_s, 3), "batch_tokens_per_s": round(tokens / batch_s, 1), "speedup": round(loop_s / batch_s, 2),
    }))


if __name__ == "__main__":
    main()
