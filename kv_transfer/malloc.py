"""glibc malloc settings for processes that stream KV chunks over gRPC.

Every chunk on the wire is a fresh 1-4 MiB buffer at each end (gRPC's message bytes on
D, the serialized chunk on P). glibc serves allocations above M_MMAP_THRESHOLD (128 KiB
at first, adjusted upwards as mapped blocks are freed) with a new mmap, and returns
freed heap tops above M_TRIM_THRESHOLD to the kernel. Either way, each chunk's buffer
comes back as untouched pages: one page fault and one page clear every 4 KiB, which on
the 2-core CI box cost the receiving process about a third of its CPU for a bare gRPC
stream (`benchmarks/kv_grpc_bandwidth.py`; RESULTS.md has the figures).

use_heap_for_chunks() fixes both thresholds (16 MiB mapped, 64 MiB trimmed), so that
chunk-sized buffers are reused from the heap. The cost is that up to 64 MiB of freed
heap stays with the process. Set PDSERVE_TUNE_MALLOC=0 to keep malloc's defaults; on a
libc other than glibc this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

from pdserve import env

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1    # mallopt parameters, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 16 << 20
TRIM_THRESHOLD_BYTES = 64 << 20

_lock = threading.Lock()
_applied: bool | None = None


def use_heap_for_chunks() -> bool:
    """Apply the settings once per process; True when they are in effect."""
    global _applied
    with _lock:
        if _applied is None:
            _applied = _apply() if env.tune_malloc() else False
        return _applied


def _apply() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
          and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1)
    if not ok:
        logger.info("mallopt refused the KV streaming thresholds; keeping malloc's defaults")
    return ok
