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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc refuses larger values on 64-bit (HEAP_MAX_SIZE / 2)
DEFAULT_MMAP_THRESHOLD = 256 * 1024


def _glibc():
    """The C library if it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``), else None."""
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
    return libc


def fix_mmap_threshold(threshold_bytes: int) -> bool:
    """Map every host allocation of at least ``threshold_bytes`` and give it back when freed.

    Process-wide and lasting; applies to allocations made afterwards.  Returns False (and changes
    nothing) where the C library is not glibc.  Raises ValueError for a threshold outside
    1..32 MiB."""
    if isinstance(threshold_bytes, bool) or not isinstance(threshold_bytes, int) or not 1 <= threshold_bytes <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"the malloc mmap threshold must be an integer number of bytes in 1..{MAX_MMAP_THRESHOLD}, got {threshold_bytes!r}")
    libc = _glibc()
    if libc is None:
        log.info("not glibc: host allocator left as it is")
        return False
    if libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes) != 1:
        raise RuntimeError(f"glibc refused mallopt(M_MMAP_THRESHOLD, {threshold_bytes})")
    return True


def apply_host_memory_policy(config) -> bool:
    """What ``unimedvl serve`` does before loading the model: the :class:`ServeConfig`'s
    ``malloc_mmap_threshold`` (None: nothing).  True when a policy took effect."""
    if config.malloc_mmap_threshold is None:
        return False
    return fix_mmap_threshold(config.malloc_mmap_threshold)
