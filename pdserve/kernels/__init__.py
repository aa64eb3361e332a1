"""Attention and KV ops, two implementations behind one small interface.

``torch``: plain torch reference (the oracle for tests; the CPU path where no C compiler is).
``cpu``: the CPU path: a fused C attention kernel (cpu_kernels.c, built once per machine),
    the reference's KV write. Shapes it does not take fall back to the reference.
``triton``: Triton kernels (the GPU path; on CPU only under TRITON_INTERPRET=1, for tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pdserve import env


@dataclass(frozen=True)
class AttentionOps:
    name: str
    write_kv: Callable
    paged_attention: Callable


def _torch_ops() -> AttentionOps:
    from pdserve.kernels import reference
    return AttentionOps("torch", reference.write_kv, reference.paged_attention)


def _cpu_ops() -> AttentionOps:
    from pdserve.kernels import cpu_kernels, reference
    return AttentionOps("cpu", reference.write_kv, cpu_kernels.paged_attention)


def _triton_ops() -> AttentionOps:
    from pdserve.kernels import triton_attention, triton_kv
    return AttentionOps("triton", triton_kv.write_kv, triton_attention.paged_attention)


BACKENDS: dict[str, Callable[[], AttentionOps]] = {
    "torch": _torch_ops, "cpu": _cpu_ops, "triton": _triton_ops}


def get_attention_ops(name: str | None = None, device: torch.device | None = None) -> AttentionOps:
    name = name or env.attention_backend()
    if name == "auto":
        if device is not None and device.type == "cuda":
            name = "triton"
        else:
            from pdserve.kernels import cpu_kernels
            name = "cpu" if cpu_kernels.available() else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]()
