"""Probe: a decode attention kernel that reads whole pages (all kv heads at once) against
pdserve's kernel (one kv head per program) and torch SDPA, on one GPU, in one run.

Why: the paged cache is token-major, [num_blocks, page, Hkv, D]. pdserve's decode kernel
gives each program one kv head, so it reads 256-byte rows 2 KiB apart (bf16, D 128,
Hkv 8); SDPA reads each head's K/V as one contiguous run. The variant here gives each
program a sequence's split and ALL its kv heads: a tile is PAGES whole pages, each one
contiguous run of page * Hkv * D elements. It scores every query head against every row
of the tile with one tl.dot and masks the rows of other kv heads (Hkv times the tensor
work, which decode has to spare: it is bound by the K/V bytes), then merges splits with
pdserve's reduce kernel.

It times the variant over PAGES x num_warps x num_stages x splits, as gpu_suite part b
times its cases (CUDA-graph replays over rotated copies of the inputs), after checking
it against SDPA. The answer goes into benchmarks/RESULTS.md.

    python benchmarks/decode_allheads_probe.py [--out OUT.json]
    TRITON_INTERPRET=1 python benchmarks/decode_allheads_probe.py --smoke   # CPU check
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))     # gpu_suite_parts

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from gpu_suite_parts import PAGE, DecodeCase, paged_copy, per_call_ms, rel_err  # noqa: E402
from pdserve.kernels import triton_attention as ta  # noqa: E402

SHAPES = [(1, 32768), (8, 4096), (32, 4096), (32, 32768), (128, 4096), (128, 32768)]
TILES = list(itertools.product((1, 2), (4, 8), (2, 3)))      # (PAGES, num_warps, num_stages)
_LOG2E = 1.4426950408889634


@triton.jit
def _allheads_kernel(
    q_ptr, k_ptr, v_ptr, seq_lens_ptr, bt_ptr, out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    scale_log2, num_splits, stride_qb, stride_qh, stride_cb, stride_bt, stride_ob, stride_oh,
    HQ: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,        # HQ padded to a power of two >= 16
    PAGES: tl.constexpr,          # whole pages per tile: PAGES * PAGE_SIZE * HKV rows
    ONE_SPLIT: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    TILE: tl.constexpr = PAGES * PAGE_SIZE           # context positions per tile
    ROWS: tl.constexpr = TILE * HKV
    G: tl.constexpr = HQ // HKV
    start, end = ta.split_range(seq_len, split, num_splits, TILE)
    offs_h = tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    hmask = offs_h < HQ
    r_tok = offs_r // HKV                            # row -> position within the tile
    r_page = r_tok // PAGE_SIZE
    r_in = offs_r % (PAGE_SIZE * HKV)                # row within its page: token * HKV + head
    same = (offs_h // G)[:, None] == (offs_r % HKV)[None, :]   # [BLOCK_H, ROWS]
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + offs_h[:, None] * stride_qh + offs_d[None, :],
                mask=hmask[:, None], other=0.0)      # [BLOCK_H, HEAD_DIM]
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    bt_row = bt_ptr + b64 * stride_bt
    for n0 in range(start, end, TILE):               # n0 is a multiple of the page size
        pmask = n0 + r_tok < end
        blk = tl.load(bt_row + n0 // PAGE_SIZE + r_page, mask=pmask, other=0).to(tl.int64)
        off = blk * stride_cb + r_in * HEAD_DIM
        k = tl.load(k_ptr + off[:, None] + offs_d[None, :], mask=pmask[:, None], other=0.0)
        v = tl.load(v_ptr + off[:, None] + offs_d[None, :], mask=pmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k))                   # [BLOCK_H, ROWS]
        s = tl.where(same & pmask[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if ONE_SPLIT:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b64 * stride_ob + offs_h[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=hmask[:, None])
    else:
        row = (b64 * HQ + offs_h) * num_splits + split
        tl.store(part_m_ptr + row, m_i, mask=hmask)
        tl.store(part_l_ptr + row, l_i, mask=hmask)
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=hmask[:, None])


def allheads_decode(q, k_cache, v_cache, seq_lens, block_tables, scale, num_splits, tile):
    """q [B, Hq, D]; caches [num_blocks, page, Hkv, D], each page one contiguous run."""
    bsz, hq, d = q.shape
    _, page, hkv, _ = k_cache.shape
    assert k_cache.stride(1) == hkv * d and k_cache.stride(2) == d and k_cache.stride(3) == 1
    pages, warps, stages = tile
    out = torch.empty_like(q)
    one = num_splits == 1
    part_m, part_l, part_acc = ta.split_scratch(out, num_splits)
    _allheads_kernel[(bsz, num_splits)](
        q, k_cache, v_cache, seq_lens, block_tables, out, part_m, part_l, part_acc,
        scale * _LOG2E, num_splits, q.stride(0), q.stride(1), k_cache.stride(0),
        block_tables.stride(0), out.stride(0), out.stride(1),
        HQ=hq, HKV=hkv, HEAD_DIM=d, PAGE_SIZE=page, BLOCK_H=max(16, triton.next_power_of_2(hq)),
        PAGES=pages, ONE_SPLIT=one, num_warps=warps, num_stages=stages)
    if not one:
        ta.reduce_splits(part_m, part_l, part_acc, out)
    return out


def smoke() -> int:
    """CPU (TRITON_INTERPRET=1): the variant equals the fp32 reference on ragged lengths."""
    from pdserve.kernels import reference
    gen = torch.Generator().manual_seed(0)
    hq, hkv, d = 8, 2, 32
    lens = [37, 5, 64]
    nb = -(-max(lens) // PAGE)
    k = torch.randn(len(lens), hkv, nb * PAGE, d, generator=gen)
    v = torch.randn(k.shape, generator=gen)
    kc, vc, bt = paged_copy(k, v, gen)
    q = torch.randn(len(lens), hq, d, generator=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    ref = reference.decode_attention(q, kc, vc, seq_lens, bt, d ** -0.5)
    worst = 0.0
    for tile, splits in itertools.product([(1, 4, 2), (2, 4, 2)], (1, 3)):
        err = rel_err(allheads_decode(q, kc, vc, seq_lens, bt, d ** -0.5, splits, tile), ref)
        print(f"tile {tile} splits {splits}: rel err {err:.2e}")
        worst = max(worst, err)
    return 0 if worst < 1e-3 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.smoke:
        return smoke()
    hq, hkv, d = 32, 8, 128
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    print(f"{torch.cuda.get_device_name()} | GQA {hq}/{hkv}, head dim {d}, bf16, page {PAGE}", flush=True)
    results = []
    for bs, ctx in SHAPES:
        c = DecodeCase.make(bs, ctx, hq, hkv, d, gen, dev)

        def ours(i: int) -> torch.Tensor:
            return ta.decode_attention(c.q[i], c.k_cache, c.v_cache, c.seq_lens, c.tables(i),
                                       c.scale, max_seq_len=ctx)

        ref = c.sdpa(0)
        sdpa_ms, _ = per_call_ms([lambda i=i: c.sdpa(i) for i in range(c.copies)], dev)
        ours_ms, _ = per_call_ms([lambda i=i: ours(i) for i in range(c.copies)], dev)
        rows = []
        for tile in TILES:
            tokens = tile[0] * PAGE
            for splits in (1, 2, 4, 8, 16, 32, 64, 128):
                if ctx / splits < 4 * tokens or bs * splits > 4096:
                    continue

                def var(i: int, tile=tile, splits=splits) -> torch.Tensor:
                    return allheads_decode(c.q[i], c.k_cache, c.v_cache, c.seq_lens, c.tables(i),
                                           c.scale, splits, tile)
                try:
                    err = rel_err(var(0), ref)
                    ms, _ = per_call_ms([lambda i=i: var(i) for i in range(c.copies)], dev)
                except Exception as e:  # noqa: BLE001 - a tile that does not fit
                    rows.append({"tile": tile, "splits": splits, "error": str(e)[:200]})
                    continue
                rows.append({"tile": tile, "splits": splits, "us": ms * 1e3, "err": err,
                             "x_sdpa": sdpa_ms / ms, "x_pdserve": ours_ms / ms})
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        best = ok[0]
        results.append({"bs": bs, "ctx": ctx, "sdpa_us": sdpa_ms * 1e3, "pdserve_us": ours_ms * 1e3,
                        "pdserve_x_sdpa": sdpa_ms / ours_ms, "best": best, "top5": ok[:5],
                        "rows": rows})
        print(f"bs {bs:4d} ctx {ctx:6d}: SDPA {sdpa_ms * 1e3:8.1f} us | pdserve "
              f"{ours_ms * 1e3:8.1f} us ({sdpa_ms / ours_ms:.3f}x SDPA) | all-heads best "
              f"{best['us']:8.1f} us ({best['x_sdpa']:.3f}x SDPA, {best['x_pdserve']:.3f}x pdserve) "
              f"tile {best['tile']} splits {best['splits']} err {best['err']:.1e}", flush=True)
        for r in ok[1:4]:
            print(f"      {r['tile']} splits {r['splits']:3d}: {r['us']:8.1f} us {r['x_sdpa']:.3f}x SDPA",
                  flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
