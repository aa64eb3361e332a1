"""Fused elementwise Triton kernels (add + RMSNorm, SiLU-and-mul, rotary) against the
torch ops they replace, and a tiny model whose layers take the fused path (Triton
backend) against the same model on the torch reference ops.

CPU: under TRITON_INTERPRET=1, fp32 and fp16 (the interpreter mangles bf16). On CUDA the
same file runs compiled and adds bf16. The kernels round where the torch ops round, so
fp16/bf16 results match to one ulp of the dtype (rsqrt vs 1/sqrt and exp differ in the
last fp32 bits) and fp32 to ~1e-6.
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET != '1': Triton kernels cannot run",
                allow_module_level=True)

from pdserve.kernels import get_attention_ops, reference, triton_fused  # noqa: E402
from pdserve.model.rope import RotaryEmbedding  # noqa: E402
from pdserve.config import RopeScaling  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


def rand(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [48, 96])          # not a power of two: masked tail
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm(dtype: torch.dtype, hidden: int, with_residual: bool) -> None:
    x = rand(5, hidden, dtype=dtype, seed=1)
    res = rand(5, hidden, dtype=dtype, seed=2) if with_residual else None
    w = (1 + 0.1 * rand(hidden, dtype=torch.float32, seed=3)).to(dtype)
    out, new_res = triton_fused.add_rms_norm(x, res, w, 1e-6)
    want, want_res = triton_fused.reference_add_rms_norm(x, res, w, 1e-6)
    torch.testing.assert_close(new_res, want_res, atol=0, rtol=0)   # the add rounds alike
    torch.testing.assert_close(out, want, **TOL[dtype])
    if res is not None:
        assert torch.equal(res, rand(5, hidden, dtype=dtype, seed=2))  # input untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype: torch.dtype) -> None:
    x = rand(3, 2 * 40, dtype=dtype, seed=4) * 3
    torch.testing.assert_close(triton_fused.silu_and_mul(x),
                               triton_fused.reference_silu_and_mul(x), **TOL[dtype])
    assert triton_fused.silu_and_mul(x[:0]).shape == (0, 40)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_on_views_of_a_fused_qkv(dtype: torch.dtype) -> None:
    from pdserve.model.rope import apply_rotary
    T, hq, hkv, d = 4, 4, 2, 16
    qkv = rand(T, (hq + 2 * hkv) * d, dtype=dtype, seed=5)
    q = qkv[:, :hq * d].view(T, hq, d)                       # strided rows, as in the model
    k = qkv[:, hq * d:(hq + hkv) * d].view(T, hkv, d)
    rope = RotaryEmbedding(d, 64, 10000.0, RopeScaling()).to(DEVICE)
    cos, sin = rope(torch.tensor([0, 3, 17, 63], device=DEVICE), dtype)
    got_q, got_k = triton_fused.rotary(q, k, cos, sin)
    want_q, want_k = apply_rotary(q, k, cos, sin)
    torch.testing.assert_close(got_q, want_q, **TOL[dtype])
    torch.testing.assert_close(got_k, want_k, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page,head_major", [(8, False), (16, False), (16, True)])
def test_rotary_write_kv_equals_rotary_then_write_kv(dtype: torch.dtype, page: int,
                                                     head_major: bool) -> None:
    """One launch for rotary and the KV write: q as rotary() gives it, and the cache as
    write_kv(rotated k, v) leaves it, bit for bit; a padding slot (-1) writes nothing."""
    from pdserve.kernels import triton_kv
    T, hq, hkv, d = 5, 6, 2, 16
    qkv = rand(T, (hq + 2 * hkv) * d, dtype=dtype, seed=6)
    q = qkv[:, :hq * d].view(T, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(T, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(T, hkv, d)
    rope = RotaryEmbedding(d, 64, 10000.0, RopeScaling()).to(DEVICE)
    cos, sin = rope(torch.tensor([0, 3, 17, 40, 63], device=DEVICE), dtype)
    slots = torch.tensor([3, page + 1, -1, 2 * page, 0], dtype=torch.int64, device=DEVICE)
    sentinel = rand(4, page, hkv, d, dtype=dtype, seed=7)   # any slot not written keeps it
    kc, vc = sentinel.clone(), sentinel.clone() * 2
    if head_major:   # the same values in [block, Hkv, page, D] memory order
        kc, vc = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (kc, vc))
    # the expected cache is written token-major: the layouts must agree value for value
    want_kc, want_vc = (x.clone(memory_format=torch.contiguous_format) for x in (kc, vc))
    got_q = triton_fused.rotary_write_kv(q, k, v, cos, sin, kc, vc, slots)
    want_q, rot_k = triton_fused.rotary(q, k, cos, sin)
    triton_kv.write_kv(rot_k, v.contiguous(), want_kc, want_vc, slots)
    assert torch.equal(got_q, want_q)
    assert torch.equal(kc, want_kc) and torch.equal(vc, want_vc)
    flat = kc.reshape(-1, hkv, d)
    assert torch.equal(flat[page + 1], rot_k[1])                          # really written
    assert torch.equal(flat[5], sentinel.view(-1, hkv, d)[5])             # untouched slot


@pytest.mark.parametrize("layout", ["token", "head"])
def test_layers_take_the_fused_path_with_the_triton_backend(layout: str) -> None:
    """A tiny Llama on the Triton ops (fused norms, rotary, SiLU) gives the logits of the
    same weights on the torch reference ops (unfused), prefill and decode steps, with
    token-major or head-major KV blocks on the Triton side."""
    import importlib.util
    from pathlib import Path
    if DEVICE != "cpu":
        pytest.skip("the tiny-model harness builds CPU tensors")
    spec = importlib.util.spec_from_file_location(
        "fused_harness", Path(__file__).parents[1] / "model" / "test_fused.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    FAMILIES, random_model, run_steps = harness.FAMILIES, harness.random_model, harness.run_steps
    model = random_model(FAMILIES["llama"])
    model.fuse_projections()
    want = run_steps(model)
    calls = []
    real = triton_fused.add_rms_norm

    def counting(*a, **k):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*a, **k)
    triton_ops = get_attention_ops("triton")
    for layer in model.model.layers:
        layer.self_attn.ops = triton_ops
    try:
        triton_fused.add_rms_norm = counting
        got = run_steps(model, layout)
    finally:
        triton_fused.add_rms_norm = real
    # 2 norms per layer and the final one, per step
    assert len(calls) == 2 * (2 * len(model.model.layers) + 1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
