"""Triton kernel that scatters new tokens' K/V into the paged cache.

Same contract as ``reference.write_kv``: token t goes to flat slot ``slot_mapping[t]``
(``block = slot // block_size``, ``offset = slot % block_size``, see metadata.py);
a negative slot marks a padding token (e.g. a CUDA-graph batch padded to its bucket)
and writes nothing.

One program per (token, kv head) copies one head_dim row for K and one for V. The kernel
is a pure gather/scatter, so its speed is set by memory traffic, not by tiling.
"""
from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

logger = logging.getLogger(__name__)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block (page), fixes slot -> (block, offset)
    BLOCK_D: tl.constexpr,     # HEAD_DIM rounded up to a power of two (tl.arange needs one)
):
    tok = tl.program_id(0)
    head = tl.program_id(1)
    # int64 slot: block * stride_cb overflows int32 once the cache passes 2**31 elements.
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:  # padding token
        return
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs_d < HEAD_DIM
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + head * stride_ch
    tok64 = tok.to(tl.int64)
    k = tl.load(k_ptr + tok64 * stride_kt + head * stride_kh + offs_d, mask=mask)
    v = tl.load(v_ptr + tok64 * stride_vt + head * stride_vh + offs_d, mask=mask)
    tl.store(k_cache_ptr + dst + offs_d, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst + offs_d, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def check_runnable(*tensors: Tensor) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under its interpreter (tests only)."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    dev = devices.pop()
    # TRITON_INTERPRET is Triton's own switch (read when the kernels are decorated), not a
    # pdserve setting, so it is read here rather than through pdserve.env.
    if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"Triton kernels need CUDA tensors (got {dev}); "
                         "set TRITON_INTERPRET=1 before importing triton to run them on CPU")


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """k, v: [T, Hkv, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D];
    slot_mapping: [T] int64, slot < 0 = skip. Writes in place, casting to the cache dtype."""
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must both be [T, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError("k_cache and v_cache must both be [num_blocks, block_size, Hkv, D], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    t, hkv, d = k.shape
    if k_cache.shape[2:] != (hkv, d):
        raise ValueError(f"k/v heads x dim {(hkv, d)} do not match the cache's {tuple(k_cache.shape[2:])}")
    if slot_mapping.shape != (t,) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be [{t}] int64, got {tuple(slot_mapping.shape)} "
                         f"{slot_mapping.dtype}")
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must share strides")
    for name, x in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype {x.dtype} not supported; use one of {_DTYPES}")
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last (head_dim) dimension")
    check_runnable(k, v, k_cache, v_cache, slot_mapping)
    if t == 0:
        return
    slot_mapping = slot_mapping.contiguous()
    _write_kv_kernel[(t, hkv)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=d, BLOCK_SIZE=k_cache.shape[1], BLOCK_D=triton.next_power_of_2(d),
    )
