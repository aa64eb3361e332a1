"""Plain torch reference ops for paged KV: the CPU path and the oracle for every kernel.

Shapes follow pdserve/kernels/metadata.py. Math is done in float32 whatever the cache
dtype, then cast back to the query dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pdserve.kernels.metadata import AttentionMetadata


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim]; caches: [num_blocks, block_size, Hkv, D];
    slot_mapping: [num_tokens] int64. Slots < 0 are skipped (padding tokens)."""
    nb, bs, h, d = k_cache.shape
    flat_k = k_cache.view(nb * bs, h, d)
    flat_v = v_cache.view(nb * bs, h, d)
    # A host read per call: free on CPU tensors (~12 us), a device sync on CUDA. The
    # serving GPU path (triton_kv) skips negative slots in-kernel; dropping this check
    # here needs a padding flag in the write_kv signature of both backends.
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    flat_k.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_kv(cache: Tensor, block_table: Tensor, seq_len: int) -> Tensor:
    """The first seq_len tokens of one sequence: [seq_len, Hkv, D]."""
    bs = cache.shape[1]
    nblocks = (seq_len + bs - 1) // bs
    blocks = cache[block_table[:nblocks].long()]          # [nblocks, bs, Hkv, D]
    return blocks.reshape(nblocks * bs, *cache.shape[2:])[:seq_len]


@dataclass(frozen=True)
class DecodeGather:
    """Where a batched decode reads each sequence's context, built once per step and
    shared by every layer (it depends on the block tables and lengths, not on the layer).

        slots[b, n]  flat cache slot of context position n of sequence b, n < N = max len;
                     positions n >= seq_len[b] read the sequence's position 0 instead
                     (always written, hence finite) so that a masked-out position never
                     brings NaN garbage into P @ V (0 * NaN = NaN)
        mask[b, n]   n < seq_len[b]
    """
    slots: Tensor              # [B, N] int64
    mask: Tensor               # [B, 1, 1, N] bool, broadcast over heads and the query row
    empty: Tensor | None       # [B, 1, 1] bool: rows with seq_len 0 (output zeros); None if none


def decode_gather(seq_lens: Tensor, block_tables: Tensor, block_size: int,
                  max_seq_len: int | None = None, any_empty: bool | None = None) -> DecodeGather:
    """seq_lens: [B]; block_tables: [B, M]. max_seq_len / any_empty: host facts about
    seq_lens when the caller has them (else read from seq_lens)."""
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if seq_lens.numel() else 0
    if any_empty is None:
        any_empty = bool((seq_lens == 0).any())
    dev = block_tables.device
    lens = seq_lens.to(device=dev, dtype=torch.int64)[:, None]              # [B, 1]
    pos = torch.arange(max_seq_len, device=dev)                             # [N]
    slots = block_tables[:, pos // block_size].long() * block_size + pos % block_size
    mask = pos[None, :] < lens                                              # [B, N]
    slots = torch.where(mask, slots, slots[:, :1])
    empty = (lens == 0)[:, :, None] if any_empty else None
    return DecodeGather(slots=slots, mask=mask[:, None, None, :], empty=empty)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor,
                     block_tables: Tensor, scale: float,
                     gather: DecodeGather | None = None) -> Tensor:
    """One query token per sequence. q: [B, Hq, D]; seq_lens: [B]; block_tables: [B, M].
    Returns [B, Hq, D]; a sequence of length 0 (a padded batch row) gets zeros.
    `gather` (from decode_gather over the same seq_lens/block_tables) saves rebuilding the
    read plan in every layer."""
    B, hq, d = q.shape
    hkv = k_cache.shape[2]
    if B == 0:
        return torch.empty_like(q)
    if gather is None:
        gather = decode_gather(seq_lens, block_tables, k_cache.shape[1])
    n = gather.slots.shape[1]
    if n == 0:  # every row is an empty (padded) sequence
        return torch.zeros_like(q)
    idx = gather.slots.reshape(-1)
    # One row gather per position, [B, N, Hkv, D], then a free transpose to SDPA's layout.
    k = k_cache.reshape(-1, hkv, d).index_select(0, idx).view(B, n, hkv, d).transpose(1, 2)
    v = v_cache.reshape(-1, hkv, d).index_select(0, idx).view(B, n, hkv, d).transpose(1, 2)
    # enable_gqa: query head h reads kv head h // (Hq / Hkv), as HF's repeat_kv.
    out = F.scaled_dot_product_attention(
        q.float()[:, :, None, :], k.float(), v.float(), attn_mask=gather.mask,
        scale=scale, enable_gqa=hq != hkv)[:, :, 0, :]                       # [B, Hq, D]
    if gather.empty is not None:
        out = out.masked_fill(gather.empty, 0.0)
    return out.to(q.dtype)


def prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, query_start_loc: Tensor,
                      seq_lens: Tensor, block_tables: Tensor, scale: float) -> Tensor:
    """Varlen causal attention over a paged context. q: [T, Hq, D] (ragged, by
    query_start_loc); each sequence's new tokens are the last positions of its context.
    Returns [T, Hq, D]."""
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, ctx in enumerate(lens):
        s, e = starts[i], starts[i + 1]
        if e == s:
            continue
        out[s:e] = _one_sequence(q[s:e], k_cache, v_cache, block_tables[i], ctx, scale)
    return out


def _one_sequence(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                  ctx: int, scale: float) -> Tensor:
    qlen, hq, d = q.shape
    hkv = k_cache.shape[2]
    k = gather_kv(k_cache, block_table, ctx).float()   # [ctx, Hkv, D]
    v = gather_kv(v_cache, block_table, ctx).float()
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    qh, kh, vh = q.float().transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if qlen == ctx:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        # New token j sits at absolute position ctx - qlen + j.
        qpos = torch.arange(ctx - qlen, ctx, device=q.device)[:, None]
        kpos = torch.arange(ctx, device=q.device)[None, :]
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=kpos <= qpos, scale=scale)
    return o.transpose(0, 1).to(q.dtype)


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata,
                    scale: float) -> Tensor:
    """Mixed step: decode sequences (query_len 1) are batched; prefill chunks run one by one."""
    block_size = k_cache.shape[1]
    if meta.is_pure_decode:
        gather = _step_decode_plan(meta, block_size).gather
        return decode_attention(q, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale,
                                gather=gather)
    out = torch.empty_like(q)
    qlens, slens = meta.query_lens_cpu, meta.seq_lens_cpu
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    plan = _step_decode_plan(meta, block_size)
    if plan.rows is not None:
        out[plan.rows] = decode_attention(q[plan.rows], k_cache, v_cache, plan.seq_lens,
                                          plan.block_tables, scale, gather=plan.gather)
    for i, ctx in enumerate(slens):
        if i in plan.row_set or qlens[i] == 0:
            continue
        s, e = starts[i], starts[i + 1]
        out[s:e] = _one_sequence(q[s:e], k_cache, v_cache, meta.block_tables[i], ctx, scale)
    return out


@dataclass(frozen=True)
class _DecodePlan:
    """The decode rows of one step and how to read their context; see _step_decode_plan."""
    key: tuple[int, int, int]        # (block_size, id(block_tables), id(seq_lens))
    rows: Tensor | None              # [n] token rows batched as decode (None: pure decode)
    row_set: frozenset[int]          # sequence indices batched as decode (mixed steps)
    seq_lens: Tensor                 # [n]
    block_tables: Tensor             # [n, M]
    gather: DecodeGather | None


_PLAN_ATTR = "_reference_decode_plan"


def _step_decode_plan(meta: AttentionMetadata, block_size: int) -> _DecodePlan:
    """Built by the first layer of a step and cached on the step's metadata object (a
    private attribute; the runner builds a fresh AttentionMetadata every step and never
    mutates its tensors in place), so later layers skip the index building. Keyed by the
    identity of the tensors it was built from, in case a caller swaps a field."""
    key = (block_size, id(meta.block_tables), id(meta.seq_lens))
    plan = getattr(meta, _PLAN_ATTR, None)
    if plan is not None and plan.key == key:
        return plan
    slens = meta.seq_lens_cpu
    if meta.is_pure_decode:
        gather = decode_gather(meta.seq_lens, meta.block_tables, block_size,
                               max_seq_len=max(slens, default=0), any_empty=0 in slens)
        plan = _DecodePlan(key, None, frozenset(), meta.seq_lens, meta.block_tables, gather)
    else:
        dec = [i for i, n in enumerate(meta.query_lens_cpu) if n == 1]
        if len(dec) > 1:  # one decode row runs as a length-1 prefill chunk
            dev = meta.seq_lens.device
            starts = [0]
            for n in meta.query_lens_cpu:
                starts.append(starts[-1] + n)
            idx = torch.tensor(dec, device=dev)
            seq_lens, tables = meta.seq_lens[idx], meta.block_tables[idx]
            gather = decode_gather(seq_lens, tables, block_size,
                                   max_seq_len=max(slens[i] for i in dec),
                                   any_empty=any(slens[i] == 0 for i in dec))
            rows = torch.tensor([starts[i] for i in dec], device=dev)
            plan = _DecodePlan(key, rows, frozenset(dec), seq_lens, tables, gather)
        else:
            plan = _DecodePlan(key, None, frozenset(), meta.seq_lens, meta.block_tables, None)
    setattr(meta, _PLAN_ATTR, plan)
    return plan
