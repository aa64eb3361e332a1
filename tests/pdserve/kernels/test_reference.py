"""The torch reference ops against a naive per-token loop that is obviously correct."""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from pdserve.kernels import reference
from pdserve.kernels.metadata import AttentionMetadata


def naive_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, q_lens: list[int],
                    ctx_lens: list[int], block_tables: Tensor, scale: float) -> Tensor:
    """One query row, one head at a time: row j of sequence i sits at position
    ctx - qlen + j and sees positions 0..that position, read block by block."""
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    g = q.shape[1] // hkv
    out = torch.zeros(q.shape, dtype=torch.float32)  # [T, Hq, D]
    row = 0
    for i, (qlen, ctx) in enumerate(zip(q_lens, ctx_lens)):
        for j in range(qlen):
            last = ctx - qlen + j
            for h in range(q.shape[1]):
                scores, values = [], []
                for p in range(last + 1):
                    blk = int(block_tables[i, p // page])
                    scores.append(float(q[row, h].float() @ k_cache[blk, p % page, h // g].float()) * scale)
                    values.append(v_cache[blk, p % page, h // g].float())
                mx = max(scores)
                w = [math.exp(s - mx) for s in scores]
                out[row, h] = sum(wi * vi for wi, vi in zip(w, values)) / sum(w)
            row += 1
    return out.to(q.dtype)


def _paged_case(ctx_lens: list[int], q_lens: list[int], page: int, hkv: int, g: int, d: int,
                dtype: torch.dtype = torch.float32) -> dict:
    gen = torch.Generator().manual_seed(len(ctx_lens) * 31 + page)
    nblk = [(c + page - 1) // page for c in ctx_lens]
    num_blocks = sum(nblk) + 2
    ids = torch.randperm(num_blocks, generator=gen)  # shuffled, non-contiguous tables
    bt = torch.zeros(len(ctx_lens), max(nblk) + 1, dtype=torch.int32)
    k_cache = torch.full((num_blocks, page, hkv, d), float("nan"), dtype=dtype)  # unwritten = NaN
    v_cache = torch.full_like(k_cache, float("nan"))
    used = 0
    for i, (c, n) in enumerate(zip(ctx_lens, nblk)):
        bt[i, :n] = ids[used:used + n].int()
        used += n
        for p in range(c):
            blk = int(bt[i, p // page])
            k_cache[blk, p % page] = torch.randn(hkv, d, generator=gen).to(dtype)
            v_cache[blk, p % page] = torch.randn(hkv, d, generator=gen).to(dtype)
    q = torch.randn(sum(q_lens), hkv * g, d, generator=gen).to(dtype)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, bt=bt, qsl=qsl,
                seq_lens=torch.tensor(ctx_lens, dtype=torch.int32), scale=d ** -0.5)


@pytest.mark.parametrize("page,hkv,g", [(4, 2, 1), (8, 1, 3), (4, 2, 4)])
def test_decode_matches_naive(page: int, hkv: int, g: int) -> None:
    ctx = [1, 5, 13]
    c = _paged_case(ctx, [1, 1, 1], page, hkv, g, d=8)
    got = reference.decode_attention(c["q"], c["k_cache"], c["v_cache"], c["seq_lens"], c["bt"], c["scale"])
    want = naive_attention(c["q"], c["k_cache"], c["v_cache"], [1, 1, 1], ctx, c["bt"], c["scale"])
    assert not got.isnan().any(), "unwritten (NaN) slots past seq_len leaked into the output"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ctx,qlens", [([6, 9], [6, 9]), ([7, 12, 3], [2, 5, 1])])
def test_prefill_matches_naive(ctx: list[int], qlens: list[int]) -> None:
    c = _paged_case(ctx, qlens, page=4, hkv=2, g=2, d=8)
    got = reference.prefill_attention(c["q"], c["k_cache"], c["v_cache"], c["qsl"], c["seq_lens"],
                                      c["bt"], c["scale"])
    want = naive_attention(c["q"], c["k_cache"], c["v_cache"], qlens, ctx, c["bt"], c["scale"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qlens", [[1, 4, 1, 1], [1, 3], [1, 1, 1]])
def test_paged_attention_mixed_matches_naive(qlens: list[int]) -> None:
    ctx = [5, 9, 2, 7][:len(qlens)]
    c = _paged_case(ctx, qlens, page=4, hkv=1, g=2, d=8)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(sum(qlens), dtype=torch.int64), query_start_loc=c["qsl"],
        seq_lens=c["seq_lens"], block_tables=c["bt"], max_query_len=max(qlens),
        max_seq_len=max(ctx), query_lens_cpu=qlens, seq_lens_cpu=ctx)
    got = reference.paged_attention(c["q"], c["k_cache"], c["v_cache"], meta, c["scale"])
    want = naive_attention(c["q"], c["k_cache"], c["v_cache"], qlens, ctx, c["bt"], c["scale"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_prefill_fp16_is_close_to_fp32_math() -> None:
    c = _paged_case([10], [4], page=4, hkv=1, g=2, d=8, dtype=torch.float16)
    got = reference.prefill_attention(c["q"], c["k_cache"], c["v_cache"], c["qsl"], c["seq_lens"],
                                      c["bt"], c["scale"])
    assert got.dtype == torch.float16
    want = naive_attention(c["q"], c["k_cache"], c["v_cache"], [4], [10], c["bt"], c["scale"])
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_write_kv_matches_naive_and_skips_negative_slots(cache_dtype: torch.dtype) -> None:
    num_blocks, page, hkv, d = 4, 4, 2, 8
    k = torch.randn(6, hkv, d)
    v = torch.randn(6, hkv, d)
    slots = torch.tensor([0, -1, 5, 15, -1, 9], dtype=torch.int64)
    k_cache = torch.full((num_blocks, page, hkv, d), 7.0, dtype=cache_dtype)
    v_cache = torch.full_like(k_cache, 7.0)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s // page, s % page] = k[t].to(cache_dtype)
            want_v[s // page, s % page] = v[t].to(cache_dtype)
    reference.write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    assert (k_cache.view(-1, hkv, d)[[1, 2, 3, 4]] == 7.0).all(), "untouched slots must stay"


@pytest.mark.parametrize("chunk_bytes", [0, 1])
def test_decode_groups_and_chunks_match_naive(chunk_bytes: int, monkeypatch) -> None:
    """Lengths far apart split into several groups; CHUNK_BYTES=1 forces one row per
    chunk. Every row, in the batch order, still equals the naive loop, and no NaN from the
    unwritten tail of a block or a padded table entry reaches the output."""
    ctx = [3, 40, 2, 41, 17, 0, 90]          # 0: a padded batch row, gets zeros
    c = _paged_case([n or 1 for n in ctx], [1] * len(ctx), page=4, hkv=2, g=3, d=8)
    lens = torch.tensor(ctx, dtype=torch.int32)
    if chunk_bytes:
        monkeypatch.setattr(reference, "CHUNK_BYTES", chunk_bytes)
    plan = reference.decode_gather(lens, c["bt"], 4, block_bytes=4 * 2 * 8 * 4)
    assert len(plan.groups) == len(ctx) - 1 if chunk_bytes else len(plan.groups) >= 2
    got = reference.decode_attention(c["q"], c["k_cache"], c["v_cache"], lens, c["bt"],
                                     c["scale"], gather=plan)
    live = [i for i, n in enumerate(ctx) if n]
    want = naive_attention(c["q"][live], c["k_cache"], c["v_cache"], [1] * len(live),
                           [ctx[i] for i in live], c["bt"][live], c["scale"])
    assert not got.isnan().any()
    torch.testing.assert_close(got[live], want, atol=1e-5, rtol=1e-5)
    assert (got[5] == 0).all()


@pytest.mark.parametrize("consecutive", [False, True])
def test_one_row_reads_its_exact_length_bit_for_bit_like_unmasked_sdpa(consecutive: bool) -> None:
    """Single-stream decode: a group of one row reads exactly its length (no zeroed
    padding, no mask), in place when its block ids are consecutive. The result is bit
    for bit what SDPA gives on the sequence's own K/V with each kv head repeated for its
    query heads (Hugging Face's decode step), and the unwritten (NaN) tail of the last
    block is never read."""
    import torch.nn.functional as F
    c = _paged_case([13], [1], page=4, hkv=2, g=3, d=8)
    bt = c["bt"]
    if consecutive:   # move the sequence's blocks to ids 2, 3, 4, 5
        kc, vc = c["k_cache"].clone(), c["v_cache"].clone()
        for i, b in enumerate(bt[0, :4].tolist()):
            kc[2 + i], vc[2 + i] = c["k_cache"][b], c["v_cache"][b]
        c["k_cache"], c["v_cache"] = kc, vc
        bt = bt.clone()
        bt[0, :4] = torch.arange(2, 6, dtype=torch.int32)
    plan = reference.decode_gather(c["seq_lens"], bt, 4)
    assert [(g.length, g.mask, g.pad, g.first) for g in plan.groups] == [
        (13, None, None, 2 if consecutive else -1)]
    got = reference.decode_attention(c["q"], c["k_cache"], c["v_cache"], c["seq_lens"], bt,
                                     c["scale"], gather=plan)
    k = reference.gather_kv(c["k_cache"], bt[0], 13).transpose(0, 1)[None]     # [1, 2, 13, 8]
    v = reference.gather_kv(c["v_cache"], bt[0], 13).transpose(0, 1)[None]
    want = F.scaled_dot_product_attention(
        c["q"][:, :, None, :], k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
        scale=c["scale"])[:, :, 0, :]
    assert torch.equal(got, want)


def test_partition_trades_padding_against_call_count() -> None:
    # equal lengths: one group; a long outlier gets its own group
    assert reference._partition([4] * 10) == [(0, 10)]
    runs = reference._partition([1] * 20 + [400])
    assert runs == [(0, 20), (20, 21)]


def test_reference_reads_and_writes_head_major_blocks() -> None:
    """The oracle takes either block memory order (the CUDA engine's caches are
    head-major): the same writes and the same attention as on token-major blocks."""
    torch.manual_seed(0)
    nb, bs, h, d = 12, 4, 3, 8
    kc, vc = torch.randn(nb, bs, h, d), torch.randn(nb, bs, h, d)
    hk, hv = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (kc, vc))
    assert not hk.is_contiguous()
    k, v = torch.randn(9, h, d), torch.randn(9, h, d)
    slots = torch.tensor([0, 5, -1, 17, 30, 47, 3, -1, 22])
    reference.write_kv(k, v, kc, vc, slots)
    reference.write_kv(k, v, hk, hv, slots)
    assert torch.equal(kc, hk) and torch.equal(vc, hv) and torch.equal(hk[7, 2], k[4])
    q = torch.randn(3, 2 * h, d)
    lens = torch.tensor([5, 13, 1], dtype=torch.int32)
    tables = torch.tensor([[3, 4, 5, 6], [7, 1, 2, 0], [9, 0, 0, 0]], dtype=torch.int32)
    for rows in (slice(0, 3), slice(0, 1)):      # a batch, and a lone in-order sequence
        torch.testing.assert_close(
            reference.decode_attention(q[rows], hk, hv, lens[rows], tables[rows], 0.3),
            reference.decode_attention(q[rows], kc, vc, lens[rows], tables[rows], 0.3))
