"""Triton paged attention: split-KV decode and varlen causal prefill over the paged cache.

Same contracts as reference.py (layouts in metadata.py). How the kernels work:

* Both kernels read the context through the block table one tile of BLOCK_N positions at
  a time: each position's block id is gathered from the table (so a tile may straddle
  pages and any page size works) and K/V rows are loaded for ONE kv head. Every program
  handles all G = Hq / Hkv query heads of that kv head, so each K/V tile is loaded once
  per GQA group rather than once per query head.
* Softmax is online (flash-attention style) in fp32, in the log2 domain: scores are
  multiplied by scale * log2(e) and exponentiated with exp2.
* Decode (one query per sequence) is memory bound and has little parallelism at small
  batch, so the context is cut into ``num_splits`` partitions computed by separate
  programs; each writes its partial (max m, sum l, unnormalised acc) to fp32 scratch and a
  second kernel merges them: w_s = 2^(m_s - max m), out = sum w_s acc_s / sum w_s l_s.
* Prefill packs (query token, head of the group) pairs into the rows of one tile:
  row r = token r // BLOCK_G, head r % BLOCK_G. KV tiles that lie wholly after a query
  block's last position are never visited (causal skip); the diagonal is masked.

Block ids are widened to int64 before they meet a stride: block_id * block_stride passes
2**31 on caches over 2**31 elements (e.g. 1M blocks of 16 x 1 x 128).
"""
from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl
from torch import Tensor

from pdserve.kernels.metadata import AttentionMetadata
from pdserve.kernels.pdl import launch_args, pdl_prologue
from pdserve.kernels.triton_kv import check_runnable

logger = logging.getLogger(__name__)

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)
# Split-KV bounds. On an H100 (bf16, GQA 32/8, ctx 4096) bs=1 was fastest at 32 splits of
# 128 positions (1.8 TB/s vs 0.2 unsplit); shorter splits only add merge traffic.
_MIN_TOKENS_PER_SPLIT = 128
_MAX_SPLITS = 32
# Decode grid order and K/V eviction policy (decode_attention's heads_first / evict).
# A sequence's kv heads side by side (grid (Hkv, B, splits)): on an H100, page 16, it ran
# 1.004-1.005x SDPA at bs 128 / 4k-32k against 0.992-0.996x in sequence-first order, and
# level (0.984-0.988x against 0.983-0.992x) at bs 32 (decode_loop_probe.py --grid;
# RESULTS.md, "Session 16"). evict_first on the K/V loads changed nothing.
_HEADS_FIRST = True
_EVICT = ""


@triton.jit
def _kv_offsets(bt_row_ptr, pos, pmask, kvh, stride_cb, stride_cs, stride_ch,
                PAGE: tl.constexpr):
    """Element offsets [N] (int64) of context positions `pos` [N] of one sequence."""
    blk = tl.load(bt_row_ptr + pos // PAGE, mask=pmask, other=0).to(tl.int64)
    return blk * stride_cb + (pos % PAGE) * stride_cs + kvh * stride_ch


@triton.jit
def split_range(seq_len, split, num_splits, TILE: tl.constexpr):
    """[start, end) of split `split` of num_splits over seq_len positions, in whole tiles of
    TILE, so only the context's last tile is ragged; start >= end for an empty split."""
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), TILE) * TILE
    start = split * per_split
    return start, tl.minimum(start + per_split, seq_len)


