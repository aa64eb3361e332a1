"""Host time of the first torch.mm for a new token count M (a profiling tool): cuBLAS
picks and prepares a kernel for each new problem shape, which the prefill of a prompt
of a new length pays once per distinct GEMM shape of the model. Prints, for the 1B
shape's four GEMMs, the first-call and repeat-call host times over fresh M values.

    python benchmarks/gemm_first_call.py [--ms 600,601,...]
"""
import argparse
import os
import statistics
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="")
    ap.add_argument("--blas", default="", help="cublas | cublaslt (torch.backends.cuda.preferred_blas_library)")
    args = ap.parse_args()
    if args.blas:
        torch.backends.cuda.preferred_blas_library(args.blas)
    dev = torch.device("cuda")
    shapes = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}
    ws = {k: torch.randn(n, kk, device=dev, dtype=torch.bfloat16) for k, (n, kk) in shapes.items()}
    x0 = torch.randn(8, 2048, device=dev, dtype=torch.bfloat16)
    torch.nn.functional.linear(x0, ws["qkv"])
    torch.cuda.synchronize()
    ms = [int(m) for m in args.ms.split(",")] if args.ms else list(range(601, 641, 3))
    first = {k: [] for k in shapes}
    again = {k: [] for k in shapes}
    for m in ms:
        for k, (n, kk) in shapes.items():
            x = torch.randn(m, kk, device=dev, dtype=torch.bfloat16)
            torch.cuda.synchronize()
            for store in (first, again):
                t = time.perf_counter()
                torch.nn.functional.linear(x, ws[k])
                store[k].append(1e3 * (time.perf_counter() - t))
                torch.cuda.synchronize()
    print(f"CUDA_MODULE_LOADING={os.environ.get('CUDA_MODULE_LOADING', '(default)')} blas={args.blas or 'default'} "
          f"torch {torch.__version__} cuda {torch.version.cuda}")
    for k in shapes:
        print(f"  {k:8s} first call ms median {statistics.median(first[k]):7.3f} max {max(first[k]):7.3f} | "
              f"repeat median {statistics.median(again[k]):6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
