"""One-row GEMV kernels (y = x @ W^T for a single token) for batch-1 decode.

A batch-1 decode step is a weights read: every linear layer streams its weight once, and
the step can only be as fast as those reads. cuBLAS streams the big weights near the
copy ceiling but the small ones well below it (benchmarks/RESULTS.md, "gemv_probe"):
their grids are too small to keep enough bytes in flight, so it splits K and adds a
reduce kernel. The kernels here split K too, but reduce in the same launch: each program
writes its fp32 partial sums to a workspace and takes a ticket from a per-tile counter;
the program that takes the last ticket adds the partials in split order (so the result
does not depend on which program finishes first), writes the output and resets the
counter for the next call (CUDA-graph replays included). For down_proj the input can be
the gate | up pair: silu(gate) * up is computed as the weight streams, so the SiLU kernel
goes too.

Two designs, both with fp32 accumulation:

    "fma"  BLOCK_N rows x BLOCK_K columns a load, UNROLL loads issued before their
           multiply-adds; partial products accumulate elementwise and are summed once.
    "dot"  the row padded to 16 and multiplied on tensor cores (tl.dot), so Triton's
           software pipeline (num_stages) keeps the weight loads in flight.

Workspace and counters are cached per (device, N, config); calls on one device must not
overlap on different streams (pdserve runs one engine stream per device).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from pdserve.kernels.pdl import launch_args, pdl_prologue


@dataclass(frozen=True)
class GemvConfig:
    design: str = "fma"     # "fma" | "dot"
    block_n: int = 4
    block_k: int = 512
    splits: int = 1
    unroll: int = 2         # fma only
    num_warps: int = 4
    num_stages: int = 3     # dot only

    def check(self, n: int, k: int) -> None:
        if self.design not in ("fma", "dot"):
            raise ValueError(f"unknown gemv design {self.design!r}")
        step = self.block_k * (self.unroll if self.design == "fma" else 1)
        if k % self.splits or (k // self.splits) % step:
            raise ValueError(f"K {k} does not split into {self.splits} runs of whole "
                             f"{step}-column steps")


@triton.jit
def _silu_mul_row(x_ptr, rk, K):
    g = tl.load(x_ptr + rk).to(tl.float32)
    u = tl.load(x_ptr + K + rk)
    act = (g / (1.0 + tl.exp(-g))).to(u.dtype)                 # F.silu rounds
    return (act.to(tl.float32) * u.to(tl.float32)).to(u.dtype)  # so does the product


@triton.jit
def _store(total, rn, nmask, out_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        total += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rn, total.to(out_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _finish(part, rn, nmask, out_ptr, bias_ptr, ws_ptr, count_ptr, N, pid_n, pid_k,
            SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    if SPLITS == 1:
        _store(part, rn, nmask, out_ptr, bias_ptr, HAS_BIAS)
    else:
        tl.store(ws_ptr + pid_k * N + rn, part, mask=nmask)
        tl.debug_barrier()                      # every thread's partials before the ticket
        ticket = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLITS - 1:
            total = tl.zeros([BLOCK_N], tl.float32)
            for s in tl.static_range(SPLITS):   # split order: deterministic
                total += tl.load(ws_ptr + s * N + rn, mask=nmask, other=0.0, cache_modifier=".cg")
            _store(total, rn, nmask, out_ptr, bias_ptr, HAS_BIAS)
            tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed", scope="gpu")


@triton.jit
def _gemv_fma_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, ws_ptr, count_ptr, N, K, stride_wn,
                     K_SPLIT: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, UNROLL: tl.constexpr, SILU_MUL: tl.constexpr,
                     HAS_BIAS: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    k_first = pid_k * K_SPLIT
    for kb in range(0, K_SPLIT, BLOCK_K * UNROLL):
        for u in tl.static_range(UNROLL):
            rk = k_first + kb + u * BLOCK_K + tl.arange(0, BLOCK_K)
            w = tl.load(w_rows + rk[None, :], mask=nmask[:, None], other=0.0,
                        eviction_policy="evict_first")
            if SILU_MUL:
                x = _silu_mul_row(x_ptr, rk, K)
            else:
                x = tl.load(x_ptr + rk)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    _finish(tl.sum(acc, axis=1), rn, nmask, out_ptr, bias_ptr, ws_ptr, count_ptr, N, pid_n,
            pid_k, SPLITS, BLOCK_N, HAS_BIAS)


@triton.jit
def _gemv_dot_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, ws_ptr, count_ptr, N, K, stride_wn,
                     K_SPLIT: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SILU_MUL: tl.constexpr, HAS_BIAS: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, PDL: tl.constexpr):
    pdl_prologue(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    first = (tl.arange(0, 16) == 0)[:, None]                    # the one real row
    acc = tl.zeros([BLOCK_N, 16], tl.float32)
    k_first = pid_k * K_SPLIT
    for kb in range(0, K_SPLIT, BLOCK_K):
        rk = k_first + kb + tl.arange(0, BLOCK_K)
        w = tl.load(w_rows + rk[None, :], mask=nmask[:, None], other=0.0,
                    eviction_policy="evict_first")
        if SILU_MUL:
            x = _silu_mul_row(x_ptr, rk, K)
        else:
            x = tl.load(x_ptr + rk)
        xs = tl.where(first, x[None, :], 0.0).to(w.dtype)       # [16, BLOCK_K]
        acc = tl.dot(w, tl.trans(xs), acc, input_precision=DOT_PRECISION)
    _finish(tl.sum(acc, axis=1), rn, nmask, out_ptr, bias_ptr, ws_ptr, count_ptr, N, pid_n,
            pid_k, SPLITS, BLOCK_N, HAS_BIAS)


_SCRATCH: dict[tuple, tuple[Tensor, Tensor]] = {}


def _scratch(device: torch.device, n: int, cfg: GemvConfig) -> tuple[Tensor, Tensor]:
    key = (device, n, cfg.splits, cfg.block_n)
    got = _SCRATCH.get(key)
    if got is None:
        ws = torch.empty((cfg.splits, n), dtype=torch.float32, device=device)
        count = torch.zeros(triton.cdiv(n, cfg.block_n), dtype=torch.int32, device=device)
        got = _SCRATCH[key] = (ws, count)
    return got


def gemv(x: Tensor, weight: Tensor, cfg: GemvConfig, silu_mul: bool = False,
         bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """x: [1, K] (or [1, 2K] = gate | up with silu_mul), weight [N, K] with a contiguous
    last dimension, bias [N] or None. Returns [1, N] in x's dtype: x @ weight.T + bias
    (silu(gate) * up @ weight.T + bias)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"gemv takes x [1, K] and weight [N, K], got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[1] != (2 * k if silu_mul else k):
        raise ValueError(f"x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}"
                         f"{' (silu_mul: x is gate | up)' if silu_mul else ''}")
    if not x.is_contiguous() or weight.stride(1) != 1:
        raise ValueError("gemv needs a contiguous x and a weight with a contiguous last dimension")
    cfg.check(n, k)
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{n}], got {tuple(bias.shape)}")
    if out is None:
        out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    ws, count = _scratch(x.device, n, cfg) if cfg.splits > 1 else (x, x)  # unused at 1
    grid = (triton.cdiv(n, cfg.block_n), cfg.splits)
    common = dict(K_SPLIT=k // cfg.splits, SPLITS=cfg.splits, BLOCK_N=cfg.block_n,
                  BLOCK_K=cfg.block_k, SILU_MUL=silu_mul, HAS_BIAS=bias is not None,
                  num_warps=cfg.num_warps, **launch_args(x.device))
    b = weight if bias is None else bias      # any pointer when there is no bias
    if cfg.design == "fma":
        _gemv_fma_kernel[grid](x, weight, b, out, ws, count, n, k, weight.stride(0),
                               UNROLL=cfg.unroll, **common)
    else:
        _gemv_dot_kernel[grid](x, weight, b, out, ws, count, n, k, weight.stride(0),
                               num_stages=cfg.num_stages,
                               DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                               **common)
    return out


