"""Probe: do TMA page loads close the decode kernel's gap to SDPA (bs >= 32, ctx >= 4k)?

pdserve's decode kernel gathers each K/V tile row by row: every one of BLOCK_N rows gets
its own address from the block table, and the loads go through the LSU. On Hopper a page
of one kv head ([PAGE, D], 16 x 256 B rows, Hkv*D apart) is one 2-D box of a tensor
descriptor over the cache viewed as [num_blocks * PAGE, Hkv * D], so the TMA unit can
fetch it whole, asynchronously, with one address per page. This probe times, with the
same inputs and as gpu_suite part b times (CUDA-graph replays over rotated copies):

- torch SDPA (enable_gqa, contiguous KV);
- pdserve's kernel on the random block order of part b, and on the same KV with each
  sequence's blocks in order (what the gather itself costs);
- a TMA variant of the split kernel (PAGES pages a loop iteration, each its own
  descriptor load and its own dots, so no tile is ever concatenated), merged by pdserve's
  reduce kernel, over PAGES x warps x stages x split counts.

    python benchmarks/decode_tma_probe.py [--out OUT.json] [--quick]

The answer goes into benchmarks/RESULTS.md. It runs under TRITON_INTERPRET=1 on small
shapes too (--check), which checks the TMA kernel against the torch reference.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))     # gpu_suite_parts

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from pdserve.kernels import triton_attention as ta  # noqa: E402

_LOG2E = 1.4426950408889634


@triton.jit
def _page_scores(q, k_desc, bt_row, n0, end, kvh, scale_log2,
                 PAGE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Scores [BLOCK_G, PAGE] of the page holding positions n0..n0+PAGE-1, and its K."""
    blk = tl.load(bt_row + n0 // PAGE, mask=n0 < end, other=0)
    k = k_desc.load([blk * PAGE, kvh * HEAD_DIM])                      # [PAGE, D]
    s = tl.dot(q, tl.trans(k))
    pos = n0 + tl.arange(0, PAGE)
    return tl.where((pos < end)[None, :], s * scale_log2, float("-inf")), blk


@triton.jit
def _tma_split_kernel(
    q_ptr, k_desc, v_desc, seq_lens_ptr, bt_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    scale_log2, num_splits, stride_qb, stride_qh, stride_bt, stride_ob, stride_oh,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_G: tl.constexpr,
    PAGES: tl.constexpr, ONE_SPLIT: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    TILE: tl.constexpr = PAGE * PAGES
    start, end = ta.split_range(seq_len, split, num_splits, TILE)
    offs_d = tl.arange(0, HEAD_DIM)
    b64 = b.to(tl.int64)
    q, heads, gmask = ta.load_group_q(q_ptr, b64, kvh, stride_qb, stride_qh, G, BLOCK_G, HEAD_DIM, HEAD_DIM)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    bt_row = bt_ptr + b64 * stride_bt
    for n0 in range(start, end, TILE):
        s0, blk0 = _page_scores(q, k_desc, bt_row, n0, end, kvh, scale_log2, PAGE, HEAD_DIM)
        m_new = tl.maximum(m_i, tl.max(s0, axis=1))
        if PAGES >= 2:
            s1, blk1 = _page_scores(q, k_desc, bt_row, n0 + PAGE, end, kvh, scale_log2, PAGE, HEAD_DIM)
            m_new = tl.maximum(m_new, tl.max(s1, axis=1))
        if PAGES >= 4:
            s2, blk2 = _page_scores(q, k_desc, bt_row, n0 + 2 * PAGE, end, kvh, scale_log2, PAGE, HEAD_DIM)
            s3, blk3 = _page_scores(q, k_desc, bt_row, n0 + 3 * PAGE, end, kvh, scale_log2, PAGE, HEAD_DIM)
            m_new = tl.maximum(m_new, tl.maximum(tl.max(s2, axis=1), tl.max(s3, axis=1)))
        alpha = tl.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        p = tl.exp2(s0 - m_new[:, None])
        l_new = tl.sum(p, axis=1)
        acc += tl.dot(p.to(q.dtype), v_desc.load([blk0 * PAGE, kvh * HEAD_DIM]))
        if PAGES >= 2:
            p = tl.exp2(s1 - m_new[:, None])
            l_new += tl.sum(p, axis=1)
            acc += tl.dot(p.to(q.dtype), v_desc.load([blk1 * PAGE, kvh * HEAD_DIM]))
        if PAGES >= 4:
            p = tl.exp2(s2 - m_new[:, None])
            l_new += tl.sum(p, axis=1)
            acc += tl.dot(p.to(q.dtype), v_desc.load([blk2 * PAGE, kvh * HEAD_DIM]))
            p = tl.exp2(s3 - m_new[:, None])
            l_new += tl.sum(p, axis=1)
            acc += tl.dot(p.to(q.dtype), v_desc.load([blk3 * PAGE, kvh * HEAD_DIM]))
        l_i = l_i * alpha + l_new
        m_i = m_new
    if ONE_SPLIT:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
    else:
        num_heads = tl.num_programs(1) * G
        row = (b64 * num_heads + heads) * num_splits + split
        tl.store(part_m_ptr + row, m_i, mask=gmask)
        tl.store(part_l_ptr + row, l_i, mask=gmask)
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=gmask[:, None])


def tma_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
               block_tables: torch.Tensor, scale: float, num_splits: int, pages: int = 2,
               num_warps: int = 4, num_stages: int = 3, descs=None) -> torch.Tensor:
    """Decode attention through TMA page loads; contiguous [nb, PAGE, Hkv, D] caches."""
    bsz, hq, d = q.shape
    nb, page, hkv, _ = k_cache.shape
    g = hq // hkv
    if descs is None:
        descs = make_descs(k_cache, v_cache)
    out = torch.empty_like(q)
    one = num_splits == 1
    part_m, part_l, part_acc = ta.split_scratch(out, num_splits)
    _tma_split_kernel[(bsz, hkv, num_splits)](
        q, descs[0], descs[1], seq_lens, block_tables, out, part_m, part_l, part_acc,
        scale * _LOG2E, num_splits, q.stride(0), q.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=g, HEAD_DIM=d, PAGE=page, BLOCK_G=max(16, triton.next_power_of_2(g)), PAGES=pages,
        ONE_SPLIT=one, num_warps=num_warps, num_stages=num_stages)
    if not one:
        ta.reduce_splits(part_m, part_l, part_acc, out)
    return out


