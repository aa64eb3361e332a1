"""Fused elementwise Triton kernels of the GPU decoder layer.

A decode step of a small batch is a long chain of tiny kernels: in eager torch every
RMSNorm is ~7 launches (cast, square, mean, add, rsqrt, mul, cast, mul), rotary ~10,
SiLU-and-mul 2, the residual add 1. Inside a CUDA graph each still costs a few
microseconds, which at batch 1 on an 8B model added ~2 ms to a ~5 ms weights-read
roofline (benchmarks/RESULTS.md, decode step profile). These kernels do each group in
one launch:

    add_rms_norm(x, residual, w)  s = residual + x (stored as the new residual), rmsnorm(s)
    silu_and_mul(gate_up)         silu(gate) * up
    rotary(q, k, cos, sin)        q, k rotated ("rotate_half" convention)
    rotary_write_kv(q, k, v, ...) q rotated; k rotated and v copied straight into their
                                  paged-cache slots (the rotated k is never materialized)

Numerics follow Hugging Face's eager ops in the activation dtype: every torch op that
rounds to bf16/fp16 there rounds here at the same point (the residual sum, the
normalized value before the weight, silu before the product, each rotary product
before the sum), with float32 in between. The torch forms in `reference_*` below are
the oracle the tests compare against.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from pdserve.kernels.pdl import launch_args, pdl_prologue
from pdserve.kernels.triton_kv import check_runnable


# --- residual add + RMSNorm --------------------------------------------------------------
@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r,
                         stride_o, stride_ro, n_cols, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        s = (r.to(tl.float32) + x.to(tl.float32)).to(x.dtype)     # rounds like torch's add
        tl.store(res_out_ptr + row * stride_ro + cols, s, mask=mask)
    else:
        s = x
    sf = s.to(tl.float32)
    var = tl.sum(sf * sf, axis=0) / n_cols
    normed = (sf * (1.0 / tl.sqrt(var + eps))).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


def add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor,
                 eps: float) -> tuple[Tensor, Tensor]:
    """x, residual: [T, H]. Returns (rmsnorm(residual + x) * weight, residual + x); with
    residual None, (rmsnorm(x) * weight, x)."""
    check_runnable(x, weight)
    T, H = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    if T:
        res = residual if residual is not None else x
        _add_rms_norm_kernel[(T,)](
            x, res, weight, out, res_out, x.stride(0), res.stride(0), out.stride(0),
            res_out.stride(0), H, eps, HAS_RESIDUAL=residual is not None,
            BLOCK=triton.next_power_of_2(H), **launch_args(x.device))
    return out, res_out


def reference_add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor,
                           eps: float) -> tuple[Tensor, Tensor]:
    s = x if residual is None else residual + x
    sf = s.float()
    normed = (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)
    return weight * normed, s


# --- SiLU and multiply -------------------------------------------------------------------
@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    act = (g / (1.0 + tl.exp(-g))).to(u.dtype)                      # F.silu rounds here
    out = (act.to(tl.float32) * u.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


def silu_and_mul(x: Tensor) -> Tensor:
    """x: [T, 2I] (gate | up) -> silu(gate) * up, [T, I]."""
    check_runnable(x)
    T, two_i = x.shape
    n = two_i // 2
    out = torch.empty(T, n, dtype=x.dtype, device=x.device)
    if T:
        block = min(1024, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(T, triton.cdiv(n, block))](x, out, x.stride(0), out.stride(0), n,
                                                          BLOCK=block)
    return out


def reference_silu_and_mul(x: Tensor) -> Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# --- rotary embedding --------------------------------------------------------------------
@triton.jit
def _rotate_row(base, obase, cos_row, sin_row, HALF: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < HALF
    x1 = tl.load(base + i, mask=mask, other=0.0)
    x2 = tl.load(base + HALF + i, mask=mask, other=0.0)
    c1 = tl.load(cos_row + i, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + HALF + i, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + i, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + HALF + i, mask=mask, other=0.0).to(tl.float32)
    dt = x1.dtype
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1); each product and the sum
    # round to the activation dtype as the three torch ops do.
    o1 = ((f1 * c1).to(dt).to(tl.float32) + (-f2 * s1).to(dt).to(tl.float32)).to(dt)
    o2 = ((f2 * c2).to(dt).to(tl.float32) + (f1 * s2).to(dt).to(tl.float32)).to(dt)
    tl.store(obase + i, o1, mask=mask)
    tl.store(obase + HALF + i, o2, mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, vc_ptr, slot_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_qot, stride_kot, stride_ct, stride_cb, stride_cs, stride_ch,
                   NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                   BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
                   TO_CACHE: tl.constexpr, PDL: tl.constexpr):
    # One launch for q and k: heads [0, Hq) rotate q into qo, [Hq, Hq + Hkv) rotate k into
    # ko ([T, Hkv, D]) or, TO_CACHE, into its cache slot, v's row copied beside it.
    pdl_prologue(PDL)
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    cos_row = cos_ptr + tok * stride_ct
    sin_row = sin_ptr + tok * stride_ct
    if head < NUM_Q_HEADS:
        _rotate_row(q_ptr + tok * stride_qt + head * stride_qh,
                    qo_ptr + tok * stride_qot + head * HEAD_DIM, cos_row, sin_row, HALF, BLOCK)
    else:
        kh = head - NUM_Q_HEADS
        k_row = k_ptr + tok * stride_kt + kh * stride_kh
        if TO_CACHE:
            # int64 slot: block * stride_cb overflows int32 past 2**31 cache elements
            slot = tl.load(slot_ptr + tok).to(tl.int64)
            if slot >= 0:   # a negative slot is a padding token: nothing to write
                dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs + kh * stride_ch
                _rotate_row(k_row, ko_ptr + dst, cos_row, sin_row, HALF, BLOCK)
                d = tl.arange(0, BLOCK_D)
                mask = d < HEAD_DIM
                row = tl.load(v_ptr + tok * stride_vt + kh * stride_vh + d, mask=mask)
                tl.store(vc_ptr + dst + d, row.to(vc_ptr.dtype.element_ty), mask=mask)
        else:
            _rotate_row(k_row, ko_ptr + tok * stride_kot + kh * HEAD_DIM, cos_row, sin_row,
                        HALF, BLOCK)


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q: [T, Hq, D], k: [T, Hkv, D] (last dim contiguous, any row strides: views of the
    fused qkv output); cos, sin: [T, 1, D] in q's dtype. Returns new contiguous q, k."""
    check_runnable(q, k, cos, sin)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("rotary needs a contiguous last dimension")
    if cos.stride(0) != sin.stride(0):
        raise ValueError("cos and sin must share a layout")
    T, hq, d = q.shape
    hkv = k.shape[1]
    q_out = torch.empty(T, hq, d, dtype=q.dtype, device=q.device)
    k_out = torch.empty(T, hkv, d, dtype=k.dtype, device=k.device)
    if T:   # v, the value cache and the slots are unused without TO_CACHE
        _rotary_kernel[(T, hq + hkv)](
            q, k, k, cos, sin, q_out, k_out, k_out, q, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), 0, 0, q_out.stride(0), k_out.stride(0), cos.stride(0), 0, 0, 0,
            NUM_Q_HEADS=hq, HEAD_DIM=d, HALF=d // 2, BLOCK=triton.next_power_of_2(d // 2),
            BLOCK_D=triton.next_power_of_2(d), PAGE=1, TO_CACHE=False, **launch_args(q.device))
    return q_out, k_out


