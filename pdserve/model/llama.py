"""Llama-family causal LM on a paged KV cache: Llama 2/3/3.x, Mistral, Qwen2, Qwen3.

Single-device and readable. Every step is one flattened ragged batch of T tokens (prefill
chunks and decode tokens mixed); the attention kernels behind `AttentionOps` read the
per-step `AttentionMetadata` to know which tokens belong to which sequence.

Module names follow Hugging Face (`model.layers.0.self_attn.q_proj.weight`, ...) so a
checkpoint maps 1:1 onto `state_dict()`. Family differences are flags of ModelConfig:
    attention_bias  bias on q/k/v (Qwen2 always; Llama/Qwen3 also on o_proj when set)
    qk_norm         per-head RMSNorm on q and k before RoPE (Qwen3)
Op order mirrors HF so fp32 greedy decoding matches token for token.

Fused projections: checkpoints load into the HF-named q/k/v and gate/up tensors, then
`CausalLM.fuse_projections()` (the loader calls it) concatenates each group into one
weight so a step runs one GEMM for q/k/v and one for gate/up:

    qkv_weight     [(Hq + 2 Hkv) * D, hidden]   rows: q | k | v      (+ qkv_bias, Qwen2)
    gate_up_weight [2 * intermediate, hidden]   rows: gate | up

The HF-named parameters then become row views into the fused tensor (the originals are
freed), so `state_dict()` keeps HF's names 1:1 and memory is not doubled. Fuse once the
model is on its final device and dtype: `.to()` afterwards copies params and fused
buffers separately (still correct, but twice the memory).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pdserve.config import KV_LAYOUTS, ModelConfig
from pdserve.kernels.metadata import AttentionMetadata
from pdserve.model.rope import RotaryEmbedding, apply_rotary, rotate

logger = logging.getLogger(__name__)

KVCache = tuple[Tensor, Tensor]  # (k_cache, v_cache), each [num_blocks, block_size, Hkv, D]

# CPU GEMM orientations. Which is fastest depends on the CPU and its BLAS, so the first
# CPU engine measures them on the model's own weights (calibrate_cpu_gemms), once per
# machine: the plan is kept in PDSERVE_CACHE_DIR for every later process (_shared_plan).
# `linear` follows the plan:
# - 2..small_batch_max rows as W @ x^T: on an AMD EPYC box with MKL that orientation was
#   1.2-3.6x faster for small batches than x @ W^T (576 -> 49152 at 8 rows: 45 -> 13 ms),
#   equal at 1 row and from ~256 rows on. (Both operands contiguous: a transposed x, i.e.
#   a column-major x^T, is what makes it fast; the output is copied back to row-major.)
# - One row against a weight of at least gemv_as_gemm_min_rows rows as a 2-column GEMM
#   (the row duplicated, one result column kept): on the same box the GEMV was slower
#   (576 -> 49152: 10.2 -> 7.9 ms; single-stream decode +12%).
# On a Xeon box with the same MKL both were slower than F.linear: 3x at one row, 1.4-2.8x
# at 2-4 rows, 1.1-1.4x at 64-128, level at 8-32 (benchmarks/RESULTS.md).
CPU_SMALL_BATCH_MAX = 128
CPU_GEMV_AS_GEMM_MIN_ROWS = 2048


# oneDNN with prepacked weights (torch.ops.mkldnn, the kernels torch's own CPU compiler
# uses): F.linear on a plain weight re-lays it out for every call. Packed once, the same
# GEMMs ran 1.2-3x faster at 1-64 rows in bf16 and 2-4x faster in fp32 on an AMD EPYC box
# (benchmarks/RESULTS.md, session 13), bit-identical in bf16. The packed copy is kept
# beside the weight (twice the weight memory); the layout is chosen for this many rows.
PACK_ROWS_HINT = 64


@dataclass(frozen=True)
class CpuGemmPlan:
    gemv_as_gemm_min_rows: int = 0    # 0: one row always goes through F.linear
    small_batch_max: int = 1          # 1: no batch goes through W @ x^T
    packed: bool = False              # every GEMM through a prepacked weight (overrides both)

    def describe(self) -> str:
        if self.packed:
            return "oneDNN prepacked weights"
        gemv = (f"1 row x >= {self.gemv_as_gemm_min_rows}-row weights as a 2-column GEMM"
                if self.gemv_as_gemm_min_rows else "1 row via F.linear")
        small = (f"2..{self.small_batch_max} rows as W @ x^T" if self.small_batch_max > 1
                 else "batches via F.linear")
        return f"{gemv}; {small}"


TRANSPOSED_PLAN = CpuGemmPlan(CPU_GEMV_AS_GEMM_MIN_ROWS, CPU_SMALL_BATCH_MAX)
BLAS_PLAN = CpuGemmPlan()
PACKED_PLAN = CpuGemmPlan(packed=True)
_plan: CpuGemmPlan | None = None      # this process's plan (ensure_cpu_gemm_plan)
# id(weight) -> (weight's version when packed, packed weight); an entry goes with its weight
_packed: dict[int, tuple[int, Tensor]] = {}


def packing_supported() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def packed_weight(weight: Tensor) -> Tensor:
    """weight in oneDNN's blocked layout, packed on first use and kept while it lives (a
    weight changed in place since is packed again)."""
    key = id(weight)
    hit = _packed.get(key)
    if hit is not None and hit[0] == weight._version:
        return hit[1]
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)
    if hit is None:
        weakref.finalize(weight, _packed.pop, key, None)
    _packed[key] = (weight._version, packed)
    return packed


def packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed_weight(weight), bias,
                                              "none", [], "")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, with the CPU orientations of the process's plan. x: [T, K]."""
    if x.device.type != "cpu" or x.dim() != 2:
        return F.linear(x, weight, bias)
    plan = _plan or TRANSPOSED_PLAN
    if plan.packed and x.dtype == weight.dtype and (bias is None or bias.dtype == x.dtype):
        return packed_linear(x, weight, bias)
    rows = x.shape[0]
    if rows == 1 and plan.gemv_as_gemm_min_rows and weight.shape[0] >= plan.gemv_as_gemm_min_rows:
        out = torch.mm(weight, x.repeat(2, 1).t())[:, :1].t().contiguous()
    elif 1 < rows <= plan.small_batch_max:
        out = torch.mm(weight, x.contiguous().t()).t().contiguous()
    else:
        return F.linear(x, weight, bias)
    return out if bias is None else out + bias


