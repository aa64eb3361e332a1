"""Triton paged-KV kernels vs the torch reference on CUDA, at serving sizes (compiled mode).

Covers what the interpreter cannot: tl.dot's compiled tile constraints, bf16, batches up
to 64, contexts up to 8k, real int32 overflow of block_id * block_stride (a cache over
2**31 elements), and CUDA-graph capture of split-KV decode.

Tolerances (reference math is fp32): fp32 1e-4 (tl.dot pinned to ieee, no tf32);
fp16 atol 2e-3 / rtol 1e-2; bf16 atol 1.6e-2 / rtol 2e-2 (one bf16 ulp near 1 is 7.8e-3;
P is rounded to the input dtype before P@V).
"""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu
triton = pytest.importorskip("triton")
if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs CUDA with compiled Triton (TRITON_INTERPRET unset)", allow_module_level=True)

from pdserve.kernels import reference  # noqa: E402
from pdserve.kernels import triton_attention, triton_kv  # noqa: E402

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=1e-2),
       torch.bfloat16: dict(atol=1.6e-2, rtol=2e-2)}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def make_case(ctx_lens: list[int], q_lens: list[int], *, page: int, hkv: int, g: int, d: int,
              dtype: torch.dtype, num_blocks: int | None = None, seed: int = 0) -> dict:
    """Contexts in shuffled blocks of a NaN-filled cache (a stray read shows up as NaN);
    with num_blocks given, the blocks used are the last ones of the cache."""
    torch.manual_seed(seed)
    nblk = [-(-c // page) for c in ctx_lens]
    need = sum(nblk)
    total = num_blocks or need + 7
    ids = (torch.randperm(need + 7, device="cuda") + (total - need - 7))[:need]
    bt = torch.zeros(len(ctx_lens), max(nblk) + 1, dtype=torch.int32, device="cuda")
    slots = []
    start = 0
    for i, (c, n) in enumerate(zip(ctx_lens, nblk)):
        bt[i, :n] = ids[start:start + n].int()
        start += n
        pos = torch.arange(c, device="cuda")
        slots.append(bt[i, pos // page].long() * page + pos % page)
    slot = torch.cat(slots)
    k_cache = torch.full((total, page, hkv, d), float("nan"), dtype=dtype, device="cuda")
    v_cache = torch.full_like(k_cache, float("nan"))
    k = torch.randn(slot.numel(), hkv, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    reference.write_kv(k, v, k_cache, v_cache, slot)
    q = torch.randn(sum(q_lens), hkv * g, d, device="cuda", dtype=dtype)
    qsl = torch.tensor([0] + q_lens, device="cuda").cumsum(0).to(torch.int32)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, bt=bt, qsl=qsl, max_q=max(q_lens),
                seq_lens=torch.tensor(ctx_lens, dtype=torch.int32, device="cuda"), scale=d ** -0.5)


def _ragged(bs: int, max_len: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (bs,), generator=gen).tolist()
    lens[0], lens[-1] = 1, max_len  # always include a 1-token and a full-length context
    return lens


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bs,max_len,page,hkv,g,d", [
    (64, 8192, 16, 8, 4, 128),   # Llama-3-8B-like GQA
    (1, 8192, 16, 8, 4, 128),    # bs=1: split-KV is what fills the GPU
    (33, 3000, 32, 2, 8, 64),
    (17, 1000, 8, 4, 1, 128),    # MHA: 1 head padded to 16 dot rows
    (8, 2048, 16, 3, 3, 64),     # SmolLM2-like G=3
    (128, 2048, 16, 8, 4, 64),   # Llama-3.2-1B at batch 128: the BLOCK_N 32 tiles
])
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_decode_parity_gpu(bs: int, max_len: int, page: int, hkv: int, g: int, d: int,
                           dtype: torch.dtype, num_splits: int | None) -> None:
    ctx = _ragged(bs, max_len, seed=bs + g)
    c = make_case(ctx, [1] * bs, page=page, hkv=hkv, g=g, d=d, dtype=dtype)
    args = (c["q"], c["k_cache"], c["v_cache"], c["seq_lens"], c["bt"], c["scale"])
    got = triton_attention.decode_attention(*args, num_splits=num_splits)
    torch.testing.assert_close(got, reference.decode_attention(*args), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bs,max_len,page,hkv,g,d", [
    (16, 4096, 16, 8, 4, 128),
    (9, 2500, 32, 2, 8, 64),
    (12, 1500, 8, 4, 1, 128),
    (6, 1000, 16, 3, 3, 64),
])
def test_prefill_parity_gpu(bs: int, max_len: int, page: int, hkv: int, g: int, d: int,
                            dtype: torch.dtype) -> None:
    ctx = _ragged(bs, max_len, seed=bs * g)
    # Alternate full prefills, chunks over a cached prefix, and decode rows.
    qlens = [c if i % 3 == 0 else (1 if i % 3 == 1 else max(1, c // 3)) for i, c in enumerate(ctx)]
    c = make_case(ctx, qlens, page=page, hkv=hkv, g=g, d=d, dtype=dtype)
    args = (c["q"], c["k_cache"], c["v_cache"], c["qsl"], c["seq_lens"], c["bt"], c["scale"])
    got = triton_attention.prefill_attention(*args, c["max_q"])
    torch.testing.assert_close(got, reference.prefill_attention(*args), **TOL[dtype])


def _head_major(x: torch.Tensor) -> torch.Tensor:
    """The same [blocks, page, Hkv, D] values stored [blocks, Hkv, page, D], as the CUDA
    engine allocates them (allocate_kv_caches(layout="head"))."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bs,max_len,page,hkv,g,d", [
    (64, 8192, 16, 8, 4, 128),   # the shipped one-split 128-position tiles
    (1, 8192, 16, 8, 4, 128),    # split-KV
    (33, 3000, 32, 2, 8, 64),
    (8, 2048, 16, 3, 3, 64),
])
def test_head_major_parity_gpu(bs: int, max_len: int, page: int, hkv: int, g: int, d: int,
                               dtype: torch.dtype) -> None:
    """Both attention kernels and the KV write on head-major blocks give the reference's
    results on the token-major cache of the same values (compiled, serving sizes)."""
    ctx = _ragged(bs, max_len, seed=bs + d)
    qlens = [c if i % 3 == 0 else (1 if i % 3 == 1 else max(1, c // 3)) for i, c in enumerate(ctx)]
    c = make_case(ctx, qlens, page=page, hkv=hkv, g=g, d=d, dtype=dtype)
    kh, vh = _head_major(c["k_cache"]), _head_major(c["v_cache"])
    assert kh.stride(1) == d
    args = (c["q"], c["k_cache"], c["v_cache"], c["qsl"], c["seq_lens"], c["bt"], c["scale"])
    got = triton_attention.prefill_attention(c["q"], kh, vh, *args[3:], c["max_q"])
    torch.testing.assert_close(got, reference.prefill_attention(*args), **TOL[dtype])
    q = torch.randn(bs, hkv * g, d, device="cuda", dtype=dtype)
    dargs = (c["seq_lens"], c["bt"], c["scale"])
    want = reference.decode_attention(q, c["k_cache"], c["v_cache"], *dargs)
    # The shipped grid order and eviction policy, then both orders with either policy.
    for splits, order, evict in ((None, None, None), (1, None, None), (3, None, None),
                                 (None, True, ""), (1, False, "evict_first"), (3, True, "evict_first")):
        got = triton_attention.decode_attention(q, kh, vh, *dargs, num_splits=splits,
                                                heads_first=order, evict=evict)
        torch.testing.assert_close(got, want, **TOL[dtype])
    k = torch.randn(50, hkv, d, device="cuda", dtype=dtype)
    slots = torch.randperm(kh.shape[0] * page, device="cuda")[:50]
    slots[::5] = -1
    triton_kv.write_kv(k, 2 * k, kh, vh, slots)
    reference.write_kv(k, 2 * k, c["k_cache"], c["v_cache"], slots)
    assert torch.equal(kh.nan_to_num(7.0), c["k_cache"].nan_to_num(7.0))
    assert torch.equal(vh.nan_to_num(7.0), c["v_cache"].nan_to_num(7.0))


def test_block_offsets_past_int32() -> None:
    """1M + 4k blocks of 16 x 1 x 128 fp16: 2.2e9 elements per cache, so the blocks used
    (the last ones) sit past element 2**31 and an int32 block offset would wrap."""
    nb = (1 << 20) + 4096
    ctx = [300, 1, 77]
    c = make_case(ctx, [20, 1, 77], page=16, hkv=1, g=4, d=128, dtype=torch.float16, num_blocks=nb)
    assert int(c["bt"][:, 0].min()) * c["k_cache"].stride(0) > 2**31
    args = (c["q"], c["k_cache"], c["v_cache"], c["qsl"], c["seq_lens"], c["bt"], c["scale"])
    torch.testing.assert_close(triton_attention.prefill_attention(*args, 77),
                               reference.prefill_attention(*args), **TOL[torch.float16])
    q = c["q"][[19, 20, 97]]
    dargs = (q, c["k_cache"], c["v_cache"], c["seq_lens"], c["bt"], c["scale"])
    torch.testing.assert_close(triton_attention.decode_attention(*dargs, num_splits=3),
                               reference.decode_attention(*dargs), **TOL[torch.float16])
    k = torch.randn(4, 1, 128, device="cuda", dtype=torch.float16)
    slots = torch.tensor([nb * 16 - 1, -1, (nb - 3) * 16 + 5, 0], device="cuda")
    triton_kv.write_kv(k, k, c["k_cache"], c["v_cache"], slots)
    torch.testing.assert_close(c["k_cache"][nb - 1, 15, 0], k[0, 0], atol=0, rtol=0)
    torch.testing.assert_close(c["v_cache"][nb - 3, 5, 0], k[2, 0], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_kv_gpu(dtype: torch.dtype) -> None:
    nb, page, hkv, d = 4096, 16, 8, 128
    qkv = torch.randn(500, 48, d, device="cuda", dtype=dtype)  # k/v as views of a fused output
    k, v = qkv[:, 32:40], qkv[:, 40:48]
    slots = torch.randperm(nb * page, device="cuda")[:500]
    slots[::7] = -1
    k_cache = torch.randn(nb, page, hkv, d, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.write_kv(k, v, want_k, want_v, slots)
    triton_kv.write_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_decode_cuda_graph_replay() -> None:
    """With num_splits fixed, decode captures once and replays over new lengths/tables."""
    ctx = _ragged(8, 2000, seed=5)
    c = make_case(ctx, [1] * 8, page=16, hkv=2, g=4, d=128, dtype=torch.bfloat16)
    seq_lens, bt = c["seq_lens"].clone(), c["bt"].clone()
    args = (c["q"], c["k_cache"], c["v_cache"], seq_lens, bt, c["scale"])
    triton_attention.decode_attention(*args, num_splits=4)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_attention.decode_attention(*args, num_splits=4)
    seq_lens.copy_(torch.clamp(seq_lens - 100, min=1))
    bt.copy_(bt.flip(0))
    seq_lens.copy_(seq_lens.flip(0))
    graph.replay()
    torch.testing.assert_close(out, reference.decode_attention(*args), **TOL[torch.bfloat16])


def _vocab_rows(bs: int, vocab: int, seed: int) -> torch.Tensor:
    """Distinct logits (no tie sits at a cut-off), a different spread per row."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    base = torch.stack([torch.randperm(vocab, device="cuda", generator=gen) for _ in range(bs)])
    scale = torch.linspace(2e-4, 1.5e-3, bs, device="cuda")[:, None]
    return (base.float() - vocab / 2) * scale


def test_sampling_kernel_gpu() -> None:
    """The sort-free filter and race at the Llama-3 vocabulary against the torch sort path.
    top-k and min-p cut-offs are exact; the top-p cut-off may differ by a token where the
    sort's cumulative sum and the kernel's sums round differently at the boundary."""
    from pdserve.kernels import triton_sampling
    from pdserve.sampling.sampler import filter_logits
    bs, vocab = 32, 128256
    x = _vocab_rows(bs, vocab, 0)
    top_k = [0, 1, 50, 4000, 0, 0, 0, 200] * 4
    top_p = [1.0, 1.0, 1.0, 1.0, 0.9, 0.5, 0.99, 0.8] * 4
    min_p = [0.0] * 8 + [0.05, 0.0, 0.2, 0.0] * 6
    args = (torch.tensor(top_k, dtype=torch.int32, device="cuda"),
            torch.tensor(top_p, device="cuda"), torch.tensor(min_p, device="cuda"))
    got = torch.isfinite(triton_sampling.filter_logits(x, *args))
    want = torch.isfinite(filter_logits(x, top_k, top_p, min_p))
    for i in range(bs):
        if top_p[i] == 1.0:
            assert torch.equal(got[i], want[i]), i
        else:
            assert int((got[i] ^ want[i]).sum()) <= 2, i
            assert bool(got[i, x[i].argmax()])
    temp = torch.linspace(0.5, 1.5, bs, device="cuda")
    q = torch.empty_like(x).exponential_(generator=torch.Generator(device="cuda").manual_seed(1))
    tokens = triton_sampling.sample(x, temp, *args, q)
    probs = filter_logits(x / temp[:, None], top_k, top_p, min_p).softmax(dim=-1)
    same = (tokens == (probs / q).argmax(dim=-1)).sum().item()
    assert same >= bs - 2, same
    assert bool(torch.isfinite(filter_logits(x / temp[:, None], top_k, top_p, min_p)
                               .gather(1, tokens[:, None])).all())