@triton.jit
def load_group_q(q_ptr, b64, kvh, stride_qb, stride_qh, G: tl.constexpr, BLOCK_G: tl.constexpr,
                 BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Sequence b64's query rows [BLOCK_G, BLOCK_D] for kv head kvh's group (zeros past G
    and HEAD_DIM), with their head ids [BLOCK_G] and the group's row mask."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    gmask = offs_g < G
    heads = kvh * G + offs_g
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=gmask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    return q, heads, gmask


@triton.jit
def _decode_tile(q, k_ptr, v_ptr, kv, pmask, m_i, l_i, acc, scale_log2, offs_d, dmask,
                 MASKED: tl.constexpr, DMASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 EVICT: tl.constexpr = ""):
    """One online-softmax step of the decode kernel over one tile: kv [BLOCK_N] holds the
    element offsets of its positions. MASKED: positions outside `pmask` are skipped (the
    context's ragged last tile); DMASK: the head dim is padded to BLOCK_D. EVICT: the K/V
    loads' L2 eviction policy ("" = the default)."""
    ptr = kv[:, None] + offs_d[None, :]
    if MASKED:
        tmask = pmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + ptr, mask=tmask, other=0.0, eviction_policy=EVICT)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_ptr + ptr, mask=tmask, other=0.0, eviction_policy=EVICT)
    elif DMASK:
        k = tl.load(k_ptr + ptr, mask=dmask[None, :], other=0.0, eviction_policy=EVICT)
        v = tl.load(v_ptr + ptr, mask=dmask[None, :], other=0.0, eviction_policy=EVICT)
    else:
        k = tl.load(k_ptr + ptr, eviction_policy=EVICT)
        v = tl.load(v_ptr + ptr, eviction_policy=EVICT)
    # Padding rows of the group (g >= G) cost tensor-core work only, and decode is
    # bound by K/V bytes: on an H100 this padded dot beat a broadcast-multiply-sum
    # even at G=1 (3.0 vs 2.2 TB/s, bf16).
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_G, BLOCK_N]
    if MASKED:
        s = tl.where(pmask[None, :], s, float("-inf"))
    # A tile holds at least one valid position, so m_new is finite from the first tile on.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, seq_lens_ptr, bt_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    scale_log2, num_splits, max_blocks,
    stride_qb, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt, stride_ob, stride_oh,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr,        # G padded to a power of two >= 16 (tl.dot's minimum M)
    BLOCK_N: tl.constexpr,        # context positions per tile
    BLOCK_D: tl.constexpr,        # HEAD_DIM padded to a power of two >= 16 (tl.dot's K)
    ONE_SPLIT: tl.constexpr,      # write the normalised output directly, no scratch/reduce
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs so fp32 does not silently drop to tf32
    PDL: tl.constexpr,            # programmatic dependent launch (kernels/pdl.py)
    HEADS_FIRST: tl.constexpr = False,  # grid (Hkv, B, splits): a sequence's kv heads run side by side
    EVICT: tl.constexpr = "",     # K/V loads' L2 eviction policy
):
    pdl_prologue(PDL)
    if HEADS_FIRST:
        kvh = tl.program_id(0)
        b = tl.program_id(1)
        num_kv_heads = tl.num_programs(0)
    else:
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        num_kv_heads = tl.num_programs(1)
    split = tl.program_id(2)
    if ONE_SPLIT:
        start = 0
        end = tl.load(seq_lens_ptr + b)
    else:
        start, end = split_range(tl.load(seq_lens_ptr + b), split, num_splits, BLOCK_N)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    b64 = b.to(tl.int64)
    q, heads, gmask = load_group_q(q_ptr, b64, kvh, stride_qb, stride_qh, G, BLOCK_G, BLOCK_D, HEAD_DIM)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b64 * stride_bt
    head_off = kvh * stride_ch
    # Whole tiles run unmasked, and each tile's block ids are loaded one tile ahead, so
    # no K/V address waits on a block-table load of its own iteration. On an H200, with one
    # split of 128-position tiles, bs 32 / ctx 4k ran 0.982x SDPA against 0.956x for the
    # same tiles every one masked (decode_loop_probe.py --ab; RESULTS.md, "Session 11").
    # The ragged last tile, if any, runs masked.
    # An empty split (start >= end) runs no tile and reports m = -inf, l = 0.
    # The first tile's ids are bounded by the table's width, not by the length: with one
    # split (start = 0) they then load beside seq_len instead of after it, and K/V wait
    # on one load, not two. Ids past the length are never used for an address: whole
    # tiles end at or before it and the last tile masks its loads. That chain cost 5 us
    # of 77 at bs 128 / ctx 512 on an H200 (0.93-0.95x SDPA; RESULTS.md, "Session 12").
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    pos = start + offs_n
    blk = tl.load(bt_row + pos // PAGE, mask=pos // PAGE < max_blocks, other=0)
    for n0 in range(start, full_end, BLOCK_N):
        pos = n0 + offs_n
        kv = blk.to(tl.int64) * stride_cb + (pos % PAGE) * stride_cs + head_off
        nxt = pos + BLOCK_N
        blk = tl.load(bt_row + nxt // PAGE, mask=nxt < end, other=0)
        m_i, l_i, acc = _decode_tile(q, k_ptr, v_ptr, kv, nxt < end, m_i, l_i, acc, scale_log2,
                                     offs_d, dmask, False, BLOCK_D != HEAD_DIM, DOT_PRECISION, EVICT)
    if full_end < end:
        pos = full_end + offs_n
        kv = blk.to(tl.int64) * stride_cb + (pos % PAGE) * stride_cs + head_off
        m_i, l_i, acc = _decode_tile(q, k_ptr, v_ptr, kv, pos < end, m_i, l_i, acc, scale_log2,
                                     offs_d, dmask, True, BLOCK_D != HEAD_DIM, DOT_PRECISION, EVICT)

    if ONE_SPLIT:
        # l_i == 0 only for an empty context (a padded batch slot): write zeros, not NaN.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
    else:
        # Scratch is contiguous [B, Hq, num_splits(, HEAD_DIM)].
        num_heads = num_kv_heads * G
        row = (b64 * num_heads + heads) * num_splits + split  # [BLOCK_G]
        tl.store(part_m_ptr + row, m_i, mask=gmask)
        tl.store(part_l_ptr + row, l_i, mask=gmask)
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=gmask[:, None] & dmask[None, :])


@triton.jit
def _decode_reduce_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, num_splits, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,  # num_splits rounded up to a power of two
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    PDL: tl.constexpr,
):
    pdl_prologue(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    smask = offs_s < num_splits
    dmask = offs_d < HEAD_DIM
    row = (b * tl.num_programs(1) + h) * num_splits + offs_s  # [BLOCK_S]
    m = tl.load(part_m_ptr + row, mask=smask, other=float("-inf"))
    l = tl.load(part_l_ptr + row, mask=smask, other=0.0)
    acc = tl.load(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=smask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    m_max = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)  # empty splits weigh nothing
    l_tot = tl.sum(w * l, axis=0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(l_tot > 0, l_tot, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=dmask)


@triton.jit
def _prefill_tile(q, k_ptr, v_ptr, bt_row, n0, kv_end, q_pos, m_i, l_i, acc, scale_log2,
                  kvh, stride_cb, stride_cs, stride_ch, offs_n, offs_d, dmask,
                  PAGE: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over context positions [n0, n0 + BLOCK_N). MASKED=False is
    for tiles every row fully sees (wholly before the query block's first position): no
    causal or length masks, which is most tiles of a long prefill."""
    pos = n0 + offs_n
    if MASKED:
        pmask = pos < kv_end
        kv = _kv_offsets(bt_row, pos, pmask, kvh, stride_cb, stride_cs, stride_ch, PAGE)
        tmask = pmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + kv[:, None] + offs_d[None, :], mask=tmask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_ptr + kv[:, None] + offs_d[None, :], mask=tmask, other=0.0)  # [BLOCK_N, BLOCK_D]
    else:
        blk = tl.load(bt_row + pos // PAGE).to(tl.int64)
        kv = blk * stride_cb + (pos % PAGE) * stride_cs + kvh * stride_ch
        k = tl.load(k_ptr + kv[:, None] + offs_d[None, :], mask=dmask[None, :], other=0.0)
        v = tl.load(v_ptr + kv[:, None] + offs_d[None, :], mask=dmask[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    if MASKED:
        visible = (pos[None, :] <= q_pos[:, None]) & (pos < kv_end)[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row sees position 0 in the first tile whenever seq_len >= query_len; the guard
    # keeps a row with nothing visible yet (bad metadata) at 0 instead of NaN.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, scale_log2,
    stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt, stride_ot, stride_oh,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr,        # G rounded up to a power of two (row -> head is a bit split)
    BLOCK_Q: tl.constexpr,        # query tokens per program; BLOCK_M = BLOCK_Q * BLOCK_G rows
    BLOCK_M: tl.constexpr,        # rows of the score tile, >= 16 for tl.dot
    BLOCK_N: tl.constexpr,        # context positions per tile
    BLOCK_D: tl.constexpr,        # HEAD_DIM padded to a power of two >= 16
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs so fp32 does not silently drop to tf32
):
    qblk = tl.program_id(0)
    seq = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if qblk * BLOCK_Q >= q_len:  # grid is sized for the longest query; shorter ones stop here
        return
    ctx = tl.load(seq_lens_ptr + seq)
    prefix = ctx - q_len  # tokens already in the cache before this step's new ones

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    tok = qblk * BLOCK_Q + offs_m // BLOCK_G  # [BLOCK_M] index among the new tokens
    heads = kvh * G + offs_m % BLOCK_G
    rmask = (tok < q_len) & (offs_m % BLOCK_G < G)
    dmask = offs_d < HEAD_DIM
    qrow = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + qrow[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    q_pos = prefix + tok  # absolute context position of each row's token
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    # Causal skip: nothing after this query block's last position is ever visible.
    kv_end = tl.minimum(ctx, prefix + (qblk + 1) * BLOCK_Q)
    # Tiles ending at or before the block's first position are seen whole by every row.
    full_end = ((prefix + qblk * BLOCK_Q + 1) // BLOCK_N) * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _prefill_tile(q, k_ptr, v_ptr, bt_row, n0, kv_end, q_pos, m_i, l_i, acc,
                                      scale_log2, kvh, stride_cb, stride_cs, stride_ch, offs_n,
                                      offs_d, dmask, PAGE, False, DOT_PRECISION)
    for n0 in range(full_end, kv_end, BLOCK_N):
        m_i, l_i, acc = _prefill_tile(q, k_ptr, v_ptr, bt_row, n0, kv_end, q_pos, m_i, l_i, acc,
                                      scale_log2, kvh, stride_cb, stride_cs, stride_ch, offs_n,
                                      offs_d, dmask, PAGE, True, DOT_PRECISION)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + qrow[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def _check_paged(q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor,
                 block_tables: Tensor) -> tuple[int, int, int, int]:
    """Caller-mistake checks shared by both entry points; returns (Hq, Hkv, D, page)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError("k_cache and v_cache must both be [num_blocks, block_size, Hkv, D], "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    _, hq, d = q.shape
    _, page, hkv, dc = k_cache.shape
    if dc != d:
        raise ValueError(f"q head_dim {d} != cache head_dim {dc}")
    if hq % hkv != 0:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache, v_cache must share one dtype of {_DTYPES}; got "
                         f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last (head_dim) dimension")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache strides {k_cache.stride()} != v_cache strides {v_cache.stride()}")
    if seq_lens.dim() != 1 or seq_lens.dtype not in _INDEX_DTYPES:
        raise ValueError(f"seq_lens must be 1-D int32/int64, got {tuple(seq_lens.shape)} {seq_lens.dtype}")
    if (block_tables.dim() != 2 or block_tables.shape[0] != seq_lens.shape[0]
            or block_tables.dtype not in _INDEX_DTYPES):
        raise ValueError(f"block_tables must be [{seq_lens.shape[0]}, max_blocks] int32/int64, got "
                         f"{tuple(block_tables.shape)} {block_tables.dtype}")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables rows must be contiguous")
    check_runnable(q, k_cache, v_cache, seq_lens, block_tables)
    return hq, hkv, d, page


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    sms = torch.cuda.get_device_properties(device_index).multi_processor_count
    logger.debug("cuda:%d has %d SMs; split-KV decode aims at 2 waves below one of programs",
                 device_index, sms)
    return sms


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """One split once the (sequence, kv head) programs alone fill the SMs; below that,
    enough splits for ~2 waves, but never a split shorter than _MIN_TOKENS_PER_SPLIT
    positions. On an H200 (GQA 32/8, bs 32, ctx 4k-32k) one split of 128-position tiles
    ran 0.98x SDPA. The previous choice, 2 splits of 64, ran 0.95x with the old loop and
    0.77-0.80x once the block ids were loaded a tile ahead (decode_loop_probe.py --ab)."""
    by_len = max(1, triton.cdiv(max_seq_len, _MIN_TOKENS_PER_SPLIT))
    if device.type != "cuda":
        return min(2, by_len)  # interpreter: parallelism buys nothing, keep the reduce covered
    sms = _sm_count(device.index or 0)
    pairs = max(1, batch * num_kv_heads)
    if pairs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, pairs), by_len, _MAX_SPLITS))


def _decode_tiles(dtype: torch.dtype, head_dim: int, pairs: int, num_splits: int,
                  device: torch.device) -> tuple[int, int, int | None]:
    """(BLOCK_N, num_warps, num_stages or None for Triton's default) for decode over
    `pairs` (sequence, kv head) programs times num_splits. With one split over at least a
    wave of programs (16-bit, head dim <= 128), 128-position tiles with 2 stages: on an
    H200 they ran 0.98x SDPA at bs 32 (64 x 3 stages: 0.79-0.98x, depending on the split
    count) and 1.00x at bs 128 / 32k. At head dim 64 (Llama-3.2-1B, bs 64-128, ctx 1-2k)
    they took 72.8 us where BLOCK_N 32 x 2 stages, the earlier choice there, took 109.1.
    More than 2 stages of 128 positions stalls the ahead-loaded block ids (0.75-0.79x).
    Otherwise (split-KV, fp32, the interpreter) 64 x 4 warps, Triton's default stages:
    within 3% of the best of the H100 sweep for bs 1-8 (decode_attention_sweep.py)."""
    if (device.type == "cuda" and num_splits == 1 and pairs >= _sm_count(device.index or 0)
            and dtype != torch.float32 and head_dim <= 128):
        return 128, 4, 2
    return 64, 4, None


def _prefill_tiles(block_g: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for prefill. On CUDA with 16-bit inputs,
    128 x 64 with 4 warps and 3 K/V stages beat 8 warps, 64 x 64 and 128 x 128 on an H100
    (GQA 32/8, d 128, full and chunked prefill); 256-row tiles were faster still on long
    prompts but waste rows on the short queries of mixed steps. fp32 (whose [M, D] fp32
    operands double register and shared-memory use) and the interpreter take 64 x 32."""
    if device.type == "cuda" and dtype != torch.float32:
        return max(128, block_g), 64, 4, 3
    return max(64, block_g), 32, 4, 2


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def split_scratch(out: Tensor, num_splits: int) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 (m, l, acc) partials [B, Hq, num_splits(, D)] of a split-KV decode into `out`
    [B, Hq, D]; with one split, `out` three times (the ONE_SPLIT variant never reads them)."""
    if num_splits == 1:
        return out, out, out
    bsz, hq, d = out.shape
    part_m = torch.empty((bsz, hq, num_splits), dtype=torch.float32, device=out.device)
    part_acc = torch.empty((bsz, hq, num_splits, d), dtype=torch.float32, device=out.device)
    return part_m, torch.empty_like(part_m), part_acc


def reduce_splits(part_m: Tensor, part_l: Tensor, part_acc: Tensor, out: Tensor) -> None:
    """Merges split_scratch's partials into `out` (the decode reduce kernel)."""
    bsz, hq, num_splits = part_m.shape
    d = out.shape[2]
    _decode_reduce_kernel[(bsz, hq)](
        part_m, part_l, part_acc, out, num_splits, out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_S=triton.next_power_of_2(num_splits),
        BLOCK_D=triton.next_power_of_2(d), **launch_args(out.device),
    )


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor,
                     block_tables: Tensor, scale: float, num_splits: int | None = None,
                     max_seq_len: int | None = None,
                     tiles: tuple[int, int, int | None] | None = None,
                     heads_first: bool | None = None, evict: str | None = None) -> Tensor:
    """One query token per sequence. q: [B, Hq, D]; caches [num_blocks, page, Hkv, D];
    seq_lens: [B]; block_tables: [B, max_blocks]. Returns [B, Hq, D] in q's dtype.

    num_splits=None picks one from max_seq_len (read from seq_lens, a host sync, when not
    given), batch and SM count; pass it explicitly for CUDA-graph capture. A sequence of
    length 0 (a padded batch slot) gets zeros. `tiles` = (BLOCK_N, num_warps, num_stages
    or None for Triton's default) overrides _decode_tiles (benchmarks/decode_attention_sweep.py);
    heads_first (grid order: a sequence's kv heads as adjacent programs) and evict (the K/V
    loads' eviction policy) override _HEADS_FIRST and _EVICT (decode_loop_probe.py --grid)."""
    hq, hkv, d, page = _check_paged(q, k_cache, v_cache, seq_lens, block_tables)
    bsz = q.shape[0]
    if seq_lens.shape[0] != bsz:
        raise ValueError(f"decode needs one query per sequence: q has {bsz} rows, "
                         f"seq_lens {seq_lens.shape[0]}")
    out = torch.empty((bsz, hq, d), dtype=q.dtype, device=q.device)  # [B, Hq, D]
    if bsz == 0:
        return out
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max())
        num_splits = choose_num_splits(bsz, hkv, max_seq_len, q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    g = hq // hkv
    block_n, num_warps, num_stages = tiles or _decode_tiles(q.dtype, d, bsz * hkv, num_splits, q.device)
    extra = {} if num_stages is None else {"num_stages": num_stages}
    block_d = max(16, triton.next_power_of_2(d))
    one = num_splits == 1
    part_m, part_l, part_acc = split_scratch(out, num_splits)
    seq_lens = seq_lens.contiguous()
    heads_first = _HEADS_FIRST if heads_first is None else heads_first
    grid = (hkv, bsz, num_splits) if heads_first else (bsz, hkv, num_splits)
    _decode_split_kernel[grid](
        q, k_cache, v_cache, seq_lens, block_tables, out, part_m, part_l, part_acc,
        scale * _LOG2E, num_splits, block_tables.shape[1],
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        G=g, HEAD_DIM=d, PAGE=page, BLOCK_G=max(16, triton.next_power_of_2(g)),
        BLOCK_N=block_n, BLOCK_D=block_d, ONE_SPLIT=one, DOT_PRECISION=_dot_precision(q.dtype),
        HEADS_FIRST=heads_first, EVICT=_EVICT if evict is None else evict,
        num_warps=num_warps, **extra, **launch_args(q.device),
    )
    if not one:
        reduce_splits(part_m, part_l, part_acc, out)
    return out


def prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, query_start_loc: Tensor,
                      seq_lens: Tensor, block_tables: Tensor, scale: float,
                      max_query_len: int) -> Tensor:
    """Varlen causal attention over a paged context. q: [T, Hq, D], ragged by
    query_start_loc [B + 1]; sequence i's new tokens are the last query_len positions of
    its seq_lens[i]-token context. max_query_len must bound every query_len (it sizes the
    grid). Returns [T, Hq, D] in q's dtype."""
    hq, hkv, d, page = _check_paged(q, k_cache, v_cache, seq_lens, block_tables)
    bsz = seq_lens.shape[0]
    if query_start_loc.shape != (bsz + 1,) or query_start_loc.dtype not in _INDEX_DTYPES:
        raise ValueError(f"query_start_loc must be [{bsz + 1}] int32/int64, got "
                         f"{tuple(query_start_loc.shape)} {query_start_loc.dtype}")
    check_runnable(q, query_start_loc)
    out = torch.empty((q.shape[0], hq, d), dtype=q.dtype, device=q.device)  # [T, Hq, D]
    if bsz == 0 or max_query_len <= 0 or q.shape[0] == 0:
        return out
    g = hq // hkv
    block_g = triton.next_power_of_2(g)
    block_m, block_n, num_warps, num_stages = _prefill_tiles(block_g, q.dtype, q.device)
    _prefill_kernel[(triton.cdiv(max_query_len, block_m // block_g), bsz, hkv)](
        q, k_cache, v_cache, out, query_start_loc.contiguous(), seq_lens.contiguous(),
        block_tables, scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        G=g, HEAD_DIM=d, PAGE=page, BLOCK_G=block_g, BLOCK_Q=block_m // block_g,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata,
                    scale: float) -> Tensor:
    """Mixed step. A pure-decode step (one query row per sequence) takes the split-KV
    decode kernel; anything else, decode rows included, goes through the prefill kernel."""
    if meta.is_pure_decode and q.shape[0] == meta.num_seqs:
        return decode_attention(q, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale,
                                max_seq_len=meta.max_seq_len)
    return prefill_attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens,
                             meta.block_tables, scale, meta.max_query_len)
