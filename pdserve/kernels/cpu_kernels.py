"""The CPU path's kernels: a small C library (cpu_kernels.c), compiled once per machine
with the system C compiler and called through ctypes. Paged attention, and the decoder
layer's elementwise ops fused (residual add + RMSNorm, SiLU-and-mul, rotary + KV write).

The torch reference (reference.py) gathers each sequence's blocks into a contiguous copy
and runs SDPA on it; this kernel reads the blocks in place, one pass over the context
per (sequence, kv head), with the softmax online and every query head of a GQA group
reading the same K / V rows. Decode rows and prefill chunks run in one call, spread over
torch's intra-op thread count with OpenMP (torch's own libgomp, already loaded, so the
two share one runtime).

The shared library is built with ``-O3 -march=native`` into PDSERVE_CACHE_DIR/cpu-kernels,
keyed by the source, the compiler and the CPU, so a machine builds it once (about a
second) and every later process, Ray workers included, loads that file. Where there is
no compiler, or the build fails, `load()` returns None and the CPU path stays on the
torch reference (logged once).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from pdserve import env
from pdserve.kernels import reference
from pdserve.kernels.metadata import AttentionMetadata

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno",
         "-ffp-contract=off"]   # no implicit FMAs: elementwise ops round as torch does

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return os.uname().machine


def _library_path(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             timeout=30).stdout.splitlines()[:1]
    key = "\n".join([SOURCE.read_text(), " ".join(FLAGS), cc, *version, _cpu_id()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return env.cache_dir() / "cpu-kernels" / f"cpu_kernels-{digest}.so"


def _build(cc: str, path: Path) -> None:
    """Compile into a temporary file beside `path`, then rename (atomic: a concurrent
    process either finds no file or a whole one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"],
                             capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    fn = lib.pd_paged_attention
    fn.restype = i32
    fn.argtypes = [p, i64, i64, i32,            # q, token / head strides, dtype
                   p, i64, i64,                 # out, token / head strides
                   p, p, i64, i64, i64, i32,    # k, v, block / token / head strides, dtype
                   p, i64,                      # block_tables, row stride
                   p, p, i32,                   # query_start_loc, seq_lens, num_seqs
                   i32, i32, i32, i32, f32, i32]  # hq, hkv, d, block_size, scale, threads
    fn = lib.pd_add_rms_norm
    fn.restype = None
    fn.argtypes = [p, p, p, p, p, i32, i32, f32, i32, i32]
    fn = lib.pd_silu_mul
    fn.restype = None
    fn.argtypes = [p, p, i32, i32, i32, i32]
    fn = lib.pd_rotary_write_kv
    fn.restype = None
    fn.argtypes = [p, i64, p, p, p, p, p, i64, i64, i64, p, i32, i32, i32, i32, i32, i32, i32]
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first use; None where it cannot be
    built here (no compiler, a failed build)."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            cc = _compiler()
            if cc is None:
                raise RuntimeError("no C compiler (gcc or cc) on PATH")
            path = _library_path(cc)
            if not path.exists():
                logger.info("building the CPU kernels: %s", path)
                try:
                    _build(cc, path)
                except OSError as e:   # a read-only cache dir: build for this process only
                    path = Path(tempfile.mkdtemp(prefix="pdserve-cpu-kernels-")) / path.name
                    logger.info("cannot write the CPU kernels to the cache dir (%s); building %s",
                                e, path)
                    _build(cc, path)
            _lib = _declare(ctypes.CDLL(str(path)))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            logger.warning("CPU kernels unavailable (%s); using the torch reference ops", e)
            _lib = None
        _tried = True
        return _lib


def available() -> bool:
    return load() is not None


def supports(q: Tensor, k_cache: Tensor) -> bool:
    hq, d = q.shape[1], q.shape[2]
    hkv = k_cache.shape[2]
    return (q.device.type == "cpu" and q.dtype in DTYPES and k_cache.dtype in DTYPES
            and d % 16 == 0 and d <= 256 and hq % hkv == 0 and hq // hkv <= 32
            and q.stride(2) == 1 and k_cache.stride(3) == 1)


def _int32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


def usable(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """The kernel is built here and takes these tensors."""
    return (load() is not None and supports(q, k_cache) and k_cache.dtype == v_cache.dtype
            and k_cache.stride() == v_cache.stride())


def attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, query_start_loc: Tensor,
              seq_lens: Tensor, block_tables: Tensor, scale: float) -> Tensor:
    """Causal attention of every sequence's new tokens over its paged context (shapes in
    pdserve/kernels/metadata.py). q: [T, Hq, D]; returns [T, Hq, D] in q's dtype.
    Needs usable(q, k_cache, v_cache)."""
    lib = load()
    if lib is None or not usable(q, k_cache, v_cache):
        raise ValueError("the CPU attention kernel does not take these tensors")
    T, hq, d = q.shape
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty((T, hq, d), dtype=q.dtype)
    qsl, sl, bt = _int32(query_start_loc), _int32(seq_lens), _int32(block_tables)
    rc = lib.pd_paged_attention(
        q.data_ptr(), q.stride(0), q.stride(1), DTYPES[q.dtype],
        out.data_ptr(), out.stride(0), out.stride(1),
        k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), DTYPES[k_cache.dtype], bt.data_ptr(), bt.stride(0),
        qsl.data_ptr(), sl.data_ptr(), sl.numel(), hq, hkv, d, bs, float(scale),
        torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"pd_paged_attention returned {rc}")
    return out


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata,
                    scale: float) -> Tensor:
    """The AttentionOps entry point: a mixed step in one call."""
    if not usable(q, k_cache, v_cache):
        return reference.paged_attention(q, k_cache, v_cache, meta, scale)
    return attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens,
                     meta.block_tables, scale)


