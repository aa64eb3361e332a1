"""Probe: does the decode kernel's loop body keep it under SDPA (bs >= 32, ctx >= 4k)?

Session 9's head-major pages and session 10's TMA page loads and in-order blocks ruled out
the layout and the fetch. What is left is the loop itself. pdserve's split kernel puts the
GQA group on the dot's M side: two M = 16 dots a tile with 4 real rows, which Triton
lowers to mma.sync fed from registers, plus a masked load, a masked score and the online
softmax on every tile. This probe times, with the inputs and timing of gpu_suite part b
(CUDA-graph replays over rotated copies), against torch SDPA:

- ``pdserve``: the shipped kernel and its choice of tiles and splits;
- ``loop``: the same maths as a variant kernel with two switches,
  TRANS: positions on M (S^T = K Q^T is [BLOCK_N, 16], O^T = V^T P^T is [D, 16]), so
  both dots have M a multiple of 64 and Triton can issue Hopper's wgmma on them;
  UNMASKED: whole tiles run a main loop with no masks, and only the last, ragged tile
  is masked;
- over BLOCK_N x warps x stages x split counts.

    python benchmarks/decode_loop_probe.py [--out OUT.json] [--quick]
    python benchmarks/decode_loop_probe.py --ceilings      # read-only kernels, PDL
    python benchmarks/decode_loop_probe.py --addressing    # paged vs block ids 1-2 tiles ahead vs dense
    python benchmarks/decode_loop_probe.py --ab [--shapes 128x512,64x512] [--reps 3] [--splits 1,2,4] [--tiles 128x4x2] [--heads-first 0|1]
    python benchmarks/decode_loop_probe.py --pages [--shapes ...] [--head-major]  # pages 16-128
    python benchmarks/decode_loop_probe.py --grid [--shapes ...] [--reps 4]  # heads-first grid, evict_first
    TRITON_INTERPRET=1 python benchmarks/decode_loop_probe.py --check   # CPU, small shapes

The answer goes into benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))     # gpu_suite_parts

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from pdserve.kernels import triton_attention as ta  # noqa: E402
from pdserve.kernels.pdl import pdl_prologue  # noqa: E402

_LOG2E = 1.4426950408889634


@triton.jit
def _tile(q, k_ptr, v_ptr, bt_row, n0, end, kvh, m_i, l_i, acc, scale_log2,
          stride_cb, stride_cs, stride_ch, offs_n, offs_d,
          PAGE: tl.constexpr, MASKED: tl.constexpr, TRANS: tl.constexpr):
    """One online-softmax step over positions [n0, n0 + BLOCK_N). TRANS: q is [D, G],
    acc [D, G], m/l [G]; else q [G, D], acc [G, D]."""
    pos = n0 + offs_n
    pmask = pos < end
    if MASKED:
        blk = tl.load(bt_row + pos // PAGE, mask=pmask, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + pos // PAGE).to(tl.int64)
    kv = blk * stride_cb + (pos % PAGE) * stride_cs + kvh * stride_ch
    if not TRANS:   # pdserve's own tile step
        m_new, l_i, acc = ta._decode_tile(q, k_ptr, v_ptr, kv, pmask, m_i, l_i, acc, scale_log2, offs_d,
                                          offs_d < offs_d.shape[0], MASKED, False, "tf32")
    else:
        ptr = kv[:, None] + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptr + ptr, mask=pmask[:, None], other=0.0)
            v = tl.load(v_ptr + ptr, mask=pmask[:, None], other=0.0)
        else:
            k = tl.load(k_ptr + ptr)
            v = tl.load(v_ptr + ptr)
        s = tl.dot(k, q) * scale_log2                                      # [N, G]
        if MASKED:
            s = tl.where(pmask[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha[None, :] + tl.dot(tl.trans(v), p.to(v.dtype))    # [D, G]
    return m_new, l_i, acc


@triton.jit
def _loop_split_kernel(
    q_ptr, k_ptr, v_ptr, seq_lens_ptr, bt_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    scale_log2, num_splits,
    stride_qb, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt, stride_ob, stride_oh,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, ONE_SPLIT: tl.constexpr, TRANS: tl.constexpr, UNMASKED: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_prologue(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    start, end = ta.split_range(seq_len, split, num_splits, BLOCK_N)
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    gmask = offs_g < G
    heads = kvh * G + offs_g
    b64 = b.to(tl.int64)
    q_row = q_ptr + b64 * stride_qb
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    if TRANS:
        q = tl.load(q_row + heads[None, :] * stride_qh + offs_d[:, None], mask=gmask[None, :], other=0.0)
        acc = tl.zeros([HEAD_DIM, BLOCK_G], tl.float32)
    else:
        q, heads, gmask = ta.load_group_q(q_ptr, b64, kvh, stride_qb, stride_qh, G, BLOCK_G, HEAD_DIM, HEAD_DIM)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    bt_row = bt_ptr + b64 * stride_bt
    if UNMASKED:
        full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
        for n0 in range(start, full_end, BLOCK_N):
            m_i, l_i, acc = _tile(q, k_ptr, v_ptr, bt_row, n0, end, kvh, m_i, l_i, acc, scale_log2,
                                  stride_cb, stride_cs, stride_ch, offs_n, offs_d, PAGE, False, TRANS)
        if full_end < end:
            m_i, l_i, acc = _tile(q, k_ptr, v_ptr, bt_row, full_end, end, kvh, m_i, l_i, acc,
                                  scale_log2, stride_cb, stride_cs, stride_ch, offs_n, offs_d,
                                  PAGE, True, TRANS)
    else:
        for n0 in range(start, end, BLOCK_N):
            m_i, l_i, acc = _tile(q, k_ptr, v_ptr, bt_row, n0, end, kvh, m_i, l_i, acc, scale_log2,
                                  stride_cb, stride_cs, stride_ch, offs_n, offs_d, PAGE, True, TRANS)
    if TRANS:
        o_off = heads[None, :] * stride_oh + offs_d[:, None]
        omask = gmask[None, :]
        lb = l_i[None, :]
    else:
        o_off = heads[:, None] * stride_oh + offs_d[None, :]
        omask = gmask[:, None]
        lb = l_i[:, None]
    if ONE_SPLIT:
        out = acc / tl.where(lb > 0, lb, 1.0)
        tl.store(out_ptr + b64 * stride_ob + o_off, out.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        num_heads = tl.num_programs(1) * G
        row = (b64 * num_heads + heads) * num_splits + split
        tl.store(part_m_ptr + row, m_i, mask=gmask)
        tl.store(part_l_ptr + row, l_i, mask=gmask)
        if TRANS:
            tl.store(part_acc_ptr + row[None, :] * HEAD_DIM + offs_d[:, None], acc, mask=omask)
        else:
            tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=omask)


@triton.jit
def _gather_read_kernel(k_ptr, v_ptr, seq_lens_ptr, bt_ptr, out_ptr, num_splits,
                        stride_cb, stride_cs, stride_ch, stride_bt,
                        HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Reads each (sequence, kv head, split)'s K and V through the block table, as the
    decode kernel does, and does nothing with them but a sum: the gather's read ceiling."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    start, end = ta.split_range(seq_len, split, num_splits, BLOCK_N)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    acc = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    for n0 in range(start, full_end, BLOCK_N):
        pos = n0 + offs_n
        blk = tl.load(bt_row + pos // PAGE).to(tl.int64)
        ptr = (blk * stride_cb + (pos % PAGE) * stride_cs + kvh * stride_ch)[:, None] + offs_d[None, :]
        acc += tl.load(k_ptr + ptr).to(tl.float32) + tl.load(v_ptr + ptr).to(tl.float32)
    tl.store(out_ptr + ((b * tl.num_programs(1) + kvh) * num_splits + split), tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def _dense_read_kernel(k_ptr, v_ptr, out_ptr, seq_len, num_splits, stride_b, stride_h, stride_s,
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """The same bytes from SDPA's contiguous [B, Hkv, S, D] K and V, same grid."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    start, end = ta.split_range(seq_len, split, num_splits, BLOCK_N)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    base = b.to(tl.int64) * stride_b + kvh * stride_h
    acc = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    for n0 in range(start, full_end, BLOCK_N):
        ptr = base + (n0 + offs_n)[:, None].to(tl.int64) * stride_s + offs_d[None, :]
        acc += tl.load(k_ptr + ptr).to(tl.float32) + tl.load(v_ptr + ptr).to(tl.float32)
    tl.store(out_ptr + ((b * tl.num_programs(1) + kvh) * num_splits + split), tl.sum(tl.sum(acc, 1), 0))


