"""Triton paged-KV kernels against the torch reference (CPU: under TRITON_INTERPRET=1).

The interpreter runs every program in Python, so shapes are tiny and the grid is small;
test_triton_gpu.py repeats the parities at serving sizes on CUDA.

Tolerances (kernel vs reference, which does all math in fp32):
  fp32: atol=rtol=2e-5 (accumulation order and exp2 vs exp only; seen: <= 1.5e-6)
  fp16: atol=2e-3, rtol=1e-2 (P is rounded to fp16 before P@V and both outputs are
        rounded to fp16; seen: <= 1e-3, one fp16 ulp at |x| < 1)
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET != '1': Triton kernels cannot run",
                allow_module_level=True)

from pdserve.kernels import reference  # noqa: E402
from pdserve.kernels import triton_attention, triton_kv  # noqa: E402
from pdserve.kernels.metadata import AttentionMetadata  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-3, rtol=1e-2)}


def make_case(ctx_lens: list[int], q_lens: list[int], *, page: int, hkv: int, g: int, d: int,
              dtype: torch.dtype, num_blocks: int | None = None, seed: int = 0) -> dict:
    """A paged cache holding each sequence's context in shuffled blocks; every slot not
    holding a context token is NaN, so a kernel that reads one fails loudly. With
    num_blocks given, block ids are drawn from the top of the cache (large ids)."""
    gen = torch.Generator().manual_seed(seed)
    nblk = [-(-c // page) for c in ctx_lens]
    need = sum(nblk)
    total = num_blocks or need + 3
    ids = torch.randperm(need + 3, generator=gen) + (total - need - 3)
    bt = torch.zeros(len(ctx_lens), max(nblk) + 1, dtype=torch.int32)  # pad column = block 0
    slots: list[int] = []
    for i, n in enumerate(nblk):
        bt[i, :n] = ids[sum(nblk[:i]):sum(nblk[:i]) + n].int()
        slots += [int(bt[i, p // page]) * page + p % page for p in range(ctx_lens[i])]
    k_cache = torch.full((total, page, hkv, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    k = torch.randn(len(slots), hkv, d, generator=gen)
    v = torch.randn(len(slots), hkv, d, generator=gen)
    reference.write_kv(k, v, k_cache, v_cache, torch.tensor(slots, dtype=torch.int64))
    q = torch.randn(sum(q_lens), hkv * g, d, generator=gen).to(dtype)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(sum(q_lens), dtype=torch.int64, device=DEVICE),
        query_start_loc=qsl.to(DEVICE), seq_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE),
        block_tables=bt.to(DEVICE), max_query_len=max(q_lens), max_seq_len=max(ctx_lens),
        query_lens_cpu=q_lens, seq_lens_cpu=ctx_lens)
    return dict(q=q.to(DEVICE), k_cache=k_cache.to(DEVICE), v_cache=v_cache.to(DEVICE),
                meta=meta, scale=d ** -0.5)


def _decode_pair(c: dict, num_splits: int | None, tiles: tuple | None = None,
                 **grid) -> tuple[torch.Tensor, torch.Tensor]:
    m = c["meta"]
    got = triton_attention.decode_attention(c["q"], c["k_cache"], c["v_cache"], m.seq_lens,
                                            m.block_tables, c["scale"], num_splits=num_splits,
                                            tiles=tiles, **grid)
    want = reference.decode_attention(c["q"], c["k_cache"], c["v_cache"], m.seq_lens,
                                      m.block_tables, c["scale"])
    return got, want


def _prefill_pair(c: dict) -> tuple[torch.Tensor, torch.Tensor]:
    m = c["meta"]
    args = (c["q"], c["k_cache"], c["v_cache"], m.query_start_loc, m.seq_lens, m.block_tables, c["scale"])
    return triton_attention.prefill_attention(*args, m.max_query_len), reference.prefill_attention(*args)


F32, F16 = torch.float32, torch.float16
# (page, G, head_dim, dtype): every page size meets every (head_dim, dtype) pair and every
# G meets both head dims and both dtypes, in 12 cases rather than the 48 of a full cross
# product (the interpreter is slow; test_triton_gpu.py runs wider sweeps on CUDA).
CASES = [
    (8, 1, 64, F32), (8, 3, 128, F16), (8, 4, 64, F16), (8, 8, 128, F32),
    (16, 1, 128, F16), (16, 3, 64, F32), (16, 4, 128, F32), (16, 8, 64, F16),
    (32, 1, 64, F16), (32, 3, 128, F32), (32, 4, 64, F32), (32, 8, 128, F16),
]
CASE_IDS = [f"page{p}-g{g}-d{d}-{str(t)[6:]}" for p, g, d, t in CASES]


@pytest.mark.parametrize("page,g,d,dtype", CASES, ids=CASE_IDS)
def test_decode_parity(page: int, g: int, d: int, dtype: torch.dtype) -> None:
    # Ragged: length 1, shorter than a page, not a page multiple, many pages (150 / 8 = 19).
    ctx = [1, page - 3, 2 * page + 5, 150]
    c = make_case(ctx, [1] * len(ctx), page=page, hkv=2 if g < 4 else 1, g=g, d=d, dtype=dtype,
                  seed=page + g)
    got, want = _decode_pair(c, num_splits=None)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_decode_split_kv(num_splits: int) -> None:
    # 7 splits of a 1-token or 50-token context leave empty splits the merge must ignore.
    c = make_case([1, 50, 130], [1, 1, 1], page=16, hkv=1, g=4, d=64, dtype=torch.float32, seed=1)
    got, want = _decode_pair(c, num_splits=num_splits)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("heads_first,evict", [(False, ""), (True, ""), (False, "evict_first"), (True, "evict_first")])
def test_decode_grid_order_and_eviction(num_splits: int, heads_first: bool, evict: str) -> None:
    # Both grid orders map every (sequence, kv head, split) program to its own rows and
    # partials: with 3 kv heads and 3 sequences a swapped index writes another head's rows.
    c = make_case([5, 40, 130], [1, 1, 1], page=16, hkv=3, g=2, d=64, dtype=torch.float32, seed=9)
    got, want = _decode_pair(c, num_splits=num_splits, heads_first=heads_first, evict=evict)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("tiles", [(64, 4, None), (128, 4, 2)], ids=["n64", "n128-s2"])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
def test_decode_shipped_tiles(tiles: tuple, num_splits: int, dtype: torch.dtype) -> None:
    # Both tile shapes _decode_tiles ships: whole tiles run unmasked with their block ids
    # loaded a tile ahead, so lengths one short of, at, and one past a tile (and a split's
    # end) must neither read a NaN slot past the context nor drop a position.
    c = make_case([1, 127, 128, 129, 300], [1] * 5, page=16, hkv=1, g=4, d=64, dtype=dtype, seed=5)
    got, want = _decode_pair(c, num_splits=num_splits, tiles=tiles)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_ignores_table_past_length(num_splits: int) -> None:
    # The first tile's block ids load bounded by the table's width, not by the length, so
    # the ids past a sequence's blocks are read; they must never become an address. Wild
    # ids there (int32 max) leave the output as it was.
    c = make_case([1, 70, 128, 200], [1] * 4, page=16, hkv=1, g=4, d=64, dtype=torch.float32, seed=9)
    m = c["meta"]
    want = reference.decode_attention(c["q"], c["k_cache"], c["v_cache"], m.seq_lens,
                                      m.block_tables, c["scale"])   # it gathers whole rows
    for i, n in enumerate([1, 70, 128, 200]):
        m.block_tables[i, -(-n // 16):] = torch.iinfo(torch.int32).max
    for tiles in ((64, 4, None), (128, 4, 2)):
        got = triton_attention.decode_attention(c["q"], c["k_cache"], c["v_cache"], m.seq_lens,
                                                m.block_tables, c["scale"], num_splits=num_splits,
                                                tiles=tiles)
        torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("page,g,d,dtype", CASES, ids=CASE_IDS)
def test_prefill_parity(page: int, g: int, d: int, dtype: torch.dtype) -> None:
    # Full prefills (q_len == ctx) beside chunks over a cached prefix (q_len < ctx),
    # a 1-token query, and a query long enough for several query blocks.
    ctx = [1, page - 3, 3 * page + 5, 90, 40]
    qlens = [1, page - 3, 7, 70, 1]
    c = make_case(ctx, qlens, page=page, hkv=2 if g < 4 else 1, g=g, d=d, dtype=dtype,
                  seed=page * g)
    got, want = _prefill_pair(c)
    torch.testing.assert_close(got, want, **TOL[dtype])


def head_major(x: torch.Tensor) -> torch.Tensor:
    """The same [blocks, page, Hkv, D] values in [blocks, Hkv, page, D] memory order, as
    allocate_kv_caches(layout="head") lays out the GPU cache."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("tiles", [None, (128, 4, 2)], ids=["default", "n128-s2"])
