"""Plain torch reference ops for paged KV: the CPU path and the oracle for every kernel.

Shapes follow pdserve/kernels/metadata.py. Math is done in float32 whatever the cache
dtype, then cast back to the query dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from pdserve.kernels.metadata import AttentionMetadata


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim]; caches: [num_blocks, block_size, Hkv, D];
    slot_mapping: [num_tokens] int64. Slots < 0 are skipped (padding tokens). Any block
    memory order (token- or head-major, see allocate_kv_caches): the oracle checks both."""
    nb, bs, h, d = k_cache.shape
    # A host read per call: free on CPU tensors (~12 us), a device sync on CUDA. The
    # serving GPU path (triton_kv) skips negative slots in-kernel; dropping this check
    # here needs a padding flag in the write_kv signature of both backends.
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    if k_cache.is_contiguous() and v_cache.is_contiguous():   # token-major: one flat copy
        k_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.view(nb * bs, h, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
        return
    blk, pos = slot_mapping // bs, slot_mapping % bs       # any strides: index_put_
    k_cache[blk, pos] = k.to(k_cache.dtype)
    v_cache[blk, pos] = v.to(v_cache.dtype)


def gather_kv(cache: Tensor, block_table: Tensor, seq_len: int) -> Tensor:
    """The first seq_len tokens of one sequence: [seq_len, Hkv, D]."""
    bs = cache.shape[1]
    nblocks = (seq_len + bs - 1) // bs
    blocks = cache[block_table[:nblocks].long()]          # [nblocks, bs, Hkv, D]
    return blocks.reshape(nblocks * bs, *cache.shape[2:])[:seq_len]


# Cost model of one batched decode-attention call on CPU, in "row-tokens" (one query row
# against one context token): a call costs about GROUP_OVERHEAD plus rows x padded length.
GROUP_OVERHEAD = 768
# A group's rows are read in chunks of at most this many bytes of K + V: the gathered copy
# is then still in the CPU cache when SDPA reads it (half of an 8 MiB L3; measured 1.5x
# faster than one gather of the whole batch on the project's CPU box).
CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class DecodeGroup:
    """Sequences of similar length read together: their blocks are gathered whole (one
    contiguous block per index, not one row per token) up to the group's longest one."""
    rows: Tensor | None        # [n] batch rows of this group (None: the whole batch, in order)
    blocks: Tensor             # [n * nblk] int64 block ids, row-major
    nblk: int                  # blocks per row (the longest sequence's)
    pad: Tensor | None         # flat gathered token positions past each row's length
    mask: Tensor | None        # [n, 1, 1, nblk * block_size] bool; None: every row is full
    length: int = 0            # a one-row group: its length, read exactly (no pad, no mask)
    first: int = -1            # ... whose blocks are consecutive ids: the first (read in place)


@dataclass(frozen=True)
class DecodeGather:
    """Where a batched decode reads each sequence's context, built once per step and
    shared by every layer (it depends on the block tables and lengths, not on the layer).

    Rows are split into groups of similar length (a small dynamic program over the
    sorted block counts, GROUP_OVERHEAD against padded work), so a short sequence does
    not pay for the longest one. Positions past a row's length are zeroed after the
    gather and masked: a stale or never-written slot (even NaN) never reaches the
    output (a masked weight is 0, and 0 * NaN would be NaN). A group of one row reads
    its exact length instead: no zeroing, no mask (single-stream decode: SDPA without a
    mask is ~30% faster there, and computes what Hugging Face's unmasked call does, bit
    for bit), and reads its blocks in place when their ids are consecutive. Rows of
    length 0 (padded batch rows) belong to no group and get zeros.
    """
    groups: tuple[DecodeGroup, ...]
    covers_all: bool           # every row is in some group
    # Gather buffers ("k"/"v"), reused by every group and layer of the step: a fresh
    # multi-MB tensor per call costs page faults that took as long as the copy itself.
    buffers: dict = field(default_factory=dict, compare=False, repr=False)


def _partition(counts: list[int]) -> list[tuple[int, int]]:
    """Split ascending block counts into contiguous runs [i, j) minimising
    sum(GROUP_OVERHEAD + (j - i) * counts[j - 1] * block) (block factor dropped: counts are
    compared in blocks, GROUP_OVERHEAD is given in 16-token blocks)."""
    n = len(counts)
    over = GROUP_OVERHEAD / 16
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        top = counts[j - 1]
        for i in range(j - 1, -1, -1):
            c = best[i] + over + (j - i) * top
            if c < best[j]:
                best[j], cut[j] = c, i
    runs, j = [], n
    while j > 0:
        runs.append((cut[j], j))
        j = cut[j]
    return runs[::-1]


def decode_gather(seq_lens: Tensor, block_tables: Tensor, block_size: int,
                  lens: list[int] | None = None, block_bytes: int = 0) -> DecodeGather:
    """seq_lens: [B]; block_tables: [B, M]. lens: seq_lens on the host when the caller
    has them (else read from seq_lens). block_bytes: bytes of one K block, to cut groups
    into cache-sized chunks (0: no cut)."""
    if lens is None:
        lens = [int(x) for x in seq_lens.tolist()]
    dev = block_tables.device
    live = sorted((n, b) for b, n in enumerate(lens) if n > 0)
    if not live:
        return DecodeGather((), covers_all=False)
    counts = [-(-n // block_size) for n, _ in live]
    tables = block_tables.long()
    groups = []
    for i, j in _partition(counts):
        nblk = counts[j - 1]
        width = nblk * block_size
        cap = max(1, CHUNK_BYTES // (2 * nblk * block_bytes)) if block_bytes else j - i
        for c in range(i, j, cap):
            members = [b for _, b in live[c:min(j, c + cap)]]
            rlens = [n for n, _ in live[c:min(j, c + cap)]]
            whole = len(members) == len(lens)
            if whole:   # keep batch order: the output needs no scatter
                members, rlens = list(range(len(lens))), lens
            rows = None if whole else torch.tensor(members, device=dev)
            blocks = (tables[:, :nblk] if whole else tables[rows, :nblk]).reshape(-1)
            if len(members) == 1:
                ids = blocks.tolist()
                first = ids[0] if ids == list(range(ids[0], ids[0] + nblk)) else -1
                groups.append(DecodeGroup(rows, blocks, nblk, None, None, rlens[0], first))
                continue
            pad_pos = [r * width + p for r, n in enumerate(rlens) for p in range(n, width)]
            pad = torch.tensor(pad_pos, dtype=torch.int64, device=dev) if pad_pos else None
            mask = None
            if pad is not None:
                lt = torch.tensor(rlens, device=dev)[:, None]
                mask = (torch.arange(width, device=dev)[None, :] < lt)[:, None, None, :]
            groups.append(DecodeGroup(rows, blocks, nblk, pad, mask))
    return DecodeGather(tuple(groups), covers_all=len(live) == len(lens))


def _gather_group(cache: Tensor, g: DecodeGroup, rows: int, buffers: dict, name: str) -> Tensor:
    """[rows, Hkv, nblk * block_size (or the one row's length), D] (a view of a
    [rows, N, Hkv, D] copy)."""
    nb, bs, hkv, d = cache.shape
    if g.first >= 0:   # consecutive blocks (a lone sequence in a fresh pool): no copy
        x = cache[g.first:g.first + g.nblk].reshape(1, g.nblk * bs, hkv, d)  # view if token-major
        return x[:, :g.length].transpose(1, 2)
    src = cache.reshape(nb, bs * hkv * d)   # a view of a token-major cache, else a copy
    n = g.blocks.numel()
    buf = buffers.get(name)
    if buf is None or buf.shape[0] < n or buf.dtype != cache.dtype or buf.device != cache.device:
        buf = buffers[name] = torch.empty(n, bs * hkv * d, dtype=cache.dtype, device=cache.device)
    x = buf[:n]
    torch.index_select(src, 0, g.blocks, out=x)
    if g.pad is not None:
        x.view(-1, hkv * d).index_fill_(0, g.pad, 0.0)
    x = x.view(rows, g.nblk * bs, hkv, d)
    if g.length:
        x = x[:, :g.length]
    return x.transpose(1, 2)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor,
                     block_tables: Tensor, scale: float,
                     gather: DecodeGather | None = None) -> Tensor:
    """One query token per sequence. q: [B, Hq, D]; seq_lens: [B]; block_tables: [B, M].
    Returns [B, Hq, D]; a sequence of length 0 (a padded batch row) gets zeros.
    `gather` (from decode_gather over the same seq_lens/block_tables) saves rebuilding the
    read plan in every layer."""
    B, hq, _ = q.shape
    hkv = k_cache.shape[2]
    if B == 0:
        return torch.empty_like(q)
    if gather is None:
        gather = decode_gather(seq_lens, block_tables, k_cache.shape[1],
                               block_bytes=k_cache[0].numel() * k_cache.element_size())
    out = torch.empty_like(q) if gather.covers_all else torch.zeros_like(q)
    for g in gather.groups:
        qg = q if g.rows is None else q.index_select(0, g.rows)
        n = qg.shape[0]
        k = _gather_group(k_cache, g, n, gather.buffers, "k")
        v = _gather_group(v_cache, g, n, gather.buffers, "v")
        # 4-D inputs take SDPA's fused CPU kernel (3-D ones fall back to the math path);
        # enable_gqa: query head h reads kv head h // (Hq / Hkv), as HF's repeat_kv.
        o = F.scaled_dot_product_attention(
            qg.float()[:, :, None, :], k.float(), v.float(), attn_mask=g.mask, scale=scale,
            enable_gqa=hq != hkv)[:, :, 0, :].to(q.dtype)                    # [n, Hq, D]
        if g.rows is None:
            return o
        out.index_copy_(0, g.rows, o)
    return out


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
    # [1, H, T, D] views: 4-D inputs take SDPA's fused CPU kernel, 3-D ones the math path
    k = gather_kv(k_cache, block_table, ctx).float().transpose(0, 1)[None]   # [1, Hkv, ctx, D]
    v = gather_kv(v_cache, block_table, ctx).float().transpose(0, 1)[None]
    qh = q.float().transpose(0, 1)[None]                                     # [1, Hq, qlen, D]
    gqa = hq != hkv
    if qlen == ctx:
        o = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        # New token j sits at absolute position ctx - qlen + j.
        qpos = torch.arange(ctx - qlen, ctx, device=q.device)[:, None]
        kpos = torch.arange(ctx, device=q.device)[None, :]
        o = F.scaled_dot_product_attention(qh, k, v, attn_mask=(kpos <= qpos)[None, None],
                                           scale=scale, enable_gqa=gqa)
    return o[0].transpose(0, 1).to(q.dtype)


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata,
                    scale: float) -> Tensor:
    """Mixed step: decode sequences (query_len 1) are batched; prefill chunks run one by one."""
    if meta.is_pure_decode:
        gather = _step_decode_plan(meta, k_cache).gather
        return decode_attention(q, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale,
                                gather=gather)
    out = torch.empty_like(q)
    qlens, slens = meta.query_lens_cpu, meta.seq_lens_cpu
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    plan = _step_decode_plan(meta, k_cache)
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


def _step_decode_plan(meta: AttentionMetadata, k_cache: Tensor) -> _DecodePlan:
    """Built by the first layer of a step and cached on the step's metadata object (a
    private attribute; the runner builds a fresh AttentionMetadata every step and never
    mutates its tensors in place), so later layers skip the index building. Keyed by the
    identity of the tensors it was built from, in case a caller swaps a field."""
    block_size = k_cache.shape[1]
    block_bytes = k_cache[0].numel() * k_cache.element_size()
    key = (block_size, id(meta.block_tables), id(meta.seq_lens))
    plan = getattr(meta, _PLAN_ATTR, None)
    if plan is not None and plan.key == key:
        return plan
    slens = meta.seq_lens_cpu
    if meta.is_pure_decode:
        gather = decode_gather(meta.seq_lens, meta.block_tables, block_size, lens=list(slens),
                               block_bytes=block_bytes)
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
                                   lens=[slens[i] for i in dec], block_bytes=block_bytes)
            rows = torch.tensor([starts[i] for i in dec], device=dev)
            plan = _DecodePlan(key, rows, frozenset(dec), seq_lens, tables, gather)
        else:
            plan = _DecodePlan(key, None, frozenset(), meta.seq_lens, meta.block_tables, None)
    setattr(meta, _PLAN_ATTR, plan)
    return plan
