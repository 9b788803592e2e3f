"""Host-memory policy of a long-running server process.

glibc's ``malloc`` maps large blocks with ``mmap`` and returns them to the OS on ``free`` - but its
threshold for "large" adapts: once a mapped block of N bytes is freed, blocks up to N come from the
heap from then on (up to 32 MiB).  A server that prefills a 729-patch image frees activations of
several MiB per request, so those land in the heap, interleave with small long-lived blocks, and
stay resident when freed.  Measured under 32 clients asking about an image on the ``small`` preset
(2-core CPU, one request at a time): memory in use by the program constant at 180 MB, but free
heap memory kept by malloc rising 272 -> 304 -> 364 MB over three 20 s runs and the process RSS
rising with it.  A fixed threshold (which also switches the adaptation off) sends every block
at least that large to ``mmap``: RSS then stayed at 927-929 MB over four runs at the same speed.

Smaller blocks still come from malloc's arenas, and a batched load leaves free memory there too
(240-300 MB after batched decoding of 16 answers).  :class:`MallocTrimmer` hands free arena pages
back with ``malloc_trim`` every few seconds of model work (10-16 ms per call with 300 MB free).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
import time

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc refuses larger values on 64-bit (HEAP_MAX_SIZE / 2)
DEFAULT_MMAP_THRESHOLD = 256 * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def check_mmap_threshold(value) -> int:
    """``value`` if it is a whole number of bytes glibc accepts (1..32 MiB), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"malloc_mmap_threshold (the malloc mmap threshold) must be a whole number of bytes in "
                         f"1..{MAX_MMAP_THRESHOLD}, got {value!r}")
    return value


def check_trim_interval(value) -> float:
    """``value`` if it is a finite number of seconds > 0, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"malloc_trim_interval_s (the trim interval) must be a positive number of seconds, got {value!r}")
    return float(value)


@functools.cache
def _glibc():
    """The C library if it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``), else None;
    loaded once."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # absent from musl, macOS and Windows C libraries
        libc.mallopt
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    if hasattr(libc, "mallinfo2"):  # glibc >= 2.33
        libc.mallinfo2.restype = _MallInfo2
    return libc


def malloc_stats() -> dict | None:
    """glibc's own account of the heap, MB: ``in_use`` (blocks the program holds), ``free`` (kept by
    malloc in its arenas, resident or not), ``mapped`` (large blocks mapped on their own).  None
    where unavailable (not glibc, or glibc < 2.33 without ``mallinfo2``)."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    m = libc.mallinfo2()
    mb = 1024 * 1024
    return {"in_use": round(m.uordblks / mb, 1), "free": round(m.fordblks / mb, 1), "mapped": round(m.hblkhd / mb, 1)}


def fix_mmap_threshold(threshold_bytes: int) -> bool:
    """Map every host allocation of at least ``threshold_bytes`` and give it back when freed.

    Process-wide and lasting; applies to allocations made afterwards.  Returns False (and changes
    nothing) where the C library is not glibc.  Raises ValueError for a threshold outside
    1..32 MiB."""
    check_mmap_threshold(threshold_bytes)
    libc = _glibc()
    if libc is None:
        log.info("not glibc: host allocator left as it is")
        return False
    if libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes) != 1:
        raise RuntimeError(f"glibc refused mallopt(M_MMAP_THRESHOLD, {threshold_bytes})")
    return True


class MallocTrimmer:
    """Call after each piece of model work: at most every ``interval_s`` seconds it gives free
    arena memory back to the OS (``malloc_trim(0)``).  Does nothing where the C library is not glibc."""

    def __init__(self, interval_s: float):
        self.interval_s = check_trim_interval(interval_s)
        self._libc = _glibc()
        self._last = time.monotonic()
        self.trims = 0

    def __call__(self) -> None:
        if self._libc is None:
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._libc.malloc_trim(0)
            self._last = time.monotonic()
            self.trims += 1


def apply_host_memory_policy(config) -> bool:
    """What ``unimedvl serve`` does before loading the model: the :class:`ServeConfig`'s
    ``malloc_mmap_threshold`` (None: nothing).  True when a policy took effect."""
    if config.malloc_mmap_threshold is None:
        return False
    return fix_mmap_threshold(config.malloc_mmap_threshold)


def model_thread_trimmer(config) -> MallocTrimmer | None:
    """The trimmer ``unimedvl serve`` runs after every call on its model thread (None: off)."""
    return None if config.malloc_trim_interval_s is None else MallocTrimmer(config.malloc_trim_interval_s)