@pytest.mark.parametrize("page,g,d,dtype", [(16, 4, 64, F32), (32, 3, 128, F16)],
                         ids=["page16-g4-d64-f32", "page32-g3-d128-f16"])
def test_head_major_blocks(page: int, g: int, d: int, dtype: torch.dtype, tiles: tuple | None) -> None:
    """Both attention kernels read head-major blocks (only the strides differ) and give
    the reference's output on the token-major cache of the same values."""
    ctx = [1, page + 3, 130, 200]
    c = make_case(ctx, [1] * len(ctx), page=page, hkv=2, g=g, d=d, dtype=dtype, seed=11)
    hm = dict(c, k_cache=head_major(c["k_cache"]), v_cache=head_major(c["v_cache"]))
    assert hm["k_cache"].stride(1) == d and not hm["k_cache"].is_contiguous()
    m = c["meta"]
    got = triton_attention.decode_attention(hm["q"], hm["k_cache"], hm["v_cache"], m.seq_lens,
                                            m.block_tables, c["scale"], tiles=tiles)
    want = reference.decode_attention(c["q"], c["k_cache"], c["v_cache"], m.seq_lens,
                                      m.block_tables, c["scale"])
    torch.testing.assert_close(got, want, **TOL[dtype])
    if tiles is None:   # prefill chunks over a cached prefix, on the same blocks
        qlens = [1, page, 9, 40]
        c = make_case(ctx, qlens, page=page, hkv=2, g=g, d=d, dtype=dtype, seed=12)
        hm = dict(c, k_cache=head_major(c["k_cache"]), v_cache=head_major(c["v_cache"]))
        torch.testing.assert_close(_prefill_pair(hm)[0], _prefill_pair(c)[1], **TOL[dtype])


