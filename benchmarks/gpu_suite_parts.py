"""The measurements of benchmarks/gpu_suite.py: one function per part (a-f), each taking
the Suite (device, shapes, time budget, the ceilings measured so far) and returning a
plain dict for the JSON. gpu_suite.py guards every part and prints the table.

Conventions, on every part: each kernel or model is compared with its torch reference on
fresh random inputs before it is timed; times are medians of CUDA-event timings after
warm-up (perf_counter on CPU, where --smoke runs); inputs are random, never zeros;
attention bandwidth counts the K/V bytes that must be read once.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger("gpu_suite")

PAGE = 16                      # pdserve's default KV block size
ROTATE_BYTES = 256 << 20       # rotate inputs until a pass moves 5x the H100's 50 MB L2

LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                 intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                 max_position_embeddings=8192, tie_word_embeddings=False,
                 bos_token_id=128000, eos_token_id=128001)
LLAMA32_1B = dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=2048,
                  intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                  rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=8192),
                  max_position_embeddings=131072, tie_word_embeddings=True,
                  bos_token_id=128000, eos_token_id=128001)
TINY = dict(architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1,
            eos_token_id=2)


@dataclass(frozen=True)
class Shapes:
    """Every size the suite uses; GPU is the real run, SMOKE a CPU-sized copy."""
    dtype: torch.dtype
    hq: int
    hkv: int
    head_dim: int
    copy_bytes: int
    matmul_n: int
    decode_bs: tuple[int, ...]
    decode_ctx: tuple[int, ...]
    prefill_tokens: tuple[int, ...]
    step_model: dict
    step_bs: tuple[int, ...]
    step_ctx: int
    step_prefill_tokens: int
    serve_model: dict
    token_range: tuple[int, int]
    offline: tuple[int, tuple[int, int], tuple[int, int]]   # requests, prompt, output ranges
    hf_batch_sizes: tuple[int, ...]
    engine_kv_gb: float
    max_batched_tokens: int
    serve: tuple[int, tuple[int, int], tuple[int, int]]
    rates: tuple[float, ...]


GPU = Shapes(torch.bfloat16, 32, 8, 128, 1 << 30, 8192, (1, 8, 32, 128), (512, 4096, 32768),
             (1024, 2048, 4096, 8192), LLAMA3_8B, (1, 8, 32, 128), 1024, 2048, LLAMA32_1B,
             (1000, 100000), (128, (128, 2048), (64, 512)), (128, 32), 16.0, 8192,
             (40, (256, 1024), (64, 128)), (4.0, 16.0))
SMOKE = Shapes(torch.float32, 4, 2, 32, 1 << 22, 128, (1, 3), (64, 208), (48, 96), TINY, (1, 3),
               40, 64, TINY, (10, 500), (6, (16, 64), (4, 12)), (6, 3), 0.02, 256,
               (4, (16, 48), (4, 8)), (4.0, 16.0))


# -- timing and checks --------------------------------------------------------------------
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def median_ms(fn: Callable[[], Any], dev: torch.device, target_s: float = 0.2,
              max_iters: int = 50) -> float:
    """Median wall time of fn() in ms (CUDA events on GPU), after one warm-up call; as
    many runs as fit in target_s, at least 3 (2 on CPU)."""
    fn()
    sync(dev)
    times: list[float] = []
    deadline = time.perf_counter() + target_s
    while len(times) < max_iters and (len(times) < (3 if dev.type == "cuda" else 2)
                                      or time.perf_counter() < deadline):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def per_call_ms(calls: list[Callable[[], Any]], dev: torch.device) -> tuple[float, str]:
    """Median ms per call of `calls` run back to back. On CUDA they are captured in one
    graph and its replays timed, so Python launch gaps (tens of us, as long as a small
    decode kernel) do not count; eager timing if capture fails."""
    for c in calls:          # compile and warm up outside the capture
        c()
    sync(dev)
    if dev.type == "cuda":
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for c in calls:
                    c()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for c in calls:
                    c()
            return median_ms(graph.replay, dev) / len(calls), "cuda_graph"
        except Exception as e:  # noqa: BLE001 - fall back, and say so in the JSON
            logger.warning("graph capture failed (%s); timing eagerly", e)
            sync(dev)
    return median_ms(lambda: [c() for c in calls], dev) / len(calls), "eager"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def free_bytes(dev: torch.device) -> int:
    return torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 1 << 40


def release(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# -- a. ceilings ---------------------------------------------------------------------------
def part_ceilings(s: Any) -> dict:
    dev, sh = s.dev, s.shapes
    src = torch.randn(sh.copy_bytes // 2, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), dev)
    if not torch.equal(dst, src):
        raise RuntimeError("device copy is wrong")
    copy_tbs = 2 * sh.copy_bytes / (ms / 1e3) / 1e12
    del src, dst
    n = sh.matmul_n
    a = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    err = rel_err((a @ b)[:64], a[:64].double() @ b.double())
    mm_ms = median_ms(lambda: a @ b, dev)
    s.copy_bw = copy_tbs * 1e12
    s.matmul_flops = 2 * n ** 3 / (mm_ms / 1e3)
    return {"copy_bytes_rw": 2 * sh.copy_bytes, "copy_ms": ms, "copy_tb_s": copy_tbs,
            "matmul_n": n, "matmul_ms": mm_ms, "matmul_tflop_s": s.matmul_flops / 1e12,
            "matmul_rel_err": err}


# -- b, c. attention kernels -----------------------------------------------------------------
def shipped_kv_layout() -> str:
    """The block layout pdserve's engine allocates on the GPU (CacheConfig.kv_layout
    "auto" on the Triton backend): what every paged cache here is measured in."""
    from pdserve.engine.llm_engine import resolve_kv_layout
    return resolve_kv_layout("auto", "triton")


def paged_copy(k: torch.Tensor, v: torch.Tensor, gen: torch.Generator, page: int = PAGE,
               layout: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense k, v [S, Hkv, L, D] (L a multiple of page) -> paged caches
    [S * L/page, page, Hkv, D] holding the same values in a random block order, and the
    block table [S, L/page] int32. layout "token" stores each block [page, Hkv, D],
    "head" [Hkv, page, D] (a permuted view, as allocate_kv_caches lays it out); None:
    the engine's GPU layout."""
    from pdserve.config import KV_LAYOUTS
    layout = layout or shipped_kv_layout()
    if layout not in KV_LAYOUTS:
        raise ValueError(f"unknown KV layout {layout!r}")
    s, h, length, d = k.shape
    if length % page:
        raise ValueError(f"context {length} is not a multiple of the page size {page}")
    nb = length // page
    perm = torch.randperm(s * nb, device=k.device, generator=gen)
    caches = []
    for x in (k, v):
        blocks = x.view(s, h, nb, page, d).permute(0, 2, 1, 3, 4)      # [S, nb, Hkv, page, D]
        if layout == "token":
            cache = torch.empty((s * nb, page, h, d), dtype=x.dtype, device=x.device)
            cache.index_copy_(0, perm, blocks.transpose(2, 3).reshape(s * nb, page, h, d))
        else:
            cache = torch.empty((s * nb, h, page, d), dtype=x.dtype, device=x.device)
            cache.index_copy_(0, perm, blocks.reshape(s * nb, h, page, d))
            cache = cache.transpose(1, 2)
        caches.append(cache)
    return caches[0], caches[1], perm.view(s, nb).to(torch.int32)