def pick_config(n: int, k: int) -> GemvConfig | None:
    """The configuration pdserve runs for a [1, K] x [N, K] GEMV, or None where cuBLAS
    should run it (K without a power-of-two factor of at least 128). From
    benchmarks/gemv_splitk_probe.py on an H200 (RESULTS.md): for the Llama-3-8B shapes,
    the "fma" design without a split beat cuBLAS by 4-34% (the small weights gain most),
    and the "dot" design streamed the 128256-row LM head fastest."""
    bk = min(1024, k & -k)
    if bk < 128:
        return None
    if n >= 65536:
        return GemvConfig("dot", block_n=64, block_k=128, num_stages=4)
    long_k = k > 8192
    small = n <= 8192 and not long_k
    unroll = 4 if small else 2
    while unroll > 1 and k % (bk * unroll):
        unroll //= 2
    return GemvConfig("fma", block_n=2 if small else 4, block_k=bk, unroll=unroll,
                      num_warps=4 if small else 8)


def supports(x: Tensor, weight: Tensor) -> bool:
    """Whether linear_1row runs this GEMM: one row, CUDA, 16-bit, contiguous operands."""
    return (x.dim() == 2 and x.shape[0] == 1 and x.is_cuda and weight.is_cuda
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and x.is_contiguous() and weight.stride(1) == 1)


def linear_1row(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                silu_mul: bool = False) -> Tensor | None:
    """x @ weight.T + bias for one row through gemv(), or None where pick_config leaves it
    to cuBLAS (the caller falls back)."""
    cfg = pick_config(*weight.shape)
    if cfg is None:
        return None
    return gemv(x, weight, cfg, silu_mul=silu_mul, bias=bias)