@triton.jit
def _addr_kernel(
    q_ptr, k_ptr, v_ptr, seq_lens_ptr, bt_ptr, out_ptr, scale_log2,
    stride_qb, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt, stride_ob, stride_oh,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, DENSE: tl.constexpr, PREFETCH: tl.constexpr, READ_ONLY: tl.constexpr,
):
    """One split, whole tiles, no masks (the probe's lengths are multiples of BLOCK_N).
    DENSE: K/V are SDPA's contiguous [B, Hkv, S, D] (strides b, s, h in cb, cs, ch) and no
    block table is read. PREFETCH (1 or 2): each tile's block ids are loaded 1 or 2 tiles ahead, so a
    K/V address never waits on the block-table load of its own iteration. READ_ONLY: the
    tiles are summed instead of attended to (out gets one float per program)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)
    q, heads, gmask = ta.load_group_q(q_ptr, b64, kvh, stride_qb, stride_qh, G, BLOCK_G, HEAD_DIM, HEAD_DIM)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    racc = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    bt_row = bt_ptr + b64 * stride_bt
    base = b64 * stride_cb + kvh * stride_ch
    blk = tl.load(bt_row + offs_n // PAGE).to(tl.int64)
    blk2 = tl.load(bt_row + (offs_n + BLOCK_N) // PAGE, mask=offs_n + BLOCK_N < seq_len, other=0).to(tl.int64)
    for n0 in range(0, seq_len, BLOCK_N):
        pos = n0 + offs_n
        if DENSE:
            kv = base + pos.to(tl.int64) * stride_cs
        elif PREFETCH == 2:     # two tiles ahead: tile i's ids were loaded in iteration i - 2
            kv = blk * stride_cb + (pos % PAGE) * stride_cs + kvh * stride_ch
            blk = blk2
            nxt = pos + 2 * BLOCK_N
            blk2 = tl.load(bt_row + nxt // PAGE, mask=nxt < seq_len, other=0).to(tl.int64)
        elif PREFETCH:
            kv = blk * stride_cb + (pos % PAGE) * stride_cs + kvh * stride_ch
            nxt = pos + BLOCK_N
            blk = tl.load(bt_row + nxt // PAGE, mask=nxt < seq_len, other=0).to(tl.int64)
        else:
            kv = tl.load(bt_row + pos // PAGE).to(tl.int64) * stride_cb + (pos % PAGE) * stride_cs \
                + kvh * stride_ch
        if READ_ONLY:
            ptr = kv[:, None] + offs_d[None, :]
            racc += tl.load(k_ptr + ptr).to(tl.float32) + tl.load(v_ptr + ptr).to(tl.float32)
        else:
            m_i, l_i, acc = ta._decode_tile(q, k_ptr, v_ptr, kv, pos < seq_len, m_i, l_i, acc, scale_log2,
                                            offs_d, offs_d < HEAD_DIM, False, False, "tf32")
    if READ_ONLY:
        tl.store(out_ptr + b64 * stride_ob + kvh * G * stride_oh, tl.sum(tl.sum(racc, 1), 0).to(out_ptr.dtype.element_ty))
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gmask[:, None])


def addr_decode(q, k, v, seq_lens, block_tables, scale, dense, prefetch, read_only=False,
                block_n=128, num_warps=4, num_stages=3):
    """_addr_kernel: k, v are paged caches, or with dense=True SDPA's [B, Hkv, S, D]."""
    bsz, hq, d = q.shape
    hkv = k.shape[1] if dense else k.shape[2]
    out = torch.empty_like(q)
    if dense:
        strides = (k.stride(0), k.stride(2), k.stride(1))
    else:
        strides = (k.stride(0), k.stride(1), k.stride(2))
    _addr_kernel[(bsz, hkv)](
        q, k, v, seq_lens, block_tables, out, scale * _LOG2E, q.stride(0), q.stride(1), *strides,
        block_tables.stride(0), out.stride(0), out.stride(1),
        G=hq // hkv, HEAD_DIM=d, PAGE=16, BLOCK_G=max(16, triton.next_power_of_2(hq // hkv)),
        BLOCK_N=block_n, DENSE=dense, PREFETCH=prefetch, READ_ONLY=read_only,
        num_warps=num_warps, num_stages=num_stages)
    return out