# -- elementwise ops (the model calls these on the "cpu" backend; see llama.py) ----------
def elementwise_usable(x: Tensor) -> bool:
    """The fused elementwise ops take x (row-contiguous, CPU, a supported dtype)."""
    return (x.device.type == "cpu" and x.dtype in DTYPES and x.dim() == 2 and x.is_contiguous()
            and x.shape[1] % 16 == 0 and load() is not None)


def add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor,
                 eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(residual + x) * weight, residual + x) with HF's rounding; x: [T, H]."""
    lib = load()
    rows, hidden = x.shape
    if hidden % 16 or weight.dtype != x.dtype or (
            residual is not None and (residual.dtype != x.dtype or not residual.is_contiguous())):
        raise ValueError("add_rms_norm: unsupported shapes or dtypes")
    s = torch.empty_like(x)
    out = torch.empty_like(x)
    lib.pd_add_rms_norm(x.data_ptr(), 0 if residual is None else residual.data_ptr(),
                        s.data_ptr(), out.data_ptr(), weight.contiguous().data_ptr(), rows, hidden,
                        float(eps), DTYPES[x.dtype], torch.get_num_threads())
    return out, s


def silu_and_mul(x: Tensor) -> Tensor:
    """x: [T, 2I] = gate | up -> silu(gate) * up, [T, I]."""
    rows, two = x.shape
    if two % 32:
        raise ValueError("silu_and_mul: the width must be a multiple of 32")
    out = torch.empty((rows, two // 2), dtype=x.dtype)
    load().pd_silu_mul(x.data_ptr(), out.data_ptr(), rows, two // 2, DTYPES[x.dtype],
                       torch.get_num_threads())
    return out


def rotary_write_kv(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                    slot_mapping: Tensor, hq: int, hkv: int) -> Tensor:
    """qkv: [T, (hq + 2 hkv) D] rows of the fused projection (row stride free, columns
    contiguous); cos, sin: [T, D] (or [T, 1, D]). Returns rotated q [T, hq, D] and writes
    rotated k and v into the caches at slot_mapping (negative: skipped)."""
    T = qkv.shape[0]
    d = k_cache.shape[-1]
    cos, sin = cos.reshape(T, d).contiguous(), sin.reshape(T, d).contiguous()
    if (qkv.stride(1) != 1 or k_cache.dtype != qkv.dtype or v_cache.dtype != qkv.dtype
            or cos.dtype != qkv.dtype or k_cache.stride() != v_cache.stride()
            or k_cache.stride(3) != 1 or d % 32):
        raise ValueError("rotary_write_kv: unsupported shapes or dtypes")
    slots = slot_mapping if slot_mapping.dtype == torch.int64 else slot_mapping.long()
    slots = slots.contiguous()
    q = torch.empty((T, hq, d), dtype=qkv.dtype)
    load().pd_rotary_write_kv(
        qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), q.data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), slots.data_ptr(), T, hq, hkv, d, k_cache.shape[1], DTYPES[qkv.dtype],
        torch.get_num_threads())
    return q