def fused_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                 silu_mul: bool = False) -> Tensor:
    """The Triton path's GEMM. One row on CUDA (a batch-1 decode step) runs pdserve's
    split-K GEMV (pdserve/kernels/triton_gemv.py), which streams these weights faster
    than cuBLAS; anything else runs F.linear. silu_mul: x is gate | up and the GEMM takes
    silu(gate) * up, computed in the GEMV or by triton_fused.silu_and_mul before cuBLAS."""
    from pdserve import env
    from pdserve.kernels import triton_fused, triton_gemv
    if x.shape[0] == 1 and triton_gemv.supports(x, weight) and env.gemv():
        out = triton_gemv.linear_1row(x, weight, bias, silu_mul)
        if out is not None:
            return out
    return F.linear(triton_fused.silu_and_mul(x) if silu_mul else x, weight, bias)


def _best_ms(fn: Callable[[], object], reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


@torch.inference_mode()
def calibrate_cpu_gemms(weights: list[Tensor], margin: float = 0.9) -> CpuGemmPlan:
    """Time each way on these weights (the model's GEMMs) and keep one only where it
    beats F.linear by more than 1 - margin. First prepacked weights, over 1, 8, 32, 96 and
    512 rows together (a decode batch to a prefill chunk); if they lose, the orientations:
    one row against the tall weights, then 8, 32 and 96 rows standing for the tiers up to
    16, 64 and 128 rows."""
    gen = torch.Generator().manual_seed(0)
    if packing_supported():
        blas = packed = 0.0
        for rows in (1, 8, 32, 96, 512):
            xs = [torch.randn(rows, w.shape[1], generator=gen, dtype=w.dtype) for w in weights]
            blas += sum(_best_ms(lambda w=w, x=x: F.linear(x, w)) for w, x in zip(weights, xs))
            packed += sum(_best_ms(lambda w=w, x=x: packed_linear(x, w)) for w, x in zip(weights, xs))
        for w in weights:   # the timing's packed copies: packed again at first real use
            _packed.pop(id(w), None)
        if packed < margin * blas:
            return PACKED_PLAN
    tall = [w for w in weights if w.shape[0] >= CPU_GEMV_AS_GEMM_MIN_ROWS]
    gemv = 0
    if tall:
        xs = [torch.randn(1, w.shape[1], generator=gen, dtype=w.dtype) for w in tall]
        blas = sum(_best_ms(lambda w=w, x=x: F.linear(x, w)) for w, x in zip(tall, xs))
        two = sum(_best_ms(lambda w=w, x=x: torch.mm(w, x.repeat(2, 1).t())[:, :1].t().contiguous())
                  for w, x in zip(tall, xs))
        gemv = CPU_GEMV_AS_GEMM_MIN_ROWS if two < margin * blas else 0
    small = 1
    for top, rows in ((16, 8), (64, 32), (CPU_SMALL_BATCH_MAX, 96)):
        xs = [torch.randn(rows, w.shape[1], generator=gen, dtype=w.dtype) for w in weights]
        blas = sum(_best_ms(lambda w=w, x=x: F.linear(x, w)) for w, x in zip(weights, xs))
        wxt = sum(_best_ms(lambda w=w, x=x: torch.mm(w, x.t()).t().contiguous())
                  for w, x in zip(weights, xs))
        if wxt >= margin * blas:
            break
        small = top
    return CpuGemmPlan(gemv, small)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _plan_file(weights: list[Tensor]) -> Path:
    """Where this machine's plan for these weight shapes is kept (PDSERVE_CACHE_DIR)."""
    from pdserve import env
    key = json.dumps({"plan": 2, "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "shapes": [list(w.shape) for w in weights],
                      "dtype": str(weights[0].dtype)})
    return env.cache_dir() / "cpu-gemm" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def _read_plan(path: Path) -> CpuGemmPlan | None:
    try:
        d = json.loads(path.read_text())
        return CpuGemmPlan(int(d["gemv_as_gemm_min_rows"]), int(d["small_batch_max"]),
                           bool(d.get("packed", False)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _shared_plan(weights: list[Tensor]) -> CpuGemmPlan:
    """One plan per machine: the first process to measure writes it (exclusive create),
    and every process, Ray workers included, uses the file's. Timings near the margin
    could otherwise pick different plans in two processes, and their outputs would then
    differ in rounding."""
    path = _plan_file(weights)
    plan = _read_plan(path)
    if plan is not None:
        return plan
    plan = calibrate_cpu_gemms(weights)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x") as f:
            json.dump(dataclasses.asdict(plan), f)
    except FileExistsError:   # another process measured first: use its plan
        return _read_plan(path) or plan
    except OSError as e:
        logger.warning("cannot keep the CPU GEMM plan in %s (%s); this process measured its own",
                       path, e)
    return plan


def ensure_cpu_gemm_plan(model: "CausalLM", choice: str = "auto") -> CpuGemmPlan:
    """The process's CPU GEMM plan, set by the first CPU engine (later engines reuse it).
    choice (PDSERVE_CPU_GEMM): auto (measured once per machine, see _shared_plan) | blas |
    transposed | packed."""
    global _plan
    if _plan is None:
        if choice not in ("auto", "blas", "transposed", "packed"):
            raise ValueError(f"CPU GEMM choice {choice!r}: expected auto, blas, transposed or packed")
        if choice == "blas":
            _plan = BLAS_PLAN
        elif choice == "transposed":
            _plan = TRANSPOSED_PLAN
        elif choice == "packed":
            if not packing_supported():
                raise ValueError("CPU GEMM choice 'packed': this torch has no oneDNN linear ops")
            _plan = PACKED_PLAN
        else:
            _plan = _shared_plan([w for w, _ in model.layer_gemms()] + [model.lm_head_weight()])
        logger.info("CPU GEMMs (%s): %s", choice, _plan.describe())
    if _plan.packed:
        prepack_weights(model)
    return _plan


@torch.inference_mode()
def prepack_weights(model: "CausalLM") -> None:
    """Pack every GEMM weight of the model now (about a second for the default model)
    and run each once, so that no request pays the packing or oneDNN's first call."""
    weights = [w for layer in model.model.layers for w in _layer_weights(layer)]
    weights.append(model.lm_head_weight())
    for w in weights:
        packed_linear(torch.zeros(1, w.shape[1], dtype=w.dtype), w)


def _layer_weights(layer: "DecoderLayer") -> list[Tensor]:
    attn, mlp = layer.self_attn, layer.mlp
    if attn.qkv_weight is None or mlp.gate_up_weight is None:
        return []   # not fused: such a model is packed at first use
    return [attn.qkv_weight, attn.o_proj.weight, mlp.gate_up_weight, mlp.down_proj.weight]


class AttentionOps(Protocol):
    """The paged-attention kernels (pdserve/kernels: torch reference and Triton)."""

    def write_kv(self, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                 slot_mapping: Tensor) -> None: ...

    def paged_attention(self, q: Tensor, k_cache: Tensor, v_cache: Tensor,
                        meta: AttentionMetadata, scale: float) -> Tensor: ...


def _cpu_elementwise(x: Tensor) -> bool:
    from pdserve.kernels import cpu_kernels
    return cpu_kernels.elementwise_usable(x)


class RMSNorm(nn.Module):
    """Normalized in float32, cast back, then scaled (HF order: the weight multiplies the
    already-cast activations, which matters in bf16)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and x.device.type == "cpu":
            # On CPU torch's rms_norm runs the same ops in the same order (bit-identical;
            # test_rms_norm_fast_path_is_bit_identical) with one dispatch instead of six.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x = x.float()
        var = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.eps)
        return self.weight * x.to(dtype)

    def add_norm(self, x: Tensor, residual: Tensor | None,
                 fused: bool = False, cpu: bool = False) -> tuple[Tensor, Tensor]:
        """(norm(residual + x), residual + x), HF's residual stream; with residual None,
        (norm(x), x). fused: one Triton kernel instead of ~8 torch ops; cpu: one C kernel
        (pdserve/kernels/cpu_kernels.c) for 16-bit activations, the same bits as the ops
        (fp32 keeps torch's rms_norm, bit-identical to HF's)."""
        if fused:
            from pdserve.kernels import triton_fused
            return triton_fused.add_rms_norm(x, residual, self.weight, self.eps)
        if cpu and x.dtype != torch.float32 and _cpu_elementwise(x):
            from pdserve.kernels import cpu_kernels
            return cpu_kernels.add_rms_norm(x, residual, self.weight, self.eps)
        s = x if residual is None else residual + x
        return self(s), s


def _fuse_rows(linears: list[nn.Linear], attr: str) -> Tensor | None:
    """Concatenate `attr` ("weight" or "bias") of `linears` along the output rows and
    re-point each module's parameter at its row range of the result (a view, so the
    originals are freed and the HF names still reach the live weights). None if the
    modules have no such tensor."""
    parts = [getattr(lin, attr) for lin in linears]
    if parts[0] is None:
        return None
    fused = torch.cat([p.detach() for p in parts], dim=0)
    start = 0
    for lin, p in zip(linears, parts):
        n = p.shape[0]
        setattr(lin, attr, nn.Parameter(fused[start:start + n], requires_grad=p.requires_grad))
        start += n
    return fused


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, ops: AttentionOps):
        super().__init__()
        self.ops = ops
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d = config.head_dim
        self.scale = d ** -0.5
        hidden, qkv_bias = config.hidden_size, config.attention_bias
        # Qwen2 has bias on q/k/v only; Llama/Qwen3 `attention_bias` also covers o_proj.
        o_bias = config.attention_bias and config.family != "qwen2"
        self.q_proj = nn.Linear(hidden, self.num_heads * d, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias=o_bias)
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        # Set by fuse_projections(); non-persistent, the checkpoint names stay q/k/v_proj.
        self.register_buffer("qkv_weight", None, persistent=False)  # [q + 2 kv, hidden]
        self.register_buffer("qkv_bias", None, persistent=False)    # [q + 2 kv] or None
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        linears = [self.q_proj, self.k_proj, self.v_proj]
        self.qkv_weight = _fuse_rows(linears, "weight")
        self.qkv_bias = _fuse_rows(linears, "bias")

    def _project_qkv(self, x: Tensor, fused: bool) -> tuple[Tensor, Tensor, Tensor]:
        if self.qkv_weight is None:  # not fused yet (a model built by hand): three GEMMs
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        qkv = (fused_linear if fused else linear)(x, self.qkv_weight, self.qkv_bias)  # [T, q + 2 kv]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return q, k, v

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], kv_cache: KVCache,
                meta: AttentionMetadata, fused: bool = False, cpu: bool = False) -> Tensor:
        # x: [T, hidden]; rope: (cos, sin) each [T, 1, D] for this step's positions
        T, hq, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        k_cache, v_cache = kv_cache
        if (cpu and not self.qk_norm and self.qkv_weight is not None and _cpu_elementwise(x)
                and d % 32 == 0 and k_cache.dtype == x.dtype and rope[0].dtype == x.dtype
                and k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1):
            # rotary and the KV write in one C kernel (the same bits as the ops below)
            from pdserve.kernels import cpu_kernels
            qkv = linear(x, self.qkv_weight, self.qkv_bias)
            q = cpu_kernels.rotary_write_kv(qkv, *rope, k_cache, v_cache, meta.slot_mapping, hq, hkv)
            o = self.ops.paged_attention(q, k_cache, v_cache, meta, self.scale)
            return linear(o.reshape(T, hq * d), self.o_proj.weight, self.o_proj.bias)
        if not fused and not self.qk_norm and self.qkv_weight is not None:
            # q and k are adjacent in each row of the fused output: rotate them as one
            # [T, Hq + Hkv, D] tensor (half the elementwise ops, the same values).
            qkv = linear(x, self.qkv_weight, self.qkv_bias)
            qk = rotate(qkv[:, :self.q_size + self.kv_size].view(T, hq + hkv, d), *rope)
            q, k = qk[:, :hq], qk[:, hq:]
            v = qkv[:, self.q_size + self.kv_size:].view(T, hkv, d)
        else:
            q, k, v = self._project_qkv(x, fused)
            q, k, v = q.view(T, hq, d), k.view(T, hkv, d), v.view(T, hkv, d)
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            if fused:   # rotary and the KV write in one kernel
                from pdserve.kernels import triton_fused
                q = triton_fused.rotary_write_kv(q, k, v, *rope, k_cache, v_cache,
                                                 meta.slot_mapping)
                k = None
            else:
                q, k = apply_rotary(q, k, *rope)
        # Write first: the new tokens attend to themselves through the cache.
        if k is not None:
            self.ops.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        o = self.ops.paged_attention(q, k_cache, v_cache, meta, self.scale)  # [T, Hq, D]
        return (fused_linear if fused else linear)(o.reshape(T, hq * d), self.o_proj.weight,
                                                    self.o_proj.bias)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        # Set by fuse_projections(); non-persistent, the checkpoint names stay gate/up_proj.
        self.register_buffer("gate_up_weight", None, persistent=False)  # [2 * I, hidden]

    @torch.no_grad()
    def fuse_projections(self) -> None:
        self.gate_up_weight = _fuse_rows([self.gate_proj, self.up_proj], "weight")

    def forward(self, x: Tensor, fused: bool = False, cpu: bool = False) -> Tensor:
        # x: [T, hidden]
        if cpu and self.gate_up_weight is not None and x.dtype != torch.float32 \
                and self.down_proj.weight.shape[1] % 16 == 0 and _cpu_elementwise(x):
            from pdserve.kernels import cpu_kernels
            gate_up = linear(x, self.gate_up_weight)
            return linear(cpu_kernels.silu_and_mul(gate_up), self.down_proj.weight)
        if fused and self.gate_up_weight is not None:
            return fused_linear(fused_linear(x, self.gate_up_weight), self.down_proj.weight,
                                silu_mul=True)
        if self.gate_up_weight is None:  # not fused yet: two GEMMs
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = linear(x, self.gate_up_weight).chunk(2, dim=-1)    # 2 x [T, I]
        return linear(F.silu(gate) * up, self.down_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, ops: AttentionOps):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: Tensor, residual: Tensor | None, rope: tuple[Tensor, Tensor],
                kv_cache: KVCache, meta: AttentionMetadata) -> tuple[Tensor, Tensor]:
        """h: the previous layer's output (before its residual add); residual: the stream
        so far (None at layer 0). Returns this layer's (output, residual), so each
        residual add fuses into the next norm. The Triton attention backend also runs
        the fused elementwise kernels (pdserve/kernels/triton_fused.py)."""
        backend = getattr(self.self_attn.ops, "name", None)
        fused, cpu = backend == "triton", backend == "cpu"
        x, residual = self.input_layernorm.add_norm(h, residual, fused, cpu)
        x = self.self_attn(x, rope, kv_cache, meta, fused, cpu)
        x, residual = self.post_attention_layernorm.add_norm(x, residual, fused, cpu)
        return self.mlp(x, fused, cpu), residual


class LlamaModel(nn.Module):
    """The decoder stack (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig, ops: AttentionOps):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                          config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(
            DecoderLayer(config, ops) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig, ops: AttentionOps):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, ops)
        # Tied: logits use embed_tokens.weight directly, so there is no second parameter
        # to keep in sync (materializing from the meta device would silently untie it).
        self.lm_head: nn.Linear | None = (
            None if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False))

    def fuse_projections(self) -> None:
        """One GEMM for q/k/v and one for gate/up in every layer (see the module note).
        Idempotent; call it after the weights are loaded, on the final device and dtype."""
        for layer in self.model.layers:
            if layer.self_attn.qkv_weight is None:
                layer.self_attn.fuse_projections()
            if layer.mlp.gate_up_weight is None:
                layer.mlp.fuse_projections()

    def forward(self, input_ids: Tensor, positions: Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> Tensor:
        # input_ids, positions: [T]; returns hidden states [T, hidden] after the final norm.
        if len(kv_caches) != len(self.model.layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for "
                             f"{len(self.model.layers)} layers")
        h = self.model.embed_tokens(input_ids)                            # [T, hidden]
        rope = self.model.rotary_emb(positions, h.dtype)                  # 2 x [T, 1, D]
        residual: Tensor | None = None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            h, residual = layer(h, residual, rope, kv_cache, meta)
        backend = getattr(self.model.layers[0].self_attn.ops, "name", None)
        return self.model.norm.add_norm(h, residual, backend == "triton", backend == "cpu")[0]

    def layer_gemms(self) -> list[tuple[Tensor, Tensor | None]]:
        """(weight, bias) of each GEMM one decoder layer runs, as forward() calls them
        (every layer has the same shapes): for warming up the BLAS library's per-shape
        kernel choice before serving."""
        attn, mlp = self.model.layers[0].self_attn, self.model.layers[0].mlp
        if attn.qkv_weight is not None:
            gemms = [(attn.qkv_weight, attn.qkv_bias)]
        else:
            gemms = [(lin.weight, lin.bias) for lin in (attn.q_proj, attn.k_proj, attn.v_proj)]
        gemms.append((attn.o_proj.weight, attn.o_proj.bias))
        if mlp.gate_up_weight is not None:
            gemms.append((mlp.gate_up_weight, None))
        else:
            gemms += [(mlp.gate_proj.weight, None), (mlp.up_proj.weight, None)]
        gemms.append((mlp.down_proj.weight, None))
        return gemms

    def lm_head_weight(self) -> Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden: Tensor) -> Tensor:
        # hidden: [n, hidden] (usually each sequence's last token) -> [n, vocab] float32
        fused = getattr(self.model.layers[0].self_attn.ops, "name", None) == "triton"
        return (fused_linear if fused else linear)(hidden, self.lm_head_weight()).float().contiguous()


