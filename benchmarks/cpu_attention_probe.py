"""Probe: can CPU decode attention on a bf16 paged cache beat reference.decode_attention?

The torch backend's decode reads each group of similar-length sequences by gathering
their blocks (index_select), upcasting K/V to fp32 and calling SDPA's CPU flash kernel.
This probe times that against three other torch formulations on the default model's
attention shape (SmolLM2-135M: 9 query / 3 kv heads, head dim 64, page 16), for a batch
of 64 sequences of 40-600 tokens in a random block order, one layer's call:

- ``current``: reference.decode_attention (gather, fp32 SDPA);
- ``sdpa_16``: the same gather, SDPA straight on the bf16 K/V;
- ``matmul_16``: the same gather, q·Kᵀ and P·V as bf16 matmuls on the gathered (strided)
  K/V, softmax in fp32;
- ``head_major``: blocks gathered head-major (index_select on a [Hkv, blocks, page, D]
  view), so every (sequence, head) row is contiguous for the two matmuls.

And prefill: SDPA (causal) on one sequence of T tokens in fp32, in bf16, and upcast from
bf16. Every variant is checked against the fp32 reference first; times are the best of 3
rounds of 20 calls, rounds interleaved across variants.

    python benchmarks/cpu_attention_probe.py [--threads 2]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pdserve.kernels import reference as R  # noqa: E402

HQ, HKV, D, PAGE = 9, 3, 64, 16


def _matmul_attention(q, k, v, mask, scale):
    """q [n, Hq, D]; k, v [n, Hkv, N, D] (any strides) -> [n, Hq, D]."""
    n, hkv = k.shape[0], k.shape[1]
    s = torch.matmul(q.view(n, hkv, -1, q.shape[-1]), k.transpose(-1, -2)).float() * scale
    if mask is not None:
        s.masked_fill_(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, -1).to(k.dtype), v).reshape(q.shape)


def variants(q, kc, vc, gather, scale):
    bufs: dict = {}

    def over_groups(attend):
        out = torch.empty_like(q)
        for g in gather.groups:
            qg = q if g.rows is None else q.index_select(0, g.rows)
            o = attend(qg, g)
            if g.rows is None:
                return o
            out.index_copy_(0, g.rows, o)
        return out

    def gathered(qg, g):
        n = qg.shape[0]
        return R._gather_group(kc, g, n, bufs, "k"), R._gather_group(vc, g, n, bufs, "v")

    def sdpa_16(qg, g):
        k, v = gathered(qg, g)
        return F.scaled_dot_product_attention(qg[:, :, None, :], k, v, attn_mask=g.mask, scale=scale,
                                              enable_gqa=True)[:, :, 0, :]

    def matmul_16(qg, g):
        k, v = gathered(qg, g)
        return _matmul_attention(qg, k, v, g.mask, scale)

    kp, vp = kc.permute(2, 0, 1, 3), vc.permute(2, 0, 1, 3)      # [Hkv, blocks, page, D]

    def head_major(qg, g):
        n = qg.shape[0]
        width = g.nblk * PAGE
        length = g.length or width
        k = torch.index_select(kp, 1, g.blocks).view(HKV, n, width, D)[:, :, :length].transpose(0, 1)
        v = torch.index_select(vp, 1, g.blocks).view(HKV, n, width, D)[:, :, :length].transpose(0, 1)
        if g.pad is not None:   # stale slots past a row's length: zero them as the gather does
            keep = g.mask.view(n, 1, width, 1)
            k, v = k * keep, v * keep
        return _matmul_attention(qg, k, v, g.mask, scale)

    seq_lens = torch.tensor([0])  # unused with a prebuilt gather
    return {
        "current": lambda: R.decode_attention(q, kc, vc, seq_lens, None, scale, gather=gather),
        "sdpa_16": lambda: over_groups(sdpa_16),
        "matmul_16": lambda: over_groups(matmul_16),
        "head_major": lambda: over_groups(head_major),
    }


def best_ms(fns: dict, rounds: int = 3, calls: int = 20) -> dict:
    for f in fns.values():
        f()
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(calls):
                f()
            best[k] = min(best[k], (time.perf_counter() - t) / calls * 1e3)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    lens = [rng.randint(40, 600) for _ in range(args.batch)]
    nblk = [-(-n // PAGE) for n in lens]
    perm = torch.randperm(sum(nblk), generator=torch.Generator().manual_seed(0))
    tables = torch.zeros(args.batch, max(nblk), dtype=torch.int32)
    at = 0
    for i, n in enumerate(nblk):
        tables[i, :n] = perm[at:at + n].int()
        at += n
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    scale = D ** -0.5
    kv_mb = 2 * sum(lens) * HKV * D * 2 / 2**20
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; decode: {args.batch} sequences, "
          f"{sum(lens)} tokens, {kv_mb:.1f} MiB of bf16 K+V a layer", flush=True)
    kc = torch.randn(sum(nblk), PAGE, HKV, D).bfloat16()
    vc = torch.randn_like(kc)
    q = torch.randn(args.batch, HQ, D).bfloat16()
    gather = R.decode_gather(seq_lens, tables, PAGE, lens=lens, block_bytes=kc[0].numel() * kc.element_size())
    want = R.decode_attention(q.float(), kc.float(), vc.float(), seq_lens, tables, scale)
    fns = variants(q, kc, vc, gather, scale)
    for name, f in fns.items():
        err = float((f().float() - want).abs().max())
        print(f"  {name:10s} max abs err vs fp32 reference {err:.1e}", flush=True)
        if err > 5e-2:
            raise SystemExit(f"{name} is wrong")
    ms = best_ms(fns)
    for name, t in ms.items():
        print(f"  {name:10s} {t:7.2f} ms a layer ({ms['current'] / t:.2f}x current)", flush=True)

    print("prefill, SDPA causal on one sequence (9 / 3 heads, d 64), ms a layer:", flush=True)
    for t in (64, 300, 512):
        qf, kf, vf = torch.randn(1, HQ, t, D), torch.randn(1, HKV, t, D), torch.randn(1, HKV, t, D)
        qb, kb, vb = qf.bfloat16(), kf.bfloat16(), vf.bfloat16()

        def sdpa(a, b, c):
            return lambda: F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=True)
        pm = best_ms({"fp32": sdpa(qf, kf, vf), "bf16": sdpa(qb, kb, vb),
                      "bf16 upcast": lambda: sdpa(qb.float(), kb.float(), vb.float())()})
        print(f"  T {t:4d}: " + " | ".join(f"{k} {v:.3f}" for k, v in pm.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