def gather_read(k_cache, v_cache, seq_lens, block_tables, num_splits, block_n, num_warps, num_stages):
    bsz, hkv, d = seq_lens.shape[0], k_cache.shape[2], k_cache.shape[3]
    out = torch.empty(bsz * hkv * num_splits, dtype=torch.float32, device=k_cache.device)
    _gather_read_kernel[(bsz, hkv, num_splits)](
        k_cache, v_cache, seq_lens, block_tables, out, num_splits,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        HEAD_DIM=d, PAGE=k_cache.shape[1], BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    return out


def dense_read(k, v, num_splits, block_n, num_warps, num_stages):
    bsz, hkv, s, d = k.shape
    out = torch.empty(bsz * hkv * num_splits, dtype=torch.float32, device=k.device)
    _dense_read_kernel[(bsz, hkv, num_splits)](
        k, v, out, s, num_splits, k.stride(0), k.stride(1), k.stride(2),
        HEAD_DIM=d, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    return out


def loop_decode(q, k_cache, v_cache, seq_lens, block_tables, scale, num_splits, trans, unmasked,
                block_n=64, num_warps=4, num_stages=3, info=None, pdl=False):
    bsz, hq, d = q.shape
    hkv = k_cache.shape[2]
    g = hq // hkv
    out = torch.empty_like(q)
    one = num_splits == 1
    part_m, part_l, part_acc = ta.split_scratch(out, num_splits)
    compiled = _loop_split_kernel[(bsz, hkv, num_splits)](
        q, k_cache, v_cache, seq_lens, block_tables, out, part_m, part_l, part_acc,
        scale * _LOG2E, num_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        G=g, HEAD_DIM=d, PAGE=k_cache.shape[1], BLOCK_G=max(16, triton.next_power_of_2(g)),
        BLOCK_N=block_n, ONE_SPLIT=one, TRANS=trans, UNMASKED=unmasked,
        num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}),
        **({"PDL": True, "launch_pdl": True} if pdl else {}))
    if info is not None and compiled is not None and hasattr(compiled, "asm"):
        ptx = compiled.asm.get("ptx", "")
        info["wgmma"] = "wgmma" in ptx
        info["mma_sync"] = "mma.sync" in ptx
        info["cp_async"] = "cp.async" in ptx
    if not one:
        ta.reduce_splits(part_m, part_l, part_acc, out)
    return out