def kv_cache_shape(config: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """Shape of one layer's K (or V) cache: [num_blocks, block_size, Hkv, D]."""
    return (num_blocks, block_size, config.num_key_value_heads, config.head_dim)


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block id costs across all layers, K and V (for sizing the pool)."""
    per_layer = block_size * config.num_key_value_heads * config.head_dim
    return 2 * config.num_hidden_layers * per_layer * torch.empty((), dtype=dtype).element_size()


def allocate_kv_caches(config: ModelConfig, num_blocks: int, block_size: int,
                       dtype: torch.dtype, device: torch.device | str,
                       layout: str = "token") -> list[KVCache]:
    """One (k_cache, v_cache) pair per layer, views into one zeroed buffer. Every cache
    is a [num_blocks, block_size, Hkv, D] tensor; `layout` sets its memory order:

        "token": kv [num_layers, 2, num_blocks, block_size, Hkv, D]
                 layer l -> (kv[l, 0], kv[l, 1]), each contiguous
        "head":  kv [num_layers, 2, num_blocks, Hkv, block_size, D]
                 layer l -> (kv[l, 0], kv[l, 1]) with dims 1 and 2 swapped: one KV head's
                 positions of a block are one contiguous run (block_size * D elements)

    Kernels address the caches by strides, so both layouts run the same code; the GPU
    decode kernel reads head-major blocks faster (benchmarks/RESULTS.md, "Session 14").
    One allocation keeps memory accounting simple and gives transports a single base
    pointer (CUDA IPC handle, registered buffer). Zeroed so that padding slots a kernel
    might read are finite.
    """
    if num_blocks < 1 or block_size < 1:
        raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
    if layout not in KV_LAYOUTS:
        raise ValueError(f"unknown KV layout {layout!r}; choose one of {KV_LAYOUTS}")
    shape = kv_cache_shape(config, num_blocks, block_size)
    if layout == "token":
        kv = torch.zeros((config.num_hidden_layers, 2, *shape), dtype=dtype, device=device)
    else:
        n, bs, h, d = shape
        kv = torch.zeros((config.num_hidden_layers, 2, n, h, bs, d), dtype=dtype,
                         device=device).transpose(3, 4)
    return [(kv[l, 0], kv[l, 1]) for l in range(config.num_hidden_layers)]