@dataclass
class DecodeCase:
    """Decode attention inputs for the GPU tools (tuning sweeps, probes): `copies`
    rotated copies of a batch of bs sequences of ctx positions (bf16), dense for SDPA and
    paged (random block order) for pdserve, so a timed pass moves >= ROTATE_BYTES."""
    bs: int
    ctx: int
    k: torch.Tensor               # [copies * bs, Hkv, ctx, D]
    v: torch.Tensor
    k_cache: torch.Tensor         # [copies * bs * ctx / PAGE, PAGE, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor    # [copies * bs, ctx / PAGE] int32
    q: torch.Tensor               # [copies, bs, Hq, D]
    seq_lens: torch.Tensor        # [bs] int32, all ctx
    copies: int
    scale: float

    @staticmethod
    def make(bs: int, ctx: int, hq: int, hkv: int, d: int, gen: torch.Generator,
             dev: torch.device, layout: str | None = None) -> "DecodeCase":
        kv_bytes = 2 * bs * ctx * hkv * d * 2
        copies = max(1, min(64, math.ceil(ROTATE_BYTES / kv_bytes)))
        k = torch.randn(copies * bs, hkv, ctx, d, dtype=torch.bfloat16, device=dev)
        v = torch.randn_like(k)
        kc, vc, bt = paged_copy(k, v, gen, layout=layout)
        q = torch.randn(copies, bs, hq, d, dtype=torch.bfloat16, device=dev)
        seq_lens = torch.full((bs,), ctx, dtype=torch.int32, device=dev)
        return DecodeCase(bs, ctx, k, v, kc, vc, bt, q, seq_lens, copies, d ** -0.5)

    @property
    def kv_bytes(self) -> int:
        return 2 * self.bs * self.ctx * self.k.shape[1] * self.k.shape[3] * self.k.element_size()

    def tables(self, i: int) -> torch.Tensor:
        return self.block_tables[i * self.bs:(i + 1) * self.bs]

    def sdpa(self, i: int) -> torch.Tensor:
        """torch SDPA (enable_gqa, contiguous KV) on copy i: [bs, Hq, D]."""
        rows = slice(i * self.bs, (i + 1) * self.bs)
        return F.scaled_dot_product_attention(self.q[i].unsqueeze(2), self.k[rows], self.v[rows],
                                              scale=self.scale, enable_gqa=True).squeeze(2)