def make_descs(k_cache: torch.Tensor, v_cache: torch.Tensor):
    nb, page, hkv, d = k_cache.shape
    return tuple(TensorDescriptor.from_tensor(c.view(nb * page, hkv * d), [page, d])
                 for c in (k_cache, v_cache))


def check() -> int:
    """The TMA kernel against the torch reference on ragged lengths (interpreter or GPU)."""
    from gpu_suite_parts import ragged_decode_case
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    q, k_cache, v_cache, seq_lens, bt, scale, ref = ragged_decode_case(dev, dtype)
    worst = 0.0
    for pages, splits in itertools.product((1, 2, 4), (1, 2, 3)):
        out = tma_decode(q, k_cache, v_cache, seq_lens, bt, scale, splits, pages)
        err = float((out.float() - ref).abs().max())
        worst = max(worst, err)
        print(f"pages {pages} splits {splits}: max abs err {err:.2e}", flush=True)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    print("OK" if worst < tol else f"FAIL (worst {worst:.2e} >= {tol})")
    return 0 if worst < tol else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fewer tile variants")
    args = ap.parse_args()
    if args.check or os.environ.get("TRITON_INTERPRET") == "1":
        return check()
    from gpu_suite_parts import DecodeCase, per_call_ms, rel_err
    hq, hkv, d = 32, 8, 128
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    print(f"{torch.cuda.get_device_name()} | triton {triton.__version__} | GQA {hq}/{hkv}, "
          f"head dim {d}, bf16, page 16", flush=True)
    # TMA descriptors on the host need no allocator; device-side ones would.
    variants = list(itertools.product((1, 2, 4), (4, 8), (2, 3, 4)))
    if args.quick:
        variants = [(2, 4, 3), (4, 4, 3), (4, 8, 3), (2, 4, 4), (1, 4, 4)]
    results = []
    for bs, ctx in [(32, 4096), (32, 32768), (128, 4096), (128, 32768), (8, 4096), (1, 32768)]:
        c = DecodeCase.make(bs, ctx, hq, hkv, d, gen, dev)
        default_splits = ta.choose_num_splits(bs, hkv, ctx, dev)
        descs = make_descs(c.k_cache, c.v_cache)

        def us(fn) -> float:
            return per_call_ms([lambda i=i: fn(i) for i in range(c.copies)], dev)[0] * 1e3

        ref = c.sdpa(0)
        row = {"bs": bs, "ctx": ctx, "splits": default_splits, "sdpa_us": us(c.sdpa)}
        row["pdserve_us"] = us(lambda i: ta.decode_attention(
            c.q[i], c.k_cache, c.v_cache, c.seq_lens, c.tables(i), c.scale, max_seq_len=ctx))
        # The same KV with every sequence's blocks in order.
        order = c.block_tables.flatten().long()
        ks, vs = c.k_cache[order], c.v_cache[order]
        nblk = c.block_tables.shape[1]
        inorder = torch.arange(order.numel(), device=dev, dtype=torch.int32).view(-1, nblk)
        row["pdserve_inorder_us"] = us(lambda i: ta.decode_attention(
            c.q[i], ks, vs, c.seq_lens, inorder[i * bs:(i + 1) * bs], c.scale, max_seq_len=ctx))
        del ks, vs
        torch.cuda.empty_cache()
        sweep = []
        for pages, warps, stages in variants:
            for f in (0.5, 1, 2):
                splits = max(1, int(default_splits * f))
                if f != 1 and splits == default_splits:
                    continue
                if f != 1 and bs < 32:
                    continue
                try:
                    run = (lambda i, s=splits, p=pages, w=warps, st=stages: tma_decode(
                        c.q[i], c.k_cache, c.v_cache, c.seq_lens, c.tables(i), c.scale, s, p, w, st,
                        descs))
                    err = rel_err(run(0), ref)
                    t = us(run)
                except Exception as e:  # noqa: BLE001 - a variant that does not compile or fit
                    sweep.append({"pages": pages, "warps": warps, "stages": stages, "splits": splits,
                                  "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    continue
                sweep.append({"pages": pages, "warps": warps, "stages": stages, "splits": splits,
                              "us": t, "err": err})
        row["pdserve_us_2"] = us(lambda i: ta.decode_attention(
            c.q[i], c.k_cache, c.v_cache, c.seq_lens, c.tables(i), c.scale, max_seq_len=ctx))
        ok = sorted((r for r in sweep if "us" in r), key=lambda r: r["us"])
        bad = [r for r in ok if r["err"] > 2e-2]
        row["tma_top5"] = ok[:5]
        row["tma_errors"] = [r for r in sweep if "error" in r][:3]
        row["tma_wrong"] = len(bad)
        results.append(row)
        pd = min(row["pdserve_us"], row["pdserve_us_2"])
        best = ok[0] if ok else {"us": float("nan")}
        print(f"bs {bs:4d} ctx {ctx:6d} splits {default_splits:3d}: SDPA {row['sdpa_us']:8.1f} us | "
              f"pdserve {row['pdserve_us']:8.1f}/{row['pdserve_us_2']:8.1f} ({row['sdpa_us'] / pd:.3f}x) | "
              f"blocks in order {row['pdserve_inorder_us']:8.1f} ({row['sdpa_us'] / row['pdserve_inorder_us']:.3f}x) | "
              f"TMA best {best['us']:8.1f} ({row['sdpa_us'] / best['us']:.3f}x) "
              f"{ {k: best.get(k) for k in ('pages', 'warps', 'stages', 'splits')} } "
              f"| wrong {len(bad)} | failed {len(row['tma_errors'])}", flush=True)
        for r in row["tma_errors"][:1]:
            print("   first failure:", r, flush=True)
        del c, descs
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
