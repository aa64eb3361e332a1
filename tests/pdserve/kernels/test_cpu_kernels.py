"""The CPU attention kernel (pdserve/kernels/cpu_kernels.c) against the torch reference.

Unwritten cache slots hold NaN (tests/pdserve/kernels/test_reference.py's _paged_case),
so a kernel that reads one position past a sequence's length fails here.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from pdserve.kernels import cpu_kernels, get_attention_ops, reference
from pdserve.kernels.metadata import AttentionMetadata
from tests.pdserve.kernels.test_reference import _paged_case

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                                reason="no C compiler")

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _meta(c: dict, q_lens: list[int], ctx_lens: list[int]) -> AttentionMetadata:
    return AttentionMetadata(torch.empty(0, dtype=torch.int64), c["qsl"], c["seq_lens"], c["bt"],
                             max(q_lens), max(ctx_lens), list(q_lens), list(ctx_lens))


def _check(ctx_lens, q_lens, page, hkv, g, d, dtype, head_major=False):
    c = _paged_case(ctx_lens, q_lens, page, hkv, g, d, dtype)
    k, v = c["k_cache"], c["v_cache"]
    if head_major:   # [N, Hkv, page, D] storage seen as [N, page, Hkv, D]
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
        v = v.transpose(1, 2).contiguous().transpose(1, 2)
    meta = _meta(c, q_lens, ctx_lens)
    assert cpu_kernels.usable(c["q"], k, v)
    got = cpu_kernels.paged_attention(c["q"], k, v, meta, c["scale"])
    want = reference.paged_attention(c["q"], c["k_cache"], c["v_cache"], meta, c["scale"])
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.isfinite(got.float()).all()
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_the_kernel_builds_and_auto_picks_it():
    assert cpu_kernels.available()
    assert get_attention_ops("auto", torch.device("cpu")).name == "cpu"


@pytest.mark.parametrize("page", [8, 16, 32])
@pytest.mark.parametrize("hkv,g", [(4, 1), (3, 3), (2, 4), (1, 8)])
@pytest.mark.parametrize("d", [64, 128])
def test_decode_batch(page, hkv, g, d):
    ctx = [1, 5, page, page + 1, 3 * page - 1, 70]
    _check(ctx, [1] * len(ctx), page, hkv, g, d, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_step_with_prefix_chunks(dtype):
    # decode rows, a whole prompt, and prefill chunks after a cached prefix (ctx > qlen),
    # with more rows than one work item takes (32 query vectors)
    ctx, ql = [40, 1, 97, 33, 17, 80], [1, 1, 97, 13, 1, 50]
    _check(ctx, ql, 16, 3, 3, 64, dtype)


def test_head_major_strides():
    _check([9, 50, 33], [1, 20, 1], 16, 2, 4, 64, torch.float32, head_major=True)


def test_empty_rows_get_zeros():
    c = _paged_case([20, 1, 7], [1, 1, 1], 16, 2, 2, 64)
    c["seq_lens"] = torch.tensor([20, 0, 7], dtype=torch.int32)   # a padded batch row
    meta = _meta(c, [1, 1, 1], [20, 0, 7])
    got = cpu_kernels.paged_attention(c["q"], c["k_cache"], c["v_cache"], meta, c["scale"])
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    want = reference.paged_attention(c["q"], c["k_cache"], c["v_cache"], meta, c["scale"])
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], atol=2e-5, rtol=2e-5)


def test_unsupported_head_dim_falls_back_to_the_reference():
    c = _paged_case([9, 30], [1, 1], 16, 2, 2, 40)
    meta = _meta(c, [1, 1], [9, 30])
    assert not cpu_kernels.usable(c["q"], c["k_cache"], c["v_cache"])
    got = cpu_kernels.paged_attention(c["q"], c["k_cache"], c["v_cache"], meta, c["scale"])
    want = reference.paged_attention(c["q"], c["k_cache"], c["v_cache"], meta, c["scale"])
    assert torch.equal(got, want)


def test_query_view_with_row_stride():
    # the model passes q as a view into the fused q|k rotary output: rows are strided
    c = _paged_case([30, 12], [1, 12], 16, 2, 3, 64)
    wide = torch.randn(c["q"].shape[0], 8, 64)
    wide[:, :6] = c["q"]
    q = wide[:, :6]
    assert not q.is_contiguous()
    meta = _meta(c, [1, 12], [30, 12])
    got = cpu_kernels.paged_attention(q, c["k_cache"], c["v_cache"], meta, c["scale"])
    want = reference.paged_attention(c["q"], c["k_cache"], c["v_cache"], meta, c["scale"])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


# -- the fused elementwise ops: bit-identical to the torch ops in 16-bit dtypes ----------
def _rope(T: int, d: int, dtype: torch.dtype):
    from pdserve.config import RopeScaling
    from pdserve.model.rope import RotaryEmbedding
    pos = torch.randint(0, 900, (T,), generator=torch.Generator().manual_seed(T))
    return RotaryEmbedding(d, 1024, 10000.0, RopeScaling())(pos, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 70])
def test_add_rms_norm_matches_the_torch_ops(dtype, rows):
    from pdserve.model.llama import RMSNorm
    g = torch.Generator().manual_seed(rows)
    x, res = (torch.randn(rows, 576, generator=g).to(dtype) for _ in range(2))
    norm = RMSNorm(576, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(576, generator=g))
    w = norm.weight.detach()
    with torch.no_grad():
        for r in (res, None):
            out, s = cpu_kernels.add_rms_norm(x, r, w, 1e-5)
            s_want = x if r is None else r + x
            assert torch.equal(s, s_want)
            # HF's order in the 16-bit dtypes (float32 vs pow/mean/rsqrt of torch: summation order)
            want = w * (s_want.float() * torch.rsqrt(s_want.float().pow(2).mean(-1, keepdim=True)
                                                      + 1e-5)).to(dtype)
            if dtype == torch.bfloat16:
                assert torch.equal(out, want)
            else:
                torch.testing.assert_close(out, want, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_and_mul_matches_the_torch_ops(dtype):
    x = (3 * torch.randn(33, 2 * 1536, generator=torch.Generator().manual_seed(1))).to(dtype)
    x[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -0.0])      # e^-g overflows / underflows
    gate, up = x.chunk(2, dim=-1)
    got, want = cpu_kernels.silu_and_mul(x), torch.nn.functional.silu(gate) * up
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("d,hq,hkv", [(64, 9, 3), (128, 8, 2)])
def test_rotary_write_kv_matches_rotate_and_write(dtype, d, hq, hkv):
    from pdserve.model.rope import rotate
    T = 21
    g = torch.Generator().manual_seed(d)
    wide = torch.randn(T, (hq + 2 * hkv) * d + 8, generator=g).to(dtype)
    qkv = wide[:, :(hq + 2 * hkv) * d]                 # rows strided, as a view of a wider GEMM
    cos, sin = _rope(T, d, dtype)
    k_cache = torch.zeros(12, 16, hkv, d, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(12 * 16, generator=g)[:T]
    slots[5] = -1                                      # padding: written nowhere
    q = cpu_kernels.rotary_write_kv(qkv, cos, sin, k_cache, v_cache, slots, hq, hkv)
    qk = rotate(qkv[:, :(hq + hkv) * d].reshape(T, hq + hkv, d), cos, sin)
    reference.write_kv(qk[:, hq:], qkv[:, (hq + hkv) * d:].reshape(T, hkv, d), k_want, v_want, slots)
    assert torch.equal(q, qk[:, :hq])
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)


def test_unsupported_widths_raise():
    with pytest.raises(ValueError, match="multiple of 32"):
        cpu_kernels.silu_and_mul(torch.randn(2, 40))
    assert not cpu_kernels.elementwise_usable(torch.randn(2, 40))
    with pytest.raises(ValueError, match="rotary_write_kv"):
        k = torch.zeros(2, 16, 1, 16)
        cos, sin = _rope(1, 16, torch.float32)
        cpu_kernels.rotary_write_kv(torch.randn(1, 48), cos, sin, k, k.clone(),
                                    torch.zeros(1, dtype=torch.int64), 1, 1)


def test_bf16_model_steps_agree_across_the_cpu_and_torch_backends():
    """A tiny bf16 model whose widths take every C path (head dim 32, hidden 64, MLP 96):
    the cpu backend (C attention and fused elementwise ops) against the torch reference
    over a mixed prefill step and a decode step, on bf16 caches."""
    from pdserve.config import ModelConfig
    from pdserve.model.llama import CausalLM, allocate_kv_caches
    cfg = ModelConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False})

    def run(backend: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = CausalLM(cfg, get_attention_ops(backend)).eval().requires_grad_(False)
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
        model.fuse_projections()
        model = model.to(torch.bfloat16)
        kv = allocate_kv_caches(cfg, 8, 16, torch.bfloat16, "cpu")
        g = torch.Generator().manual_seed(3)
        tables = [[5], [2, 7]]
        out = []
        for lens, start in (([7, 20], [0, 0]), ([1, 1], [7, 20])):
            ids = torch.randint(0, 128, (sum(lens),), generator=g)
            pos = [p for s, n in zip(start, lens) for p in range(s, s + n)]
            slots = [t[p // 16] * 16 + p % 16 for t, s, n in zip(tables, start, lens)
                     for p in range(s, s + n)]
            seq_lens = [s + n for s, n in zip(start, lens)]
            meta = AttentionMetadata(torch.tensor(slots), torch.tensor([0, lens[0], sum(lens)],
                                     dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32),
                                     torch.tensor([[5, 0], [2, 7]], dtype=torch.int32), max(lens),
                                     max(seq_lens), lens, seq_lens)
            with torch.no_grad():
                out.append(model.compute_logits(model(ids, torch.tensor(pos), kv, meta)))
        return out

    for a, b in zip(run("torch"), run("cpu")):
        torch.testing.assert_close(b, a, atol=5e-2, rtol=5e-2)
