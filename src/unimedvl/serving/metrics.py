"""Prometheus text-format counters for the server (no client library needed).

Requests are labelled by route *template* (``/v1/chat/completions``, ``/ui``), never by the raw
path: a path no route matches counts as :data:`UNMATCHED`, so random URLs can neither grow the
series without bound nor put their text into the output."""

from __future__ import annotations

import threading
from collections import defaultdict

UNMATCHED = "unmatched"


def _label(value: str) -> str:
    """A Prometheus label value, escaped (route templates need none; this is a safety net)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.latency_count: dict[str, int] = defaultdict(int)
        self.completion_tokens = 0
        self.images_generated = 0
        self.prefill_seconds = 0.0  # chat prompts put into context (images included)
        self.decode_seconds = 0.0  # batched decoding steps
        self.decode_steps = 0
        self.decoded_tokens = 0  # sum over steps of the answers in the batch (mean batch = this / steps)

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            self.latency_sum[route] += seconds
            self.latency_count[route] += 1

    def add_tokens(self, n: int) -> None:
        with self._lock:
            self.completion_tokens += n

    def add_prefill(self, seconds: float) -> None:
        with self._lock:
            self.prefill_seconds += seconds

    def add_decode(self, seconds: float, batch: int) -> None:
        with self._lock:
            self.decode_seconds += seconds
            self.decode_steps += 1
            self.decoded_tokens += batch

    def add_images(self, n: int) -> None:
        with self._lock:
            self.images_generated += n

    def render(self, running: int, queued: int) -> str:
        with self._lock:
            lines = ["# HELP unimedvl_requests_total Requests by route and status code.", "# TYPE unimedvl_requests_total counter"]
            lines += [f'unimedvl_requests_total{{route="{_label(r)}",status="{s}"}} {n}' for (r, s), n in sorted(self.requests.items())]
            lines += ["# HELP unimedvl_request_seconds Request latency.", "# TYPE unimedvl_request_seconds summary"]
            for r in sorted(self.latency_count):
                lines.append(f'unimedvl_request_seconds_sum{{route="{_label(r)}"}} {self.latency_sum[r]:.6f}')
                lines.append(f'unimedvl_request_seconds_count{{route="{_label(r)}"}} {self.latency_count[r]}')
            lines += ["# TYPE unimedvl_completion_tokens_total counter", f"unimedvl_completion_tokens_total {self.completion_tokens}",
                      "# TYPE unimedvl_images_generated_total counter", f"unimedvl_images_generated_total {self.images_generated}",
                      "# HELP unimedvl_prefill_seconds_total Time spent putting chat prompts into context.",
                      "# TYPE unimedvl_prefill_seconds_total counter", f"unimedvl_prefill_seconds_total {self.prefill_seconds:.6f}",
                      "# HELP unimedvl_decode_seconds_total Time spent in batched decoding steps.",
                      "# TYPE unimedvl_decode_seconds_total counter", f"unimedvl_decode_seconds_total {self.decode_seconds:.6f}",
                      "# TYPE unimedvl_decode_steps_total counter", f"unimedvl_decode_steps_total {self.decode_steps}",
                      "# HELP unimedvl_decode_batch_tokens_total Answers advanced, summed over decoding steps (mean batch = this / steps).",
                      "# TYPE unimedvl_decode_batch_tokens_total counter", f"unimedvl_decode_batch_tokens_total {self.decoded_tokens}",
                      "# TYPE unimedvl_requests_running gauge", f"unimedvl_requests_running {running}",
                      "# TYPE unimedvl_requests_queued gauge", f"unimedvl_requests_queued {queued}"]
        return "\n".join(lines) + "\n"
