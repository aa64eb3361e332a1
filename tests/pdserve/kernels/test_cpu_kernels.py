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