def ragged_decode_case(dev: torch.device, dtype: torch.dtype) -> tuple:
    """Small ragged decode inputs for the probes' --check: (q, k_cache, v_cache, seq_lens,
    block_tables, scale, ref), GQA 8/2, head dim 64, page 16, lengths 1..129 over a random
    block order; ref is the fp32 torch reference."""
    from pdserve.kernels import reference
    torch.manual_seed(0)
    hq, hkv, d = 8, 2, 64
    lens = [1, 15, 16, 17, 70, 129]
    nblk = -(-max(lens) // PAGE)
    nb = len(lens) * nblk + 3
    k_cache = torch.randn(nb, PAGE, hkv, d, dtype=dtype, device=dev)
    v_cache = torch.randn_like(k_cache)
    bt = torch.randperm(nb, device=dev)[:len(lens) * nblk].view(len(lens), nblk).to(torch.int32)
    q = torch.randn(len(lens), hq, d, dtype=dtype, device=dev)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
    scale = d ** -0.5
    ref = reference.decode_attention(q.float(), k_cache.float(), v_cache.float(), seq_lens, bt, scale)
    return q, k_cache, v_cache, seq_lens, bt, scale, ref


def _ragged_decode_check(s: Any, gen: torch.Generator) -> float:
    """pdserve's decode kernel vs the fp32 torch reference on ragged lengths."""
    from pdserve.kernels import reference, triton_attention
    dev, sh = s.dev, s.shapes
    rng = random.Random(1)
    lens = [rng.randint(1, 3000 if dev.type == "cuda" else 100) for _ in range(4)]
    nb = -(-max(lens) // PAGE)
    k = torch.randn(4, sh.hkv, nb * PAGE, sh.head_dim, dtype=sh.dtype, device=dev)
    v = torch.randn_like(k)
    kc, vc, bt = paged_copy(k, v, gen)
    q = torch.randn(4, sh.hq, sh.head_dim, dtype=sh.dtype, device=dev)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
    scale = sh.head_dim ** -0.5
    out = triton_attention.decode_attention(q, kc, vc, seq_lens, bt, scale)
    return rel_err(out, reference.decode_attention(q.float(), kc.float(), vc.float(), seq_lens, bt, scale))


def _decode_combo(s: Any, bs: int, ctx: int, gen: torch.Generator) -> dict:
    from pdserve.kernels import triton_attention
    dev, sh = s.dev, s.shapes
    esize = torch.empty((), dtype=sh.dtype).element_size()
    kv_bytes = 2 * bs * ctx * sh.hkv * sh.head_dim * esize
    copies = max(1, min(64, math.ceil(ROTATE_BYTES / kv_bytes))) if dev.type == "cuda" else 2
    need = copies * kv_bytes * 2.6     # dense + paged + one staging copy of K or V
    if need > free_bytes(dev) * 0.9:
        return {"bs": bs, "ctx": ctx, "skipped": f"needs {need / 2**30:.1f} GiB"}
    scale = sh.head_dim ** -0.5
    k = torch.randn(copies * bs, sh.hkv, ctx, sh.head_dim, dtype=sh.dtype, device=dev)
    v = torch.randn_like(k)
    kc, vc, bt = paged_copy(k, v, gen)
    q = torch.randn(copies, bs, sh.hq, sh.head_dim, dtype=sh.dtype, device=dev)
    seq_lens = torch.full((bs,), ctx, dtype=torch.int32, device=dev)

    def ours(i: int) -> torch.Tensor:
        return triton_attention.decode_attention(q[i], kc, vc, seq_lens, bt[i * bs:(i + 1) * bs],
                                                 scale, max_seq_len=ctx)

    def sdpa(i: int) -> torch.Tensor:   # [bs, Hq, 1, D] against contiguous [bs, Hkv, ctx, D]
        rows = slice(i * bs, (i + 1) * bs)
        return F.scaled_dot_product_attention(q[i].unsqueeze(2), k[rows], v[rows], scale=scale,
                                              enable_gqa=True)

    # pdserve's kernel vs the fp32 torch reference on two rows (their blocks gathered
    # into a small cache), then vs SDPA on the whole batch, before any timing
    from pdserve.kernels import reference
    rows2 = min(2, bs)
    sub = bt[:rows2].long().flatten()
    ref_err = rel_err(ours(0)[:rows2], reference.decode_attention(
        q[0, :rows2].float(), kc[sub].float(), vc[sub].float(), seq_lens[:rows2],
        torch.arange(sub.numel(), device=dev, dtype=torch.int32).view(rows2, -1), scale))
    ours_ms, how = per_call_ms([lambda i=i: ours(i) for i in range(copies)], dev)
    row: dict[str, Any] = {
        "bs": bs, "ctx": ctx, "kv_bytes": kv_bytes, "rotated_copies": copies,
        "rel_err_vs_reference": ref_err, "pdserve_us": ours_ms * 1e3,
        "pdserve_tb_s": kv_bytes / ours_ms / 1e9, "timing": how,
        "num_splits": triton_attention.choose_num_splits(bs, sh.hkv, ctx, dev)}
    if s.copy_bw:
        row["pdserve_pct_copy_bw"] = 100 * kv_bytes / (ours_ms / 1e3) / s.copy_bw
    try:
        row["rel_err_vs_sdpa"] = rel_err(ours(0), sdpa(0).squeeze(2))
        sdpa_ms, how_sdpa = per_call_ms([lambda i=i: sdpa(i) for i in range(copies)], dev)
    except torch.cuda.OutOfMemoryError as e:      # the baseline alone may not fit
        row["sdpa_error"] = f"OOM: {e}"[:300]
        return row
    row.update(sdpa_us=sdpa_ms * 1e3, sdpa_tb_s=kv_bytes / sdpa_ms / 1e9,
               speedup_vs_sdpa=sdpa_ms / ours_ms, timing=f"{how}/{how_sdpa}")
    if s.copy_bw:
        row["sdpa_pct_copy_bw"] = 100 * kv_bytes / (sdpa_ms / 1e3) / s.copy_bw
    return row


def part_decode_attention(s: Any) -> dict:
    gen = torch.Generator(device=s.dev).manual_seed(0)
    out: dict[str, Any] = {"ragged_rel_err_vs_reference": _ragged_decode_check(s, gen),
                           "shape": f"GQA {s.shapes.hq}/{s.shapes.hkv}, d={s.shapes.head_dim}, "
                                    f"{s.shapes.dtype}, page {PAGE}, {shipped_kv_layout()}-major blocks",
                           "rows": []}
    for bs in s.shapes.decode_bs:
        for ctx in s.shapes.decode_ctx:
            if s.part_left() < 5:
                out["rows"].append({"bs": bs, "ctx": ctx, "skipped": "time budget"})
                continue
            try:
                out["rows"].append(_decode_combo(s, bs, ctx, gen))
            except torch.cuda.OutOfMemoryError as e:
                out["rows"].append({"bs": bs, "ctx": ctx, "error": f"OOM: {e}"[:300]})
            release(s.dev)
    return out


def part_prefill_attention(s: Any) -> dict:
    from pdserve.kernels import triton_attention
    dev, sh = s.dev, s.shapes
    gen = torch.Generator(device=dev).manual_seed(1)
    scale = sh.head_dim ** -0.5
    rows = []
    for t in sh.prefill_tokens:
        if s.part_left() < 3:
            rows.append({"tokens": t, "skipped": "time budget"})
            continue
        k = torch.randn(1, sh.hkv, t, sh.head_dim, dtype=sh.dtype, device=dev)
        v = torch.randn_like(k)
        kc, vc, bt = paged_copy(k, v, gen)
        q = torch.randn(t, sh.hq, sh.head_dim, dtype=sh.dtype, device=dev)
        qs = q.transpose(0, 1).unsqueeze(0).contiguous()          # [1, Hq, T, D]
        qsl = torch.tensor([0, t], dtype=torch.int32, device=dev)
        lens = torch.tensor([t], dtype=torch.int32, device=dev)

        def ours() -> torch.Tensor:
            return triton_attention.prefill_attention(q, kc, vc, qsl, lens, bt, scale, t)

        def sdpa() -> torch.Tensor:
            return F.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale,
                                                  enable_gqa=True)

        err = rel_err(ours(), sdpa()[0].transpose(0, 1))
        reps = 8 if dev.type == "cuda" else 1
        ours_ms, how = per_call_ms([ours] * reps, dev)
        sdpa_ms, _ = per_call_ms([sdpa] * reps, dev)
        flops = 2 * t * t * sh.hq * sh.head_dim        # causal: half of QK^T and PV
        row = {"tokens": t, "rel_err_vs_sdpa": err, "pdserve_ms": ours_ms, "sdpa_ms": sdpa_ms,
               "pdserve_tflop_s": flops / ours_ms / 1e9, "sdpa_tflop_s": flops / sdpa_ms / 1e9,
               "speedup_vs_sdpa": sdpa_ms / ours_ms, "timing": how}
        if s.matmul_flops:
            row["pdserve_pct_matmul"] = 100 * flops / (ours_ms / 1e3) / s.matmul_flops
        rows.append(row)
        del k, v, kc, vc, q, qs
        release(dev)
    return {"flops": "2*T^2*Hq*D (causal)", "rows": rows}


# -- d. decode step of the 8B shape ----------------------------------------------------------
def random_causal_lm(cfg_dict: dict, dtype: torch.dtype, dev: torch.device, ops: Any) -> Any:
    """pdserve's CausalLM with random weights made on the device (no checkpoint)."""
    from pdserve.config import ModelConfig
    from pdserve.model.llama import CausalLM
    with torch.device("meta"):
        model = CausalLM(ModelConfig.from_dict(cfg_dict), ops)
    model = model.to(dtype=dtype).to_empty(device=dev)
    model.model.rotary_emb.reset_cache()
    model.eval().requires_grad_(False)
    gen = torch.Generator(device=dev).manual_seed(0)
    for name, p in model.named_parameters():
        p.normal_(1.0, 0.1, generator=gen) if "norm" in name else p.normal_(0.0, 0.02, generator=gen)
    if hasattr(model, "fuse_projections"):    # as the loader serves it: fused q/k/v, gate/up
        model.fuse_projections()
    return model


def _decode_batch(bs: int, ctx: int, token_range: tuple[int, int], sampled: bool = False) -> Any:
    """A SchedulerOutput of bs decoding sequences with ctx tokens of KV each (random ids);
    greedy, or sampled: temperature 0.8, top-p 0.9, no seed (one draw for the batch)."""
    from pdserve.engine.scheduler import ScheduledSeq, SchedulerOutput
    from pdserve.engine.sequence import Sequence, SeqStatus
    from pdserve.sampling.params import SamplingParams
    rng = random.Random(bs)
    seqs = []
    for i in range(bs):
        params = SamplingParams(max_tokens=1 << 20, ignore_eos=True,
                                **(dict(temperature=0.8, top_p=0.9) if sampled
                                   else dict(temperature=0.0)))
        seq = Sequence(f"s{i}", [rng.randrange(*token_range) for _ in range(ctx)], params,
                       status=SeqStatus.RUNNING)
        seq.tokens.append(rng.randrange(*token_range))
        seq.num_computed_tokens = ctx
        seqs.append(seq)
    return SchedulerOutput([ScheduledSeq(q, 1) for q in seqs], [])


def part_decode_step(s: Any) -> dict:
    from pdserve.engine.runner import ModelRunner
    from pdserve.kernels import get_attention_ops
    from pdserve.model.llama import allocate_kv_caches
    from pdserve.sampling.sampler import Sampler
    dev, sh = s.dev, s.shapes
    ops = get_attention_ops("triton" if dev.type == "cuda" else "torch")
    model = random_causal_lm(sh.step_model, sh.dtype, dev, ops)
    cfg = model.config
    esize = torch.empty((), dtype=sh.dtype).element_size()
    weights = sum(p.numel() for p in model.parameters()) * esize
    # Decode reads every weight but the embedding table (B rows gathered) unless it is tied.
    weights_read = weights - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * esize)
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * esize
    ctx = sh.step_ctx
    per_seq = -(-(ctx + 1) // PAGE)
    nblocks = max(sh.step_bs) * per_seq
    layout = shipped_kv_layout() if ops.name == "triton" else "token"
    caches = allocate_kv_caches(cfg, nblocks, PAGE, sh.dtype, dev, layout)
    caches[0][0]._base.normal_()          # one buffer under every (k, v) view: random KV
    perm = torch.randperm(nblocks, generator=torch.Generator().manual_seed(0)).tolist()
    tables = {f"s{i}": perm[i * per_seq:(i + 1) * per_seq] for i in range(max(sh.step_bs))}
    t0 = time.perf_counter()
    # As LLMEngine builds it (CUDA-graph capture included, when the runner has graphs)
    runner = ModelRunner(model, caches, PAGE, dev, Sampler(cfg.eos_token_ids, seed=0),
                         lambda sid: tables[sid])
    graphs = getattr(runner, "graphs", None)
    graphs_file = Path(__file__).resolve().parents[1] / "pdserve" / "engine" / "cuda_graph.py"
    out: dict[str, Any] = {
        "model": "Llama-3-8B shape, random weights" if sh.step_model is LLAMA3_8B else "tiny",
        "weights_bytes": weights, "weights_read_bytes": weights_read, "context": ctx + 1,
        "fused_projections": hasattr(model, "fuse_projections"),
        "cuda_graph_py_present": graphs_file.is_file(), "runner_graphs": graphs is not None,
        "runner_setup_s": time.perf_counter() - t0, "rows": []}
    if graphs is not None:
        out["graph_buckets"] = list(graphs.buckets)
        out["graph_max_context_len"] = graphs.config.max_context_len

    # Correctness first: Triton ops vs the torch reference ops, same weights and KV.
    check = _decode_batch(min(8, max(sh.step_bs)), ctx, sh.token_range)
    inp = runner.prepare(check)
    with torch.inference_mode():
        fast = model.compute_logits(model(inp.input_ids, inp.positions, caches, inp.meta))
        ref_ops = get_attention_ops("torch")
        for layer in model.model.layers:
            layer.self_attn.ops = ref_ops
        ref = model.compute_logits(model(inp.input_ids, inp.positions, caches, inp.meta))
        for layer in model.model.layers:
            layer.self_attn.ops = ops
    out["logits_rel_err_vs_torch_ops"] = rel_err(fast, ref)
    # ... and the runner's step (a graph replay when captured) samples what eager argmax does
    out["runner_tokens_match_eager"] = (
        [r.token_id for _, r in runner.execute(check)] == fast.argmax(-1).tolist())
    del fast, ref

    for bs in sh.step_bs:
        if s.part_left() < 8:
            out["rows"].append({"bs": bs, "skipped": "time budget"})
            continue
        batch = _decode_batch(bs, ctx, sh.token_range)
        inp = runner.prepare(batch)

        @torch.inference_mode()
        def forward() -> torch.Tensor:
            hidden = model(inp.input_ids, inp.positions, caches, inp.meta)
            return model.compute_logits(hidden[inp.logits_indices]).argmax(-1)

        replays = graphs.num_replays if graphs is not None else 0
        step_ms = median_ms(lambda: runner.execute(batch), dev, target_s=0.4, max_iters=20)
        ahead_ms = _look_ahead_step_ms(runner, batch)
        fwd_ms = median_ms(forward, dev, target_s=0.3, max_iters=20)
        # The same step with every row sampled (temperature 0.8, top-p 0.9): what
        # sampling adds, and whether the look-ahead still overlaps it (the sampler queues
        # its work without waiting for the GPU).
        sampled = _decode_batch(bs, ctx, sh.token_range, sampled=True)
        sampled_ms = median_ms(lambda: runner.execute(sampled), dev, target_s=0.3, max_iters=20)
        sampled_ahead_ms = _look_ahead_step_ms(runner, sampled, steps=20)
        # And through the sort-free sampling kernel (PDSERVE_SAMPLER_KERNEL=1).
        runner.sampler.kernel = True
        try:
            kernel_ms = median_ms(lambda: runner.execute(sampled), dev, target_s=0.3, max_iters=20)
        finally:
            runner.sampler.kernel = None
        roof_s = (weights_read + bs * (ctx + 1) * kv_per_token) / s.copy_bw if s.copy_bw else None
        row = {"bs": bs, "runner_step_ms": step_ms, "runner_tok_s": bs / step_ms * 1e3,
               "runner_used_graph": graphs is not None and graphs.num_replays > replays,
               "eager_forward_ms": fwd_ms, "look_ahead_step_ms": ahead_ms,
               "sampled_step_ms": sampled_ms, "sampled_look_ahead_step_ms": sampled_ahead_ms,
               "sampled_kernel_step_ms": kernel_ms}
        if roof_s:
            row.update(roofline_ms=roof_s * 1e3, roofline_tok_s=bs / roof_s,
                       runner_pct_roofline=100 * roof_s * 1e3 / step_ms,
                       eager_forward_pct_roofline=100 * roof_s * 1e3 / fwd_ms,
                       runner_pct_weights_roofline=100 * weights_read / s.copy_bw * 1e3 / step_ms,
                       look_ahead_pct_weights_roofline=100 * weights_read / s.copy_bw * 1e3 / ahead_ms)
        out["rows"].append(row)
    if s.part_left() > 5:
        out["prefill"] = _prefill_step(s, model, caches, perm)
    del runner, model, caches
    release(dev)
    return out


def _look_ahead_step_ms(runner: Any, batch: Any, steps: int = 40) -> float:
    """The decode step as LLMEngine runs it with look_ahead: each step is launched before
    the host waits for its predecessor's tokens, and reads them on the device
    (PLACEHOLDER_TOKEN), so the host's prepare and sampling overlap the GPU. ms per step
    over `steps` chained steps, the best of 3 runs."""
    from pdserve.engine.runner import PLACEHOLDER_TOKEN
    seqs = [s.seq for s in batch.scheduled]
    saved = [q.tokens[-1] for q in seqs]
    best = float("inf")
    try:
        for _ in range(3):
            for q, tok in zip(seqs, saved):
                q.tokens[-1] = tok
            flight = runner.launch(batch)
            for q in seqs:
                q.tokens[-1] = PLACEHOLDER_TOKEN
            sync(runner.device)
            t = time.perf_counter()
            for _ in range(steps):
                nxt = runner.launch(batch, source=flight)
                runner.resolve(flight)
                flight = nxt
            runner.resolve(flight)
            best = min(best, (time.perf_counter() - t) * 1e3 / steps)
    finally:
        for q, tok in zip(seqs, saved):
            q.tokens[-1] = tok
    return best


def _prefill_step(s: Any, model: Any, caches: Any, perm: list[int]) -> dict:
    """One sequence of step_prefill_tokens through the whole model (logits of its last
    token): TFLOP/s against the measured matmul rate."""
    from pdserve.kernels.metadata import AttentionMetadata
    dev, sh, cfg = s.dev, s.shapes, model.config
    t = sh.step_prefill_tokens
    blocks = perm[:-(-t // PAGE)]
    pos = torch.arange(t, device=dev)
    table = torch.tensor([blocks], dtype=torch.int32, device=dev)
    meta = AttentionMetadata(
        slot_mapping=table[0, pos // PAGE].long() * PAGE + pos % PAGE,
        query_start_loc=torch.tensor([0, t], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([t], dtype=torch.int32, device=dev), block_tables=table,
        max_query_len=t, max_seq_len=t, query_lens_cpu=[t], seq_lens_cpu=[t])
    ids = torch.randint(*sh.token_range, (t,), device=dev)

    @torch.inference_mode()
    def prefill() -> torch.Tensor:
        return model.compute_logits(model(ids, pos, caches, meta)[-1:])

    ms = median_ms(prefill, dev, target_s=0.5, max_iters=10)
    linear = sum(m.weight.numel() for m in model.model.layers.modules()
                 if isinstance(m, torch.nn.Linear))
    flops = (2 * t * linear + 2 * t * t * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
             + 2 * cfg.vocab_size * cfg.hidden_size)
    row = {"tokens": t, "ms": ms, "tok_s": t / ms * 1e3, "tflop_s": flops / ms / 1e9,
           "flops": flops}
    if s.matmul_flops:
        row["pct_matmul"] = 100 * flops / (ms / 1e3) / s.matmul_flops
    return row


# -- e, f. a servable model: HF directory with random weights and a made-up tokenizer -------
def ensure_model_dir(s: Any) -> Path:
    """The serve_model shape as a Hugging Face directory (random bf16 weights, a small
    byte-level BPE trained here): the GPU machine has no model and no network. Keeps the
    HF model in s.hf_model for part e's baseline."""
    path = s.workdir / "serve-model"
    if (path / "config.json").is_file() and s.hf_model is not None:
        return path
    from transformers import LlamaConfig, LlamaForCausalLM

    from pdserve.tokenizer import write_byte_level_bpe
    cfg = {k: v for k, v in s.shapes.serve_model.items() if k != "architectures"}
    torch.manual_seed(0)
    with torch.device(s.dev):
        hf = LlamaForCausalLM(LlamaConfig(**cfg))
    hf = hf.to(s.shapes.dtype).eval()
    hf.save_pretrained(path)
    write_byte_level_bpe(path, "pdserve gpu suite: a benchmark tokenizer, not a real one")
    s.hf_model = hf
    return path


@dataclass(frozen=True)
class Req:
    ids: list[int]
    max_tokens: int


def make_requests(n: int, prompt: tuple[int, int], output: tuple[int, int],
                  token_range: tuple[int, int], seed: int) -> list[Req]:
    rng = random.Random(seed)
    return [Req([rng.randrange(*token_range) for _ in range(rng.randint(*prompt))],
                rng.randint(*output)) for _ in range(n)]


def _pd_generate(llm: Any, reqs: list[Req]) -> float:
    from pdserve.sampling.params import SamplingParams
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True) for r in reqs]
    t = time.perf_counter()
    outs = llm.generate([r.ids for r in reqs], params)
    dt = time.perf_counter() - t
    if [len(o.token_ids) for o in outs] != [r.max_tokens for r in reqs]:
        raise RuntimeError("pdserve produced other token counts than asked")
    return dt


@torch.inference_mode()
def _hf_generate(model: Any, batch: list[Req], max_new: int, dev: torch.device) -> float:
    """One left-padded batch, exactly max_new tokens for every row (EOS masked)."""
    width = max(len(r.ids) for r in batch)
    ids = torch.tensor([[0] * (width - len(r.ids)) + r.ids for r in batch], device=dev)
    mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in batch], device=dev)
    sync(dev)
    t = time.perf_counter()
    y = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                       do_sample=False, pad_token_id=0, use_cache=True)
    sync(dev)
    dt = time.perf_counter() - t
    if y.shape[1] - width != max_new:
        raise RuntimeError(f"HF produced {y.shape[1] - width} tokens, asked for {max_new}")
    return dt