def check() -> int:
    """Every variant against the torch reference on ragged lengths (interpreter or GPU)."""
    from gpu_suite_parts import ragged_decode_case
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    q, k_cache, v_cache, seq_lens, bt, scale, ref = ragged_decode_case(dev, dtype)
    worst = 0.0
    for trans, unmasked, splits, block_n in itertools.product((False, True), (False, True), (1, 3), (16, 32)):
        out = loop_decode(q, k_cache, v_cache, seq_lens, bt, scale, splits, trans, unmasked, block_n)
        err = float((out.float() - ref).abs().max())
        worst = max(worst, err)
        print(f"trans {trans:d} unmasked {unmasked:d} splits {splits} BLOCK_N {block_n}: "
              f"max abs err {err:.2e}", flush=True)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    print("OK" if worst < tol else f"FAIL (worst {worst:.2e} >= {tol})")
    return 0 if worst < tol else 1


def _run_variants(variants: list, us, ref: torch.Tensor) -> list[dict]:
    """Times each (record, check, fn): fn(i) runs on copy i; check compares fn(0) with ref."""
    from gpu_suite_parts import rel_err
    runs = []
    for rec, check, fn in variants:
        try:
            err = rel_err(fn(0), ref) if check else 0.0
            runs.append({**rec, "us": us(fn), "err": err})
        except Exception as e:  # noqa: BLE001 - a variant that does not compile or fit
            runs.append({**rec, "error": f"{type(e).__name__}: {str(e)[:160]}"})
    return runs


def _print_best(c, row: dict, keys: tuple[str, ...]) -> None:
    """SDPA and pdserve, then each kind's best run and all its runs, as TB/s and xSDPA."""
    sdpa = min(row["sdpa_us"], row["sdpa_us_2"])
    tbs = lambda t: c.kv_bytes / t / 1e6  # noqa: E731
    print(f"bs {c.bs:4d} ctx {c.ctx:6d}: SDPA {row['sdpa_us']:8.1f}/{row['sdpa_us_2']:8.1f} us "
          f"({tbs(sdpa):.2f} TB/s) | pdserve {row['pdserve_us']:8.1f} ({sdpa / row['pdserve_us']:.3f}x)",
          flush=True)
    runs = row["runs"]
    for kind in dict.fromkeys(r["kind"] for r in runs):
        mine = sorted((r for r in runs if r["kind"] == kind and "us" in r), key=lambda r: r["us"])
        bad = [r for r in runs if r["kind"] == kind and "error" in r]
        if mine:
            b = mine[0]
            cfg = lambda r: "/".join(str(r[k]) for k in keys)  # noqa: E731
            print(f"     {kind:20s} best {b['us']:8.1f} us ({tbs(b['us']):.2f} TB/s, {sdpa / b['us']:.3f}x "
                  f"SDPA) {cfg(b)} err {b['err']:.1e} | all: "
                  + " ".join(f"{cfg(r)}:{r['us']:.1f}" for r in sorted(mine, key=cfg)), flush=True)
        if bad:
            print(f"     {kind:20s} failed: {bad[0]}", flush=True)


def _save(out_path: str, results: list) -> None:
    """After every shape, so a run cut short keeps what it measured."""
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(results, indent=1, default=str))


def _cases(shapes: list, label: str):
    """For each (bs, ctx): part b's inputs (GQA 32/8, d 128, bf16), a timer over their
    rotated copies, SDPA's output on copy 0, and a row with SDPA's and pdserve's times."""
    from gpu_suite_parts import DecodeCase, per_call_ms
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    print(f"{torch.cuda.get_device_name()} | triton {triton.__version__} | {label}", flush=True)
    for bs, ctx in shapes:
        c = DecodeCase.make(bs, ctx, 32, 8, 128, gen, dev)

        def us(fn, c=c) -> float:
            return per_call_ms([lambda i=i: fn(i) for i in range(c.copies)], dev)[0] * 1e3

        row = {"bs": bs, "ctx": ctx, "kv_bytes": c.kv_bytes, "sdpa_us": us(c.sdpa),
               "pdserve_us": us(lambda i, c=c: ta.decode_attention(
                   c.q[i], c.k_cache, c.v_cache, c.seq_lens, c.tables(i), c.scale, max_seq_len=c.ctx))}
        yield c, us, c.sdpa(0), row
        del c, us
        torch.cuda.empty_cache()