def rotary_write_kv(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor,
                    k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> Tensor:
    """rotary() and triton_kv.write_kv() in one launch: returns the rotated q [T, Hq, D]
    (contiguous); the rotated k and v go to slot_mapping's cache slots (slot < 0: skipped),
    as write_kv(rotary(q, k)[1], v, ...) would store them. q, k, v: views of the fused qkv
    output (contiguous last dimension); caches [num_blocks, block_size, Hkv, D] sharing
    strides; cos, sin: [T, 1, D] in q's dtype."""
    check_runnable(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    for name, x in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin),
                    ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"rotary_write_kv needs a contiguous last dimension ({name})")
    if cos.stride(0) != sin.stride(0) or k_cache.stride() != v_cache.stride():
        raise ValueError("cos/sin and k_cache/v_cache must share their layouts")
    T, hq, d = q.shape
    hkv = k.shape[1]
    if v.shape != k.shape or k_cache.shape[2:] != (hkv, d):
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)} and the cache's heads x dim "
                         f"{tuple(k_cache.shape[2:])} do not match")
    if slot_mapping.shape != (T,) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be [{T}] int64")
    q_out = torch.empty(T, hq, d, dtype=q.dtype, device=q.device)
    if T:
        _rotary_kernel[(T, hq + hkv)](
            q, k, v, cos, sin, q_out, k_cache, v_cache, slot_mapping.contiguous(),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            q_out.stride(0), 0, cos.stride(0), k_cache.stride(0), k_cache.stride(1),
            k_cache.stride(2), NUM_Q_HEADS=hq, HEAD_DIM=d, HALF=d // 2,
            BLOCK=triton.next_power_of_2(d // 2), BLOCK_D=triton.next_power_of_2(d),
            PAGE=k_cache.shape[1], TO_CACHE=True, **launch_args(q.device))
    return q_out
