"""Programmatic dependent launch (pdserve/kernels/pdl.py).

CPU: it is never turned on without a Hopper GPU, whatever PDSERVE_PDL says. On a GPU of
compute capability >= 9: a chain of the decode step's kernels, each reading what the one
before it wrote (add + RMSNorm -> qkv GEMV -> rotary + KV write -> split-KV decode
attention and its reduce -> o_proj GEMV -> add + RMSNorm), gives bit-identical results with
PDL on and off, eagerly and as CUDA-graph replays with new inputs. A kernel that started
reading before its predecessor finished would show up as a difference.
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from pdserve.kernels import pdl  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HOPPER = (torch.cuda.is_available() and not INTERPRET
          and torch.cuda.get_device_capability()[0] >= 9)


def test_off_without_a_hopper_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_PDL", "1")
    assert pdl.launch_args(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl.enabled(torch.device("cuda", 0))     # never under the interpreter
    monkeypatch.setenv("PDSERVE_PDL", "0")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert pdl.launch_args(torch.device("cuda", 0)) == {"PDL": False}


def _chain(w: dict, x: torch.Tensor, res: torch.Tensor, st: dict) -> tuple[torch.Tensor, ...]:
    from pdserve.kernels import triton_attention, triton_fused, triton_gemv
    h, r1 = triton_fused.add_rms_norm(x, res, w["norm1"], 1e-5)
    qkv = triton_gemv.linear_1row(h, w["qkv"])
    hq, hkv, d = st["hq"], st["hkv"], st["d"]
    q = qkv[:, :hq * d].view(1, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(1, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(1, hkv, d)
    q = triton_fused.rotary_write_kv(q, k, v, st["cos"], st["sin"], st["k_cache"],
                                     st["v_cache"], st["slot"])
    attn = triton_attention.decode_attention(q, st["k_cache"], st["v_cache"], st["seq_lens"],
                                             st["tables"], d ** -0.5, num_splits=4)
    o = triton_gemv.linear_1row(attn.reshape(1, hq * d), w["o"])
    out, r2 = triton_fused.add_rms_norm(o, r1, w["norm2"], 1e-5)
    return qkv, attn, out, r2


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a GPU of compute capability >= 9")
def test_decode_chain_is_identical_with_pdl(monkeypatch: pytest.MonkeyPatch) -> None:
    if not pdl._HAS_GDC:
        pytest.skip("this Triton has no gdc intrinsics")
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    hidden, hq, hkv, d, page, ctx = 1024, 8, 2, 128, 16, 600

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=g, device=dev)).to(dt)
    w = {"norm1": rnd(hidden), "norm2": rnd(hidden),
         "qkv": rnd((hq + 2 * hkv) * d, hidden, scale=0.02), "o": rnd(hidden, hq * d, scale=0.02)}
    nb = 64
    st = {"hq": hq, "hkv": hkv, "d": d,
          "k_cache": rnd(nb, page, hkv, d), "v_cache": rnd(nb, page, hkv, d),
          "cos": rnd(1, 1, d), "sin": rnd(1, 1, d),
          "seq_lens": torch.tensor([ctx], dtype=torch.int32, device=dev)}
    # the sequence's blocks, shuffled; its last position's slot is in its last block
    blocks = torch.randperm(nb, generator=g, device=dev)[:triton.cdiv(ctx, page)].to(torch.int32)
    st["tables"] = blocks.view(1, -1)
    st["slot"] = (blocks[-1].to(torch.int64) * page + (ctx - 1) % page).view(1)
    x, res = rnd(1, hidden), rnd(1, hidden)

    def run(pdl_on: bool) -> list[torch.Tensor]:
        monkeypatch.setenv("PDSERVE_PDL", "1" if pdl_on else "0")
        return [t.clone() for t in _chain(w, x, res, st)]

    monkeypatch.setenv("PDSERVE_PDL", "1")
    assert pdl.enabled(dev)
    want = run(False)
    for got, ref in zip(run(True), want):
        assert torch.equal(got, ref)
    # CUDA graph with PDL on, replayed with new inputs; each checked against PDL off
    monkeypatch.setenv("PDSERVE_PDL", "1")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _chain(w, x, res, st)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = _chain(w, x, res, st)
    for i in range(5):
        x.copy_(rnd(1, hidden))
        res.copy_(rnd(1, hidden))
        want = run(False)
        graph.replay()
        torch.cuda.synchronize()
        for got, ref in zip(outs, want):
            assert torch.equal(got, ref), f"replay {i}"