def ceilings(out_path: str) -> int:
    """Where the time goes at the goal's shapes: the same bytes read with no maths (through
    the block table, and dense from SDPA's contiguous K/V), and the unmasked loop with and
    without programmatic dependent launch, each beside SDPA."""
    tiles = [(64, 3), (64, 4), (128, 2), (128, 3), (128, 4)]
    results = []
    for c, us, ref, row in _cases([(32, 4096), (32, 32768), (128, 4096), (8, 4096), (1, 32768)], "ceilings"):
        bs = c.bs
        splits0 = ta.choose_num_splits(bs, c.k.shape[1], c.ctx, c.q.device)
        split_set = sorted({1, splits0}) if bs >= 32 else [splits0]
        row["splits"] = splits0
        variants = []
        for (bn, st), sp in itertools.product(tiles, split_set):
            rec = {"block_n": bn, "stages": st, "splits": sp}
            variants += [
                ({"kind": "loop", **rec}, True, lambda i, bn=bn, st=st, sp=sp: loop_decode(
                    c.q[i], c.k_cache, c.v_cache, c.seq_lens, c.tables(i), c.scale, sp, False, True, bn, 4, st)),
                ({"kind": "loop_pdl", **rec}, True, lambda i, bn=bn, st=st, sp=sp: loop_decode(
                    c.q[i], c.k_cache, c.v_cache, c.seq_lens, c.tables(i), c.scale, sp, False, True, bn, 4, st,
                    pdl=True)),
                ({"kind": "gather_read", **rec}, False, lambda i, bn=bn, st=st, sp=sp: gather_read(
                    c.k_cache, c.v_cache, c.seq_lens, c.tables(i), sp, bn, 4, st)),
                ({"kind": "dense_read", **rec}, False, lambda i, bn=bn, st=st, sp=sp: dense_read(
                    c.k[i * bs:(i + 1) * bs], c.v[i * bs:(i + 1) * bs], sp, bn, 4, st)),
            ]
        row["runs"] = _run_variants(variants, us, ref)
        row["sdpa_us_2"] = us(c.sdpa)
        _print_best(c, row, ("block_n", "stages", "splits"))
        results.append(row)
        _save(out_path, results)
    return 0


def addressing(out_path: str) -> int:
    """Same loop, one split, at the goal's shapes: K/V through the block table as pdserve
    reads them, with the block ids loaded a tile ahead, and from SDPA's dense tensors."""
    tiles = [(64, 3), (64, 4), (128, 2), (128, 3), (128, 4)]
    kinds = [("paged", False, 0), ("paged_prefetch", False, 1), ("paged_prefetch2", False, 2),
             ("dense", True, 0)]
    results = []
    for c, us, ref, row in _cases([(32, 4096), (32, 32768), (128, 4096), (128, 32768), (128, 512)],
                                  "addressing"):
        bs = c.bs
        variants = []
        for (bn, st), (kind, dense, pre), ro in itertools.product(tiles, kinds, (False, True)):
            def fn(i, bn=bn, st=st, dense=dense, pre=pre, ro=ro):
                kk = c.k[i * bs:(i + 1) * bs] if dense else c.k_cache
                vv = c.v[i * bs:(i + 1) * bs] if dense else c.v_cache
                return addr_decode(c.q[i], kk, vv, c.seq_lens, c.tables(i), c.scale, dense, pre, ro,
                                   bn, 4, st)
            variants.append(({"kind": kind + ("_read" if ro else ""), "block_n": bn, "stages": st},
                             not ro, fn))
        row["runs"] = _run_variants(variants, us, ref)
        row["sdpa_us_2"] = us(c.sdpa)
        _print_best(c, row, ("block_n", "stages"))
        results.append(row)
        _save(out_path, results)
    return 0


def compiled_info(fn) -> list[dict]:
    """Shared memory and registers of each compiled variant of a jit function (what bounds
    CTAs per SM), from Triton's in-process cache; [] where this Triton keeps it elsewhere."""
    found = []

    def walk(x, depth=0):
        if depth > 4:
            return
        if hasattr(x, "metadata") and hasattr(x, "n_regs"):
            md = x.metadata
            found.append({"shared": getattr(md, "shared", None), "n_regs": x.n_regs,
                          "num_warps": getattr(md, "num_warps", None),
                          "num_stages": getattr(md, "num_stages", None),
                          "name": getattr(md, "name", "")})
        elif isinstance(x, dict):
            for v in x.values():
                walk(v, depth + 1)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v, depth + 1)
    for attr in ("device_caches", "cache"):
        walk(getattr(fn, attr, None))
    return found


