"""Programmatic dependent launch (PDL) for the Triton kernels of a decode step (Hopper+).

A batch-1 decode step of an 8B model replays ~300 small kernels back to back; each waits
for the one before it to drain before its own grid even launches. With PDL a kernel is
launched as a dependent of the previous one in the stream: its programs may be scheduled
while the previous grid finishes, and they block at ``gdc_wait`` until that grid has
completed and its memory is visible. Every pdserve kernel launched this way calls the
prologue below before it touches memory, so ordering is what it was without PDL (and, as
each waits for its predecessor's completion, transitively for every earlier kernel). The
prologue then lets the next kernel launch at once. Kernels that are not ours (cuBLAS,
torch ops) keep the ordinary stream order, before and after ours.

PDSERVE_PDL turns it on; it needs compute capability 9.0 and Triton's gdc intrinsics, and
is never used under the interpreter.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from pdserve import env

_HAS_GDC = hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda, "gdc_launch_dependents")


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@functools.lru_cache(maxsize=None)
def _capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def enabled(device: torch.device) -> bool:
    return (device.type == "cuda" and _HAS_GDC and env.pdl()
            and os.environ.get("TRITON_INTERPRET") != "1" and _capable(device.index or 0))


def launch_args(device: torch.device) -> dict:
    """Keyword arguments for a kernel that calls pdl_prologue(PDL)."""
    if enabled(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
