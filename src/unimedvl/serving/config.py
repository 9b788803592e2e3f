"""Serving settings: where to listen, who may call, and the limits every request is held to."""

from __future__ import annotations

import copy
import ipaddress
import math
from dataclasses import dataclass, field
from pathlib import Path

from .host_memory import DEFAULT_MMAP_THRESHOLD, check_mmap_threshold, check_trim_interval


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # required whenever host is not a loopback address
    max_concurrency: int = 1  # image requests running on the model at once (chat answers are batched: max_batch)
    max_batch: int = 16  # chat answers decoded together, one forward per step for all (1: one at a time)
    max_image_batch: int = 4  # text-to-image images of one size and setting denoised together (1: one at a time)
    max_queue: int = 16  # requests waiting beyond those; more get 429
    request_timeout_s: float = 300.0  # queueing + running; past it: 504, and the work is cancelled
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096  # per decoded image (a DICOM frame or NIfTI slice included)
    max_volume_voxels: int = 1024 * 1024 * 512  # per uploaded NIfTI volume, from its header (only the asked slice is decoded)
    max_images_per_request: int = 8
    max_prompt_chars: int = 16_000  # per request, all text parts together
    max_new_tokens: int = 2048  # cap on max_tokens
    max_images_generated: int = 4  # cap on n
    max_image_side: int = 1024  # generated width/height
    min_image_side: int = 32
    max_steps: int = 100
    allowed_file_roots: tuple[Path, ...] = field(default_factory=tuple)  # local files image_url may name
    ui: bool = True  # mount the web UI at /ui
    # host allocations at least this large are mapped and returned to the OS when freed (glibc;
    # see serving.host_memory); None leaves glibc's adaptive threshold, under which freed prefill
    # activations stay resident and RSS creeps up request after request
    malloc_mmap_threshold: int | None = DEFAULT_MMAP_THRESHOLD
    # free arena memory handed back to the OS at most this often during model work (None: never)
    malloc_trim_interval_s: float | None = 2.0

    def __post_init__(self):
        if not is_loopback(self.host) and not self.api_key:
            raise ValueError(f"host {self.host!r} is reachable from other machines: set an API key (--api-key or UNIMEDVL_API_KEY)")
        for name in ("max_concurrency", "max_batch", "max_image_batch", "max_images_per_request", "max_new_tokens", "max_images_generated", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValueError(f"port must be an integer in 1..65535, got {self.port}")
        if not isinstance(self.request_timeout_s, (int, float)) or not math.isfinite(self.request_timeout_s) or self.request_timeout_s <= 0:
            raise ValueError(f"the request timeout (--timeout, request_timeout_s) must be a positive number of seconds, got {self.request_timeout_s}")
        for name in ("max_body_bytes", "max_image_pixels", "max_volume_voxels", "max_prompt_chars", "max_image_side", "min_image_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_image_side > self.max_image_side:
            raise ValueError(f"min_image_side ({self.min_image_side}) is larger than max_image_side ({self.max_image_side})")
        if self.malloc_mmap_threshold is not None:  # None: glibc's adaptive threshold
            check_mmap_threshold(self.malloc_mmap_threshold)
        if self.malloc_trim_interval_s is not None:  # None: never trimmed
            check_trim_interval(self.malloc_trim_interval_s)
        self.allowed_file_roots = tuple(Path(p).resolve() for p in self.allowed_file_roots)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def uvicorn_log_config(level: str = "INFO") -> dict:
    """uvicorn's logging setup plus the ``unimedvl`` loggers on its stderr handler at ``level``, so the
    request lines (method, route template, status, latency) show at the default level."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["unimedvl"] = {"handlers": ["default"], "level": level, "propagate": False}
    return config