def _median(xs: list) -> float:
    return sorted(xs)[len(xs) // 2]


def _interleaved(configs: list, call, us, sdpa, ref, reps: int) -> tuple[dict, dict, list]:
    """Each config's error against ref, then `reps` rounds timing SDPA and every config in
    turn, so that drift hits all alike: (errs, times per config, SDPA times)."""
    from gpu_suite_parts import rel_err
    errs = {cfg: rel_err(call(cfg, 0), ref) for cfg in configs}
    times: dict = {cfg: [] for cfg in configs}
    sdpa_us = []
    for _ in range(reps):
        sdpa_us.append(us(sdpa))
        for cfg in configs:
            times[cfg].append(us(lambda i, cfg=cfg: call(cfg, i)))
    return errs, times, sdpa_us


def ab(out_path: str, reps: int, shapes: list | None = None, splits: list | None = None,
       tiles: list | None = None, heads_first: bool | None = None) -> int:
    """The shipped kernel (block ids a tile ahead) against the same loop with every tile
    masked (the kernel before it) and unmasked without the look-ahead, over a few tiles
    and two split rules (~2 waves, as choose_num_splits, and ~1 wave), every config timed
    `reps` times in interleaved rounds so that drift hits all variants alike."""
    hkv = 8
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{sms} SMs, {reps} rounds", flush=True)
    tiles = tiles or ([(64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 4, 3)] if shapes is None else
                      [(64, 4, 3), (64, 4, None), (128, 4, 2), (32, 4, 3)])
    results = []
    for c, us, ref, _ in _cases(shapes or [(32, 4096), (32, 32768), (128, 4096), (128, 32768), (8, 4096),
                                           (1, 32768)], "A/B"):
        bs, ctx = c.bs, c.ctx
        two = ta.choose_num_splits(bs, hkv, ctx, c.q.device)
        one = max(1, min(triton.cdiv(sms, bs * hkv), triton.cdiv(ctx, 128), 64))
        configs = []
        for (bn, w, st), sp in itertools.product(tiles, sorted(set(splits or ()) | {one, two})):
            configs.append(("masked", bn, w, st, sp))
            configs.append(("unmasked", bn, w, st, sp))
            configs.append(("ahead", bn, w, st, sp))
        configs.append(("ahead", None, None, None, two))   # the shipped defaults

        def call(cfg, i):
            kind, bn, w, st, sp = cfg
            if kind == "ahead":
                return ta.decode_attention(c.q[i], c.k_cache, c.v_cache, c.seq_lens, c.tables(i), c.scale,
                                           num_splits=sp, tiles=None if bn is None else (bn, w, st),
                                           heads_first=heads_first)
            return loop_decode(c.q[i], c.k_cache, c.v_cache, c.seq_lens, c.tables(i), c.scale, sp,
                               False, kind == "unmasked", bn, w, st)

        errs, times, sdpa = _interleaved(configs, call, us, c.sdpa, ref, reps)
        med = _median
        s_us = med(sdpa)
        rows = [{"kind": k, "tile": None if bn is None else [bn, w, st], "splits": sp,
                 "us": med(times[(k, bn, w, st, sp)]), "all_us": times[(k, bn, w, st, sp)],
                 "err": errs[(k, bn, w, st, sp)]} for (k, bn, w, st, sp) in configs]
        results.append({"bs": bs, "ctx": ctx, "sdpa_us": s_us, "sdpa_all_us": sdpa,
                        "splits_2wave": two, "splits_1wave": one, "rows": rows})
        print(f"bs {bs:4d} ctx {ctx:6d}: SDPA median {s_us:8.1f} us (rounds "
              + "/".join(f"{x:.1f}" for x in sdpa) + f"); splits 2-wave {two}, 1-wave {one}", flush=True)
        for kind in ("masked", "unmasked", "ahead"):
            mine = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["us"])
            b = mine[0]
            print(f"     {kind:9s} best {b['us']:8.1f} us ({s_us / b['us']:.3f}x) tile {b['tile']} splits "
                  f"{b['splits']} | " + " ".join(f"{r['tile']}/{r['splits']}:{s_us / r['us']:.3f}"
                                               for r in sorted(mine, key=lambda r: (str(r['tile']), r['splits']))),
                  flush=True)
        default = next(r for r in rows if r["tile"] is None)
        print(f"     shipped defaults {default['us']:8.1f} us ({s_us / default['us']:.3f}x), "
              f"max err {max(r['err'] for r in rows):.1e}", flush=True)
        _save(out_path, results)
    info = compiled_info(ta._decode_split_kernel)
    for i in info:
        print("compiled decode kernel:", i, flush=True)
    results.append({"compiled": info})
    _save(out_path, results)
    return 0


