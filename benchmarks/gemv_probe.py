"""Small-batch decoder GEMMs of the Llama-3-8B shape: cuBLAS (F.linear, plus the SiLU
kernel before down_proj) against a Triton GEMV written for the question (below: one
program owns BLOCK_N output columns over the whole K, so no split-K reduce kernel; for
down_proj it computes silu(gate) * up on the fly, so no SiLU kernel either), over a few
tile configurations, on one GPU, in one run. The answer (benchmarks/RESULTS.md): cuBLAS
is faster at every shape, so pdserve keeps it.

Each case is timed as a CUDA graph of back-to-back calls over rotating weight copies
(>= 256 MiB in all, so the 50 MiB L2 cannot hold them), as the suite's part b times its
cases (gpu_suite_parts.per_call_ms): the per-call time includes the gap between kernels,
as in a decode step's graph. It also lists the kernels cuBLAS
launches for each shape (split-K shows as a second, reduce kernel).

    python benchmarks/gemv_probe.py [--rows 1,4] [--out OUT.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))     # gpu_suite_parts

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336), "lm_head": (128256, 4096)}
CONFIGS = [(8, 256, 4, 3), (16, 256, 4, 3), (16, 512, 4, 3), (16, 512, 8, 3), (32, 256, 4, 3),
           (32, 512, 8, 3), (16, 256, 4, 4), (8, 512, 4, 4), (64, 128, 4, 3), (32, 128, 4, 4)]


GEMV_MAX_ROWS = 8


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                 SILU_MUL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rn = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rm = tl.arange(0, BLOCK_M)
    mask_n = rn < N
    mask_m = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mask_k = rk < K
        w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)        # [BN, BK]
        xoff = rm[:, None] * stride_xm + rk[None, :]
        xmask = mask_m[:, None] & mask_k[None, :]
        if SILU_MUL:
            g = tl.load(x_ptr + xoff, mask=xmask, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + xoff + K, mask=xmask, other=0.0)
            act = (g / (1.0 + tl.exp(-g))).to(u.dtype)                      # F.silu rounds
            x = (act.to(tl.float32) * u.to(tl.float32)).to(u.dtype)         # the product rounds
        else:
            x = tl.load(x_ptr + xoff, mask=xmask, other=0.0)                  # [BM, BK]
        prod = x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]    # [BM, BN, BK]
        acc += tl.sum(prod, axis=2)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gemv(x: Tensor, weight: Tensor, silu_mul: bool = False, block_n: int = 16,
         block_k: int = 256, num_warps: int = 4, num_stages: int = 3) -> Tensor:
    """x: [M, K] (or [M, 2K] gate | up with silu_mul), M <= GEMV_MAX_ROWS; weight [N, K]
    with a contiguous last dimension. Returns [M, N] in x's dtype."""
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"gemv takes 2-D x and weight, got {tuple(x.shape)}, {tuple(weight.shape)}")
    M = x.shape[0]
    N, K = weight.shape
    if x.shape[1] != (2 * K if silu_mul else K):
        raise ValueError(f"x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}"
                         f"{' (silu_mul: x is gate | up)' if silu_mul else ''}")
    if not 0 < M <= GEMV_MAX_ROWS:
        raise ValueError(f"gemv is for 1..{GEMV_MAX_ROWS} rows, got {M}")
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("gemv needs contiguous last dimensions")
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, weight, out, M, N, K, x.stride(0), weight.stride(0), out.stride(0),
        SILU_MUL=silu_mul, BLOCK_M=max(2, triton.next_power_of_2(M)), BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return out


def graph_us(fns: list) -> float:
    """Per-call µs of the calls in `fns`, captured back to back in one CUDA graph."""
    from gpu_suite_parts import per_call_ms
    ms, how = per_call_ms(fns, torch.device("cuda"))
    if how != "cuda_graph":
        raise RuntimeError("graph capture failed; these timings need it")
    return ms * 1e3


def cublas_kernels(x: torch.Tensor, w: torch.Tensor) -> list[str]:
    from torch.profiler import ProfilerActivity, profile
    F.linear(x, w)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        F.linear(x, w)
        torch.cuda.synchronize()
    return [e.name for e in p.events() if e.device_type.name == "CUDA"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--out", default="benchmarks/out/gemv_probe.json")
    args = ap.parse_args()
    from pdserve.kernels import triton_fused
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    res: dict = {"device": torch.cuda.get_device_name(), "rows": {}}
    for m in (int(r) for r in args.rows.split(",")):
        rows = res["rows"][str(m)] = {}
        for name, (n, k) in SHAPES.items():
            copies = max(2, -(-(256 << 20) // (n * k * 2)))
            ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
            silu = name == "down"
            x = torch.randn(m, 2 * k if silu else k, device=dev, dtype=dt)
            ref = F.linear(triton_fused.reference_silu_and_mul(x) if silu else x, ws[0])
            if silu:
                base = [lambda w=w: F.linear(triton_fused.silu_and_mul(x), w) for w in ws]
            else:
                base = [lambda w=w: F.linear(x, w) for w in ws]
            row = {"bytes": n * k * 2, "cublas_us": graph_us(base),
                   "cublas_kernels": cublas_kernels(x[:, :k], ws[0]), "triton": {}}
            for bn, bk, nw, ns in CONFIGS:
                kw = dict(silu_mul=silu, block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
                got = gemv(x, ws[0], **kw)
                err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                us = graph_us([lambda w=w: gemv(x, w, **kw) for w in ws])
                row["triton"][f"{bn}x{bk} w{nw} s{ns}"] = {"us": us, "rel_err": err}
            best = min(row["triton"].items(), key=lambda kv: kv[1]["us"])
            row["best"] = best[0]
            row["best_us"] = best[1]["us"]
            rows[name] = row
            print(f"M={m} {name:8s} {n}x{k}: cuBLAS{' + SiLU' if silu else ''} "
                  f"{row['cublas_us']:7.1f} us ({row['bytes'] / row['cublas_us'] / 1e3:5.0f} GB/s, "
                  f"{len(row['cublas_kernels'])} kernels)  Triton best {best[1]['us']:7.1f} us "
                  f"({row['bytes'] / best[1]['us'] / 1e3:5.0f} GB/s) [{best[0]}], "
                  f"x{row['cublas_us'] / best[1]['us']:.2f}, rel err {best[1]['rel_err']:.1e}",
                  flush=True)
            del ws
            torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
