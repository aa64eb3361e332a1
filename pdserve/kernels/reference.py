"""Plain torch reference ops for paged KV: the CPU path and the oracle for every kernel.

Shapes follow pdserve/kernels/metadata.py. Math is done in float32 whatever the cache
dtype, then cast back to the query dtype.
"""
from __future__ import annotations

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


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor,
                     block_tables: Tensor, scale: float) -> Tensor:
    """One query token per sequence. q: [B, Hq, D]; seq_lens: [B]; block_tables: [B, M].
    Returns [B, Hq, D]."""
    B, hq, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    max_len = int(seq_lens.max())
    nblocks = (max_len + bs - 1) // bs
    bt = block_tables[:, :nblocks].long()
    k = k_cache[bt].reshape(B, nblocks * bs, hkv, d).float()      # [B, N, Hkv, D]
    v = v_cache[bt].reshape(B, nblocks * bs, hkv, d).float()
    qg = q.float().view(B, hkv, g, d)
    scores = torch.einsum("bkgd,bnkd->bkgn", qg, k) * scale        # [B, Hkv, G, N]
    pos = torch.arange(nblocks * bs, device=q.device)
    valid = pos[None, :] < seq_lens[:, None].to(q.device)          # [B, N]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    # Slots past seq_len were never written (torch.empty garbage may be NaN): a zero
    # probability times NaN is still NaN, so zero them rather than rely on the mask.
    v = v.masked_fill(~valid[:, :, None, None], 0.0)
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgn,bnkd->bkgd", probs, v)
    return out.reshape(B, hq, d).to(q.dtype)


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
    if meta.is_pure_decode:
        return decode_attention(q, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale)
    out = torch.empty_like(q)
    qlens, slens = meta.query_lens_cpu, meta.seq_lens_cpu
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    dec = [i for i, n in enumerate(qlens) if n == 1]
    if len(dec) > 1:
        idx = torch.tensor(dec, device=q.device)
        rows = torch.tensor([starts[i] for i in dec], device=q.device)
        out[rows] = decode_attention(q[rows], k_cache, v_cache, meta.seq_lens[idx],
                                     meta.block_tables[idx], scale)
        dec_set = set(dec)
    else:
        dec_set = set()
    for i, ctx in enumerate(slens):
        if i in dec_set or qlens[i] == 0:
            continue
        s, e = starts[i], starts[i + 1]
        out[s:e] = _one_sequence(q[s:e], k_cache, v_cache, meta.block_tables[i], ctx, scale)
    return out