def pages(out_path: str, reps: int, shapes: list | None = None, head_major: bool = False) -> int:
    """The shipped kernel on the same K/V paged at 16, 32, 64 and 128 positions a block
    (random block order each), beside SDPA timed again for every page size: how much of the
    gap to SDPA is the page size. Tiles: the shipped choice and a few fixed ones, at the
    shipped split count and at one split. head_major: each block stored [Hkv, page, D]
    (passed to the kernel as a permuted view, so only the strides change), which at page
    128 makes a tile of one kv head one contiguous 32 KiB run, as in SDPA's K/V."""
    from gpu_suite_parts import paged_copy
    gen = torch.Generator(device="cuda").manual_seed(1)
    results = []
    for c, us, ref, row in _cases(shapes or [(32, 4096), (32, 32768), (128, 4096), (128, 32768),
                                             (128, 512), (1, 32768)], "page sizes"):
        bs, ctx = c.bs, c.ctx
        shipped = ta.choose_num_splits(bs, 8, ctx, c.q.device)
        row["page_runs"] = []
        del c.k_cache, c.v_cache
        torch.cuda.empty_cache()
        for page in (16, 32, 64, 128):
            kc, vc, bt = paged_copy(c.k, c.v, gen, page, "head" if head_major else "token")
            configs = [(tile, sp) for tile in (None, (64, 4, 3), (128, 4, 2), (128, 4, 3))
                       for sp in sorted({shipped, 1})]

            def call(cfg, i, kc=kc, vc=vc, bt=bt):
                tile, sp = cfg
                return ta.decode_attention(c.q[i], kc, vc, c.seq_lens, bt[i * bs:(i + 1) * bs], c.scale,
                                           num_splits=sp, tiles=tile)

            errs, times, sdpa = _interleaved(configs, call, us, c.sdpa, ref, reps)
            med = _median
            s_us = med(sdpa)
            runs = [{"tile": None if t is None else list(t), "splits": sp, "us": med(times[(t, sp)]),
                     "err": errs[(t, sp)]} for (t, sp) in configs]
            row["page_runs"].append({"page": page, "sdpa_us": s_us, "runs": runs})
            best = min(runs, key=lambda r: r["us"])
            dflt = next(r for r in runs if r["tile"] is None and r["splits"] == shipped)
            print(f"bs {bs:4d} ctx {ctx:6d} page {page:3d}: SDPA {s_us:8.1f} us | shipped "
                  f"{s_us / dflt['us']:.3f}x | best {s_us / best['us']:.3f}x tile {best['tile']} "
                  f"splits {best['splits']} | max err {max(r['err'] for r in runs):.1e}", flush=True)
            del kc, vc, bt
            torch.cuda.empty_cache()
        results.append(row)
        _save(out_path, results)
    return 0