@pytest.mark.parametrize("qlens", [[1, 6, 1], [1, 1, 1]])
def test_paged_attention_dispatch(qlens: list[int]) -> None:
    """Mixed steps go through the prefill kernel, pure decode through split-KV decode."""
    c = make_case([12, 30, 7], qlens, page=8, hkv=1, g=4, d=64, dtype=torch.float32, seed=3)
    got = triton_attention.paged_attention(c["q"], c["k_cache"], c["v_cache"], c["meta"], c["scale"])
    want = reference.paged_attention(c["q"], c["k_cache"], c["v_cache"], c["meta"], c["scale"])
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_large_block_ids() -> None:
    """Block ids near the end of a 64k-block cache (small heads keep it ~8 MB each)."""
    nb = 1 << 16
    c = make_case([40, 3], [40, 1], page=8, hkv=1, g=4, d=16, dtype=torch.float16, num_blocks=nb)
    assert int(c["meta"].block_tables.min()) >= 0 and int(c["meta"].block_tables[:, 0].min()) > nb - 16
    torch.testing.assert_close(*_prefill_pair(c), **TOL[torch.float16])
    c["q"] = c["q"][[39, 40]]
    torch.testing.assert_close(*_decode_pair(c, num_splits=2), **TOL[torch.float16])


@pytest.mark.parametrize("cache_dtype", [F32, F16], ids=str)
def test_write_kv_parity(cache_dtype: torch.dtype) -> None:
    nb, page, hkv, d = 1 << 12, 16, 2, 64
    qkv = torch.randn(7, 3, hkv, d, device=DEVICE)  # k, v as strided views of a fused output
    k, v = qkv[:, 1], qkv[:, 2]
    slots = torch.tensor([0, -1, 17, nb * page - 1, -1, 5 * page + 3, (nb - 2) * page],
                         dtype=torch.int64, device=DEVICE)
    k_cache = torch.randn(nb, page, hkv, d, device=DEVICE).to(cache_dtype)
    v_cache = torch.randn_like(k_cache)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.write_kv(k, v, want_k, want_v, slots)
    hm_k, hm_v = head_major(k_cache), head_major(v_cache)
    triton_kv.write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    triton_kv.write_kv(k, v, hm_k, hm_v, slots)     # head-major blocks: the same values
    assert torch.equal(hm_k, want_k) and torch.equal(hm_v, want_v)


def test_wrappers_reject_bad_inputs() -> None:
    c = make_case([5], [1], page=8, hkv=2, g=2, d=64, dtype=torch.float32)
    q, kc, vc, m = c["q"], c["k_cache"], c["v_cache"], c["meta"]
    decode = triton_attention.decode_attention
    with pytest.raises(ValueError, match="dtype"):
        decode(q.half(), kc, vc, m.seq_lens, m.block_tables, 1.0)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        decode(q[:, :3], kc, vc, m.seq_lens, m.block_tables, 1.0)
    with pytest.raises(ValueError, match="contiguous last"):
        decode(q.transpose(1, 2).contiguous().transpose(1, 2), kc, vc, m.seq_lens, m.block_tables, 1.0)
    with pytest.raises(ValueError, match="block_tables"):
        decode(q, kc, vc, m.seq_lens, m.block_tables.float(), 1.0)
    with pytest.raises(ValueError, match="num_splits"):
        decode(q, kc, vc, m.seq_lens, m.block_tables, 1.0, num_splits=0)
    with pytest.raises(ValueError, match="query_start_loc"):
        triton_attention.prefill_attention(q, kc, vc, m.seq_lens, m.seq_lens, m.block_tables, 1.0, 1)
    with pytest.raises(ValueError, match="slot_mapping"):
        triton_kv.write_kv(kc[0], vc[0], kc, vc, torch.zeros(8, dtype=torch.int32, device=DEVICE))