def _hf_batched(model: Any, reqs: list[Req], bs: int, dev: torch.device) -> dict:
    order = sorted(reqs, key=lambda r: len(r.ids))    # similar lengths: less padding
    seconds = 0.0
    for i in range(0, len(order), bs):
        batch = order[i:i + bs]
        seconds += _hf_generate(model, batch, max(r.max_tokens for r in batch), dev)
    useful = sum(r.max_tokens for r in reqs)
    return {"batch_size": bs, "seconds": seconds, "output_tok_s": useful / seconds}


def part_offline(s: Any) -> dict:
    from pdserve.llm import LLM
    sh, dev = s.shapes, s.dev
    path = ensure_model_dir(s)
    n, prompt, output = sh.offline
    reqs = make_requests(n, prompt, output, sh.token_range, seed=0)
    llm = LLM(str(path), dtype=str(sh.dtype).removeprefix("torch."), device=dev.type,
              kv_cache_memory_gb=sh.engine_kv_gb, enable_prefix_caching=False,
              max_num_seqs=max(n, 8), max_num_batched_tokens=sh.max_batched_tokens,
              max_model_len=prompt[1] + output[1] + 16)
    # Warm-up (Triton compiles): batch sizes n..1 and a long prompt, so every split count
    # and tile variant the measured run meets is compiled before it.
    rng = random.Random(1)
    warm = [Req([rng.randrange(*sh.token_range) for _ in range(prompt[1] if i == 0 else 16 + i)],
                1 + i * 64 // n) for i in range(n)]
    _pd_generate(llm, warm)
    pd_s = _pd_generate(llm, reqs)
    useful = sum(r.max_tokens for r in reqs)
    prompt_tokens = sum(len(r.ids) for r in reqs)
    out: dict[str, Any] = {
        "requests": n, "prompt_len": prompt, "output_len": output, "prompt_tokens": prompt_tokens,
        "output_tokens": useful, "pdserve": {"seconds": pd_s, "output_tok_s": useful / pd_s,
                                             "total_tok_s": (useful + prompt_tokens) / pd_s},
        "engine": {"max_num_seqs": max(n, 8), "max_num_batched_tokens": sh.max_batched_tokens,
                   "kv_cache_gb": sh.engine_kv_gb, "prefix_caching": False}, "hf": []}
    del llm
    release(dev)
    hf = s.hf_model
    _hf_generate(hf, warm[:2], 4, dev)
    for bs in sh.hf_batch_sizes:
        last = out["hf"][-1]["seconds"] if out["hf"] else 0.0
        if out["hf"] and s.part_left() < 2.5 * last:
            out["hf"].append({"batch_size": bs, "skipped": "time budget"})
            continue
        try:
            out["hf"].append(_hf_batched(hf, reqs, bs, dev))
        except torch.cuda.OutOfMemoryError as e:
            out["hf"].append({"batch_size": bs, "error": f"OOM: {e}"[:300]})
        release(dev)
    done = [h for h in out["hf"] if "output_tok_s" in h]
    if done:
        best = max(done, key=lambda h: h["output_tok_s"])
        out["hf_best"] = best
        out["speedup_vs_hf"] = out["pdserve"]["output_tok_s"] / best["output_tok_s"]
    return out


# -- f. one GPU, two roles -----------------------------------------------------------------
async def _load(router: Any, reqs: list[Req], rate: float, seed: int) -> dict:
    """Poisson arrivals at `rate` req/s through router.generate; TTFT per request."""
    from pdserve.sampling.params import SamplingParams
    from router.core import GenerateInput
    rng = random.Random(seed)
    at, t = [], 0.0
    for _ in reqs:
        at.append(t)
        t += rng.expovariate(rate)
    t0 = time.perf_counter()

    async def one(req: Req, when: float) -> tuple[float, int, float, str]:
        await asyncio.sleep(max(0.0, when - (time.perf_counter() - t0)))
        start = time.perf_counter()
        ttft, n, rid = math.nan, 0, ""
        params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True)
        async for delta in router.generate(GenerateInput(req.ids, params)):
            if delta.token_ids and n == 0:
                ttft = time.perf_counter() - start
            n += len(delta.token_ids)
            rid = delta.request_id
        return ttft, n, time.perf_counter(), rid

    res = await asyncio.gather(*(one(r, w) for r, w in zip(reqs, at)))
    ttfts = sorted(r[0] for r in res)
    tokens = sum(r[1] for r in res)
    span = max(r[2] for r in res) - t0
    return {"rate": rate, "requests": len(reqs), "ttft_median_ms": 1e3 * statistics.median(ttfts),
            "ttft_p90_ms": 1e3 * ttfts[int(0.9 * (len(ttfts) - 1))],
            "ttft_mean_ms": 1e3 * statistics.fmean(ttfts), "output_tokens": tokens,
            "output_tok_s": tokens / span, "complete": tokens == sum(r.max_tokens for r in reqs),
            "ttft_phases_median_ms": ttft_phases(router, {r[3] for r in res})}


def ttft_phases(router: Any, request_ids: set[str]) -> dict[str, float]:
    """Median ms of each leg of TTFT, from the router's ledger records: admission ->
    dispatched (colocated: submit accepted; disaggregated: the task sent to P, after the
    reserve unless it runs beside the prefill) -> first token at the router, and on the
    disaggregated path P's prefill call (P's own prefill and transfer times inside it),
    which now returns after the first token: P streams it before the KV hand-off."""
    recs = [r for r in router.ledger.history if r.request_id in request_ids
            and r.first_token_at is not None and r.dispatched_at is not None]
    legs: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        legs.setdefault(name, []).append(1e3 * seconds)

    for r in recs:
        add("dispatch", r.dispatched_at - r.accepted_at)
        add("to_first_token", r.first_token_at - r.dispatched_at)
        if r.prefill_done_at is not None:
            add("prefill_call", r.prefill_done_at - r.dispatched_at)
            add("p_prefill", r.prefill_seconds)
            add("p_transfer", r.transfer_seconds)
    return {k: statistics.median(v) for k, v in legs.items()}


async def deploy_part_f(s: Any, path: Path, mode: str) -> tuple[Any, str]:
    """Part f's deployment of `mode` on Ray: (Deployment, transport)."""
    from pdserve.cluster import deploy_ray
    from pdserve.worker_spec import WorkerSpec
    from router.core import RouterConfig
    sh, dev = s.shapes, s.dev
    transport = "ipc" if mode == "disaggregated" and dev.type == "cuda" else "grpc"
    _, prompt, output = sh.serve
    base = WorkerSpec(worker_id="", role="both", model=str(path),
                      dtype=str(sh.dtype).removeprefix("torch."), device=dev.type,
                      kv_cache_gb=max(sh.engine_kv_gb / 2, 0.01), enable_prefix_caching=False,
                      max_num_seqs=64, max_num_batched_tokens=sh.max_batched_tokens // 2,
                      max_model_len=prompt[1] + output[1] + 16, transport=transport)
    # PDSERVE_BENCH_SERIAL_RESERVE=1: reserve on D before sending P the task (the router's
    # path before overlap_reserve), for A/B runs of part f.
    rc = RouterConfig(mode=mode, max_inflight=1024, transport=transport, lease_ms=120_000,
                      max_model_len=prompt[1] + output[1] + 16,
                      overlap_reserve=os.environ.get("PDSERVE_BENCH_SERIAL_RESERVE") != "1")
    dep = await deploy_ray(base, 1 if mode == "disaggregated" else 0, 1, rc, cpus_per_worker=1,
                           gpus_per_worker=0.5 if dev.type == "cuda" else 0.0)
    return dep, transport


async def _serve_mode(s: Any, path: Path, mode: str) -> dict:
    import ray
    sh = s.shapes
    n, prompt, output = sh.serve
    dep, transport = await deploy_part_f(s, path, mode)
    try:
        warm = make_requests(8, prompt, (8, 8), sh.token_range, seed=99)
        await _load(dep.router, warm[:1], 100.0, 0)       # ipc attach, Triton compiles
        await _load(dep.router, warm, 100.0, 0)
        # One request at a time, 2 output tokens each: the path with nothing else on the
        # GPU, so the TTFT legs show the fixed cost of each mode apart from contention.
        idle = make_requests(8, prompt, (2, 2), sh.token_range, seed=7)
        idle_rows = [await _load(dep.router, [r], 1.0, 0) for r in idle]
        rows = [{"rate": "idle", "requests": len(idle),
                 "ttft_median_ms": statistics.median(r["ttft_median_ms"] for r in idle_rows),
                 "ttft_p90_ms": max(r["ttft_median_ms"] for r in idle_rows),
                 "output_tokens": sum(r["output_tokens"] for r in idle_rows),
                 "output_tok_s": float("nan"),
                 "complete": all(r["complete"] for r in idle_rows),
                 "ttft_phases_median_ms": {
                     k: statistics.median(r["ttft_phases_median_ms"].get(k, math.nan) for r in idle_rows)
                     for k in idle_rows[0]["ttft_phases_median_ms"]}}]
        for i, rate in enumerate(sh.rates):
            if s.part_left() < 15:
                rows.append({"rate": rate, "skipped": "time budget"})
                continue
            rows.append(await _load(dep.router, make_requests(n, prompt, output, sh.token_range,
                                                              seed=10 + i), rate, seed=i))
        return {"mode": mode, "transport": transport, "events": dict(dep.router.events),
                "rows": rows}
    finally:
        await dep.stop()
        for actor in [*dep.prefill.values(), *dep.decode.values()]:
            ray.kill(actor, no_restart=True)
        await asyncio.sleep(3.0)           # let the actor processes exit and free the GPU


def part_serve(s: Any) -> dict:
    import ray
    path = ensure_model_dir(s)
    s.hf_model = None              # the driver needs no model from here on
    release(s.dev)
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH", "")) if p)   # actors import the repo
    from pdserve.cluster import init_ray
    init_ray(num_cpus=8 if s.dev.type == "cuda" else 2, num_gpus=1 if s.dev.type == "cuda" else 0,
             include_dashboard=False, ignore_reinit_error=True, logging_level=logging.WARNING)
    n, prompt, output = s.shapes.serve
    out: dict[str, Any] = {"requests_per_rate": n, "prompt_len": prompt, "output_len": output,
                           "modes": []}
    async def both() -> None:
        # Colocated first: deploy_ray's placement group for the ipc pair is not removed
        # by Deployment.stop and would hold the GPU against a later colocated actor.
        for mode in ("colocated", "disaggregated"):
            try:
                # a stuck deployment must not eat the whole run: bounded by the part's time
                out["modes"].append(await asyncio.wait_for(_serve_mode(s, path, mode),
                                                           max(30.0, s.part_left())))
            except Exception as e:  # noqa: BLE001 - keep the other mode's figures
                logger.exception("serving mode %s failed", mode)
                out["modes"].append({"mode": mode, "error": f"{type(e).__name__}: {e}"[:2000],
                                     "rows": []})

    try:
        asyncio.run(both())
    finally:
        ray.shutdown()
    out["disaggregated_transport"] = next(
        (m.get("transport") for m in out["modes"] if m["mode"] == "disaggregated"), None)
    by = {m["mode"]: {r["rate"]: r for r in m["rows"] if "ttft_median_ms" in r} for m in out["modes"]}
    out["ttft_ratio_disagg_vs_colocated"] = {
        str(rate): by["disaggregated"][rate]["ttft_median_ms"] / by["colocated"][rate]["ttft_median_ms"]
        for rate in s.shapes.rates
        if rate in by.get("disaggregated", {}) and rate in by.get("colocated", {})}
    if "idle" in by.get("disaggregated", {}) and "idle" in by.get("colocated", {}):
        out["ttft_ratio_idle"] = (by["disaggregated"]["idle"]["ttft_median_ms"]
                                  / by["colocated"]["idle"]["ttft_median_ms"])
    return out
