"""Tile and split sweep of pdserve's paged decode attention kernel against torch SDPA, on
the GPU (a tuning tool, not a test; the suite's part b uses the chosen defaults).

For each (batch, context) it times the kernel under every (BLOCK_N, num_warps,
num_stages) and split count below, the same way as gpu_suite part b (CUDA-graph
replays over rotated copies of the inputs, so the L2 is not what gets measured), and
prints the default, the best, and SDPA (`enable_gqa`, contiguous KV) in one table.

    python benchmarks/decode_attention_sweep.py [--quick] [--out sweep.json]
    # the Llama-3.2-1B shape of part e (GQA 32/8, head dim 64), at its batch and contexts
    python benchmarks/decode_attention_sweep.py --heads 32,8,64 --shapes 128x1024,128x2048,64x2048
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from gpu_suite_parts import PAGE, DecodeCase, per_call_ms, rel_err  # noqa: E402

HQ, HKV, D = 32, 8, 128
SHAPES = [(1, 32768), (8, 4096), (32, 4096), (32, 32768), (128, 4096), (128, 32768)]
TILES = list(itertools.product((32, 64, 128), (4, 8), (2, 3, 4)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, fewer tiles")
    parser.add_argument("--out", default="")
    parser.add_argument("--heads", default=f"{HQ},{HKV},{D}", help="query heads, kv heads, head dim")
    parser.add_argument("--shapes", default="", help="BATCHxCONTEXT,... (default: the goal's)")
    args = parser.parse_args()
    hq, hkv, d = (int(x) for x in args.heads.split(","))
    from pdserve.kernels import triton_attention as ta

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    shapes = SHAPES[1:3] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in sh.split("x")) for sh in args.shapes.split(",")]
    print(f"GQA {hq}/{hkv}, head dim {d}, bf16, page {PAGE}", flush=True)
    sweep_tiles = TILES[:6] if args.quick else TILES
    results = []
    for bs, ctx in shapes:
        c = DecodeCase.make(bs, ctx, hq, hkv, d, gen, dev)
        kv_bytes, copies = c.kv_bytes, c.copies
        sdpa_ms, _ = per_call_ms([lambda i=i: c.sdpa(i) for i in range(copies)], dev)
        ref = c.sdpa(0)
        default_splits = ta.choose_num_splits(bs, hkv, ctx, dev)
        default_tile = ta._decode_tiles(torch.bfloat16, d, bs * hkv, default_splits, dev)
        tiles = [default_tile] + [t for t in sweep_tiles if t != default_tile]
        split_options = sorted({max(1, default_splits // 2), default_splits,
                                min(64, default_splits * 2), min(64, default_splits * 4)})
        rows = []
        for tile, splits in itertools.product(tiles, split_options):
            def ours(i: int, tile=tile, splits=splits) -> torch.Tensor:
                return ta.decode_attention(c.q[i], c.k_cache, c.v_cache, c.seq_lens, c.tables(i),
                                           c.scale, num_splits=splits, tiles=tile)
            try:
                err = rel_err(ours(0), ref)
                ms, _ = per_call_ms([lambda i=i: ours(i) for i in range(copies)], dev)
            except Exception as e:  # noqa: BLE001 - a tile that does not compile/fit
                rows.append({"tile": tile, "splits": splits, "error": str(e)[:200]})
                continue
            rows.append({"tile": tile, "splits": splits, "us": ms * 1e3, "x_sdpa": sdpa_ms / ms,
                         "tb_s": kv_bytes / ms / 1e9, "err": err})
        ok = [r for r in rows if "us" in r]
        default = next(r for r in ok if r["tile"] == default_tile and r["splits"] == default_splits)
        best = min(ok, key=lambda r: r["us"])
        top = sorted(ok, key=lambda r: r["us"])[:5]
        results.append({"bs": bs, "ctx": ctx, "sdpa_us": sdpa_ms * 1e3, "default_splits": default_splits,
                        "default": default, "best": best, "top5": top, "rows": rows})
        print(f"bs {bs:4d} ctx {ctx:6d}: SDPA {sdpa_ms * 1e3:8.1f} us | default {default['x_sdpa']:.3f}x "
              f"(splits {default_splits}) | best {best['x_sdpa']:.3f}x tile {best['tile']} splits "
              f"{best['splits']} err {best['err']:.1e}", flush=True)
        for r in top:
            print(f"      {r['tile']} splits {r['splits']:3d}: {r['us']:8.1f} us {r['x_sdpa']:.3f}x", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
