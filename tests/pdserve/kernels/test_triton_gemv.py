"""pdserve's one-row GEMV kernels (pdserve/kernels/triton_gemv.py) against F.linear.

CPU: under TRITON_INTERPRET=1, fp32 and fp16 on small shapes, both designs, with and
without split-K (the in-kernel reduce and its counters), bias, and silu(gate) * up on
the fly. On CUDA the same file runs compiled, adds bf16, the Llama-3-8B shapes through
the configurations pdserve picks, CUDA-graph replays, and the model's one-row path.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET != '1': Triton kernels cannot run",
                allow_module_level=True)

from pdserve.kernels import triton_fused, triton_gemv  # noqa: E402
from pdserve.kernels.triton_gemv import GemvConfig, gemv, pick_config  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])
# fp32 accumulation in both; the sums run in another order than BLAS's, and the result
# rounds once to the dtype.
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
CONFIGS = [GemvConfig("fma", block_n=16, block_k=32, splits=1, unroll=2),
           GemvConfig("fma", block_n=8, block_k=64, splits=2, unroll=1),
           GemvConfig("fma", block_n=16, block_k=32, splits=4, unroll=2),
           GemvConfig("dot", block_n=16, block_k=32, splits=1, num_stages=2),
           GemvConfig("dot", block_n=32, block_k=64, splits=2, num_stages=2)]


def rand(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype).to(DEVICE)


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool):
    a = triton_fused.reference_silu_and_mul(x) if silu_mul else x
    return F.linear(a.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.design}-s{c.splits}")
@pytest.mark.parametrize("silu_mul", [False, True])
def test_gemv_equals_linear(dtype: torch.dtype, cfg: GemvConfig, silu_mul: bool) -> None:
    n, k = 40, 256                      # 40 rows: a masked last tile at block_n 16 and 32
    w = rand(n, k, dtype=dtype, seed=1, scale=0.1)
    x = rand(1, 2 * k if silu_mul else k, dtype=dtype, seed=2)
    bias = rand(n, dtype=dtype, seed=3)
    want = reference(x, w, bias, silu_mul)
    # Three calls in a row: a split-K counter that did not come back to zero would
    # hand the reduce to the wrong program on the next call, and the output would change.
    for _ in range(3):
        got = gemv(x, w, cfg, silu_mul=silu_mul, bias=bias)
        torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(gemv(x, w, cfg, silu_mul=silu_mul), reference(x, w, None, silu_mul),
                               **TOL[dtype])
    if cfg.splits > 1:
        _, count = triton_gemv._scratch(x.device, n, cfg)
        assert int(count.abs().sum()) == 0


def test_gemv_rejects_what_it_cannot_run() -> None:
    w = rand(32, 256, dtype=torch.float32, seed=1)
    with pytest.raises(ValueError, match="does not fit"):
        gemv(rand(1, 128, dtype=torch.float32, seed=2), w, CONFIGS[0])
    with pytest.raises(ValueError, match="x \\[1, K\\]"):
        gemv(rand(2, 256, dtype=torch.float32, seed=2), w, CONFIGS[0])
    with pytest.raises(ValueError, match="whole"):
        gemv(rand(1, 256, dtype=torch.float32, seed=2), w, GemvConfig("fma", 16, 32, splits=3))
    with pytest.raises(ValueError, match="bias"):
        gemv(rand(1, 256, dtype=torch.float32, seed=2), w, CONFIGS[0],
             bias=rand(31, dtype=torch.float32, seed=3))


def test_pick_config() -> None:
    # The Llama-3-8B decoder shapes: the probe's best "fma" tiles, the LM head on "dot".
    assert pick_config(6144, 4096) == GemvConfig("fma", 2, 1024, 1, 4, 4)
    assert pick_config(4096, 4096) == GemvConfig("fma", 2, 1024, 1, 4, 4)
    assert pick_config(28672, 4096) == GemvConfig("fma", 4, 1024, 1, 2, 8)
    assert pick_config(4096, 14336) == GemvConfig("fma", 4, 1024, 1, 2, 8)
    assert pick_config(128256, 4096).design == "dot"
    # Qwen2.5-0.5B's hidden size, 896 = 7 * 128: 128-column loads, no unroll that divides.
    cfg = pick_config(1152, 896)
    assert (cfg.block_k, cfg.unroll) == (128, 1)
    cfg.check(1152, 896)
    assert pick_config(1024, 576) is None            # SmolLM2's 576 = 9 * 64: cuBLAS


@pytest.mark.skipif(INTERPRET, reason="CUDA: compiled kernels on the real shapes")
@pytest.mark.parametrize("shape", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
                                   (128256, 4096), (3072, 2048), (2048, 8192)])
def test_linear_1row_on_model_shapes(shape: tuple[int, int]) -> None:
    n, k = shape
    w = rand(n, k, dtype=torch.bfloat16, seed=1, scale=0.02)
    silu = k > 8192 or k == 8192
    x = rand(1, 2 * k if silu else k, dtype=torch.bfloat16, seed=2)
    assert triton_gemv.supports(x[:, :k], w)
    got = triton_gemv.linear_1row(x, w, silu_mul=silu)
    assert got is not None
    torch.testing.assert_close(got, reference(x, w, None, silu), **TOL[torch.bfloat16])


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs")
@pytest.mark.parametrize("cfg", [pick_config(4096, 4096), GemvConfig("fma", 4, 512, 4, 2, 4),
                                 GemvConfig("dot", 32, 128, 4, 1, 4, 4)],
                         ids=["picked", "fma-split4", "dot-split4"])
def test_gemv_replays_in_a_cuda_graph(cfg: GemvConfig) -> None:
    w = rand(4096, 4096, dtype=torch.bfloat16, seed=1, scale=0.02)
    x = rand(1, 4096, dtype=torch.bfloat16, seed=2)
    gemv(x, w, cfg)                                   # compile, and the split-K scratch
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv(x, w, cfg)
    want = reference(x, w, None, False)
    for i in range(3):
        x.copy_(rand(1, 4096, dtype=torch.bfloat16, seed=10 + i))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, reference(x, w, None, False), **TOL[torch.bfloat16])
    assert not torch.equal(out, want)                 # the replays saw the new inputs


@pytest.mark.skipif(INTERPRET, reason="CUDA: the model's one-row path")
def test_model_one_row_path_uses_gemv(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 Llama layer stack on the Triton backend: a one-token forward with the GEMV
    gives cuBLAS's logits (PDSERVE_GEMV=0) within bf16 rounding, and does call it."""
    from pdserve.model import llama
    calls: list[tuple[int, int]] = []
    real = triton_gemv.gemv

    def counting(x, weight, cfg, **kw):  # type: ignore[no-untyped-def]
        calls.append(tuple(weight.shape))
        return real(x, weight, cfg, **kw)
    monkeypatch.setattr(triton_gemv, "gemv", counting)
    w = {"qkv": rand(3072, 2048, dtype=torch.bfloat16, seed=1, scale=0.02),
         "bias": rand(3072, dtype=torch.bfloat16, seed=2, scale=0.1),
         "down": rand(2048, 8192, dtype=torch.bfloat16, seed=3, scale=0.02)}
    x = rand(1, 2048, dtype=torch.bfloat16, seed=4)
    gu = rand(1, 16384, dtype=torch.bfloat16, seed=5)
    got = (llama.fused_linear(x, w["qkv"], w["bias"]), llama.fused_linear(gu, w["down"], silu_mul=True))
    assert calls == [(3072, 2048), (2048, 8192)]
    monkeypatch.setenv("PDSERVE_GEMV", "0")
    want = (llama.fused_linear(x, w["qkv"], w["bias"]), llama.fused_linear(gu, w["down"], silu_mul=True))
    assert len(calls) == 2                            # cuBLAS this time
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **TOL[torch.bfloat16])
