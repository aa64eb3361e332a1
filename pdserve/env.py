"""Every environment variable pdserve reads, in one typed table (prefix ``PDSERVE_``).

Read a value with ``env.CACHE_DIR`` etc.; nothing else in the code calls ``os.getenv``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class _Var(Generic[T]):
    name: str
    default: T
    parse: Callable[[str], T]
    doc: str

    def get(self) -> T:
        raw = os.environ.get(self.name)
        if raw is None or raw == "":
            return self.default
        try:
            return self.parse(raw)
        except ValueError as e:
            raise ValueError(f"{self.name}={raw!r}: {e}") from e


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected a boolean (1/0, true/false)")


VARS: dict[str, _Var] = {
    v.name: v
    for v in [
        _Var("PDSERVE_CACHE_DIR", Path.home() / ".cache" / "pdserve", Path,
             "where prepare-default-model writes the converted model"),
        _Var("PDSERVE_MODEL", "", str, "model directory used when --model is not given"),
        _Var("PDSERVE_ATTENTION_BACKEND", "auto", str,
             "auto | torch | cpu | triton: attention/KV kernels (auto: triton on CUDA; on CPU, "
             "cpu where a C compiler builds its kernel, else torch)"),
        _Var("PDSERVE_NO_PROGRESS", False, _bool, "hide progress bars"),
        _Var("PDSERVE_LOG_LEVEL", "INFO", str, "logging level for pdserve loggers"),
        _Var("PDSERVE_ENFORCE_EAGER", False, _bool, "never capture CUDA graphs"),
        _Var("PDSERVE_CPU_GEMM", "auto", str,
             "CPU: auto (time the GEMM orientations once per machine on the model's weights, "
             "kept in PDSERVE_CACHE_DIR) "
             "| blas (always F.linear) | transposed (W @ x^T for small batches) "
             "| packed (oneDNN prepacked weights)"),
        _Var("PDSERVE_PREFILL_GRAPH_MAX_TOKENS", 1024, int,
             "CUDA: one-prompt prefill steps of up to this many tokens replay a CUDA graph "
             "(one per 64-token bucket, captured at start); 0 runs them eagerly"),
        _Var("PDSERVE_GEMV", True, _bool,
             "CUDA: one-token steps run their linear layers through pdserve's split-K GEMV "
             "kernels (pdserve/kernels/triton_gemv.py); 0 keeps cuBLAS"),
        _Var("PDSERVE_SAMPLER_KERNEL", False, _bool,
             "CUDA: sampled rows are filtered (top-k / top-p / min-p) and drawn by one sort-free "
             "Triton kernel (pdserve/kernels/triton_sampling.py) instead of the torch sort path; "
             "off until benchmarks/sampler_bench.py has measured it on a GPU"),
        _Var("PDSERVE_PDL", False, _bool,
             "CUDA, Hopper and newer: launch pdserve's decode-step kernels with programmatic "
             "dependent launch (pdserve/kernels/pdl.py)"),
        _Var("PDSERVE_TUNE_MALLOC", True, _bool,
             "glibc: keep buffers up to 16 MiB on the heap in processes that stream KV over "
             "gRPC (no page faults per chunk); 0 leaves malloc's defaults"),
    ]
}


def get(name: str):
    return VARS[name].get()


def cache_dir() -> Path:
    return Path(get("PDSERVE_CACHE_DIR"))


def default_model_env() -> str:
    return str(get("PDSERVE_MODEL"))


def attention_backend() -> str:
    return str(get("PDSERVE_ATTENTION_BACKEND"))


def no_progress() -> bool:
    return bool(get("PDSERVE_NO_PROGRESS"))


def enforce_eager() -> bool:
    return bool(get("PDSERVE_ENFORCE_EAGER"))


def cpu_gemm() -> str:
    return str(get("PDSERVE_CPU_GEMM"))


def prefill_graph_max_tokens() -> int:
    return int(get("PDSERVE_PREFILL_GRAPH_MAX_TOKENS"))


def gemv() -> bool:
    return bool(get("PDSERVE_GEMV"))


def sampler_kernel() -> bool:
    return bool(get("PDSERVE_SAMPLER_KERNEL"))


def pdl() -> bool:
    return bool(get("PDSERVE_PDL"))


def tune_malloc() -> bool:
    return bool(get("PDSERVE_TUNE_MALLOC"))