def grid(out_path: str, reps: int, shapes: list | None = None) -> int:
    """The shipped kernel with its grid in the shipped order (sequences fastest) and with a
    sequence's kv heads as adjacent programs (heads_first: programs that run side by side
    then read neighbouring 4 KiB runs of the same head-major blocks), each with the K/V
    loads' default and evict_first L2 policy; and both orders at page 64. Every
    config timed `reps` times in rounds interleaved with SDPA."""
    from gpu_suite_parts import paged_copy, shipped_kv_layout
    gen = torch.Generator(device="cuda").manual_seed(2)
    layout = shipped_kv_layout()
    results = []
    for c, us, ref, row in _cases(shapes or [(32, 4096), (32, 32768), (128, 4096), (128, 32768),
                                             (128, 512), (8, 512), (8, 4096), (1, 32768)], "grid order"):
        bs = c.bs
        caches = {16: (c.k_cache, c.v_cache, None)}
        caches[64] = paged_copy(c.k, c.v, gen, 64, layout)
        configs = [(16, hf, ev) for hf in (False, True) for ev in ("", "evict_first")]
        configs += [(64, hf, "") for hf in (False, True)]

        def call(cfg, i):
            page, hf, ev = cfg
            kc, vc, bt = caches[page]
            tables = c.tables(i) if bt is None else bt[i * bs:(i + 1) * bs]
            return ta.decode_attention(c.q[i], kc, vc, c.seq_lens, tables, c.scale,
                                       max_seq_len=c.ctx, heads_first=hf, evict=ev)

        errs, times, sdpa = _interleaved(configs, call, us, c.sdpa, ref, reps)
        s_us = _median(sdpa)
        row["runs"] = [{"page": p, "heads_first": hf, "evict": ev, "us": _median(times[(p, hf, ev)]),
                        "err": errs[(p, hf, ev)]} for (p, hf, ev) in configs]
        row["sdpa_us"] = s_us
        cells = " | ".join(f"p{r['page']}{' hf' if r['heads_first'] else ''}"
                           f"{' ev' if r['evict'] else ''} {s_us / r['us']:.3f}" for r in row["runs"])
        print(f"bs {bs:4d} ctx {c.ctx:6d}: SDPA {s_us:8.1f} us | xSDPA {cells} | max err "
              f"{max(r['err'] for r in row['runs']):.1e}", flush=True)
        results.append(row)
        del caches
        _save(out_path, results)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fewer tile variants")
    ap.add_argument("--ceilings", action="store_true",
                    help="read-only kernels (gathered and dense) and PDL beside SDPA, not the sweep")
    ap.add_argument("--addressing", action="store_true",
                    help="one split, whole tiles: paged vs dense K/V, block ids a tile ahead")
    ap.add_argument("--ab", action="store_true",
                    help="masked loop vs unmasked vs the shipped kernel (block ids a tile ahead), "
                         "interleaved repeats")
    ap.add_argument("--pages", action="store_true",
                    help="the shipped kernel on K/V paged at 16, 32, 64 and 128 positions a block")
    ap.add_argument("--head-major", action="store_true", help="--pages only: blocks stored [Hkv, page, D]")
    ap.add_argument("--grid", action="store_true",
                    help="grid order (heads first) and evict_first K/V loads, interleaved repeats")
    ap.add_argument("--heads-first", choices=("0", "1"), default=None,
                    help="--ab only: the shipped kernel's grid order (default: the module's)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--splits", default="", help="--ab only: split counts to add, e.g. 1,2,4,8")
    ap.add_argument("--tiles", default="", help="--ab only: BLOCK_NxWARPSxSTAGES,... (e.g. 128x4x2)")
    ap.add_argument("--shapes", default="", help="--ab, --pages: BATCHxCONTEXT,... (default: the goal's and bs 1/8)")
    args = ap.parse_args()
    if args.check or os.environ.get("TRITON_INTERPRET") == "1":
        return check()
    if args.ceilings:
        return ceilings(args.out)
    if args.addressing:
        return addressing(args.out)
    shapes = [tuple(int(x) for x in sh.split("x")) for sh in args.shapes.split(",")] if args.shapes else None
    if args.ab:
        return ab(args.out, args.reps, shapes,
                  [int(x) for x in args.splits.split(",")] if args.splits else None,
                  [tuple(int(y) for y in t.split("x")) for t in args.tiles.split(",")] if args.tiles else None,
                  None if args.heads_first is None else args.heads_first == "1")
    if args.pages:
        return pages(args.out, args.reps, shapes, args.head_major)
    if args.grid:
        return grid(args.out, args.reps, shapes)
    from gpu_suite_parts import rel_err
    modes = [(t, u) for t in (False, True) for u in (False, True)]
    tiles = list(itertools.product((64, 128), (4, 8), (2, 3, 4)))
    if args.quick:
        tiles = [(64, 4, 3), (128, 4, 3), (64, 4, 4), (128, 8, 3)]
    results = []
    shapes = [(32, 4096), (32, 32768), (128, 4096), (128, 32768), (8, 4096), (1, 32768)]
    for c, us, ref, row in _cases(shapes, "loop body sweep"):
        bs, ctx = c.bs, c.ctx
        default_splits = ta.choose_num_splits(bs, 8, ctx, c.q.device)
        row["splits"] = default_splits

        def pdserve(i, c=c):
            return ta.decode_attention(c.q[i], c.k_cache, c.v_cache, c.seq_lens, c.tables(i),
                                       c.scale, max_seq_len=c.ctx)

        split_set = sorted({1, default_splits, 2 * default_splits})
        if bs < 32:
            split_set = [default_splits]
        sweep = []
        for (trans, unmasked), (block_n, warps, stages), splits in itertools.product(modes, tiles, split_set):
            cfg = {"trans": trans, "unmasked": unmasked, "block_n": block_n, "warps": warps,
                   "stages": stages, "splits": splits}
            try:
                info: dict = {}
                err = rel_err(loop_decode(c.q[0], c.k_cache, c.v_cache, c.seq_lens, c.tables(0),
                                          c.scale, splits, trans, unmasked, block_n, warps, stages,
                                          info), ref)
                t = us(lambda i, cf=cfg: loop_decode(
                    c.q[i], c.k_cache, c.v_cache, c.seq_lens, c.tables(i), c.scale, cf["splits"],
                    cf["trans"], cf["unmasked"], cf["block_n"], cf["warps"], cf["stages"]))
            except Exception as e:  # noqa: BLE001 - a variant that does not compile or fit
                sweep.append({**cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            sweep.append({**cfg, "us": t, "err": err, **info})
        row["sdpa_us_2"] = us(c.sdpa)
        row["pdserve_us_2"] = us(pdserve)
        sdpa = min(row["sdpa_us"], row["sdpa_us_2"])
        pd = min(row["pdserve_us"], row["pdserve_us_2"])
        ok = [r for r in sweep if "us" in r]
        row["wrong"] = sum(r["err"] > 2e-2 for r in ok)
        row["failed"] = [r for r in sweep if "error" in r][:3]
        row["best_by_mode"] = {}
        line = (f"bs {bs:4d} ctx {ctx:6d}: SDPA {row['sdpa_us']:8.1f}/{row['sdpa_us_2']:8.1f} us | "
                f"pdserve {row['pdserve_us']:8.1f}/{row['pdserve_us_2']:8.1f} ({sdpa / pd:.3f}x, "
                f"{default_splits} splits)")
        for trans, unmasked in modes:
            mine = sorted((r for r in ok if r["trans"] == trans and r["unmasked"] == unmasked),
                          key=lambda r: r["us"])
            if not mine:
                continue
            best = mine[0]
            key = f"trans{trans:d}_unmasked{unmasked:d}"
            row["best_by_mode"][key] = mine[:3]
            line += (f"\n     {key}: best {best['us']:8.1f} us ({sdpa / best['us']:.3f}x SDPA) "
                     f"N{best['block_n']} w{best['warps']} s{best['stages']} splits {best['splits']} "
                     f"wgmma {best.get('wgmma')} mma.sync {best.get('mma_sync')}")
        line += f"\n     wrong {row['wrong']} | failed {len(row['failed'])}"
        print(line, flush=True)
        for r in row["failed"][:1]:
            print("   first failure:", r, flush=True)
        results.append(row)
        _save(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
