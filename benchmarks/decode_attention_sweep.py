"""Tile and split sweep of pdserve's paged decode attention kernel against torch SDPA, on
the GPU (a tuning tool, not a test; the suite's part b uses the chosen defaults).

For each (batch, context) it times the kernel under every (BLOCK_N, num_warps,
num_stages) and split count below, the same way as gpu_suite part b (CUDA-graph
replays over rotated copies of the inputs, so the L2 is not what gets measured), and
prints the default, the best, and SDPA (`enable_gqa`, contiguous KV) in one table.

    python benchmarks/decode_attention_sweep.py [--quick] [--out sweep.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gpu_suite_parts import PAGE, ROTATE_BYTES, paged_copy, per_call_ms, rel_err  # noqa: E402

HQ, HKV, D = 32, 8, 128
SHAPES = [(1, 32768), (8, 4096), (32, 4096), (32, 32768), (128, 4096), (128, 32768)]
TILES = list(itertools.product((32, 64, 128), (4, 8), (2, 3, 4)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, fewer tiles")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    from pdserve.kernels import triton_attention as ta

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    shapes = SHAPES[1:3] if args.quick else SHAPES
    tiles = [(64, 4, None)] + (TILES[:6] if args.quick else TILES)
    results = []
    for bs, ctx in shapes:
        kv_bytes = 2 * bs * ctx * HKV * D * 2
        copies = max(1, min(64, math.ceil(ROTATE_BYTES / kv_bytes)))
        k = torch.randn(copies * bs, HKV, ctx, D, dtype=torch.bfloat16, device=dev)
        v = torch.randn_like(k)
        kc, vc, bt = paged_copy(k, v, gen)
        q = torch.randn(copies, bs, HQ, D, dtype=torch.bfloat16, device=dev)
        seq_lens = torch.full((bs,), ctx, dtype=torch.int32, device=dev)
        scale = D ** -0.5

        def sdpa(i: int) -> torch.Tensor:
            rows = slice(i * bs, (i + 1) * bs)
            return F.scaled_dot_product_attention(q[i].unsqueeze(2), k[rows], v[rows], scale=scale,
                                                  enable_gqa=True).squeeze(2)

        sdpa_ms, _ = per_call_ms([lambda i=i: sdpa(i) for i in range(copies)], dev)
        ref = sdpa(0)
        default_splits = ta.choose_num_splits(bs, HKV, ctx, dev)
        split_options = sorted({max(1, default_splits // 2), default_splits,
                                min(64, default_splits * 2), min(64, default_splits * 4)})
        rows = []
        for tile, splits in itertools.product(tiles, split_options):
            def ours(i: int, tile=tile, splits=splits) -> torch.Tensor:
                return ta.decode_attention(q[i], kc, vc, seq_lens, bt[i * bs:(i + 1) * bs], scale,
                                           num_splits=splits, tiles=tile)
            try:
                err = rel_err(ours(0), ref)
                ms, _ = per_call_ms([lambda i=i: ours(i) for i in range(copies)], dev)
            except Exception as e:  # noqa: BLE001 - a tile that does not compile/fit
                rows.append({"tile": tile, "splits": splits, "error": str(e)[:200]})
                continue
            rows.append({"tile": tile, "splits": splits, "us": ms * 1e3, "x_sdpa": sdpa_ms / ms,
                         "tb_s": kv_bytes / ms / 1e9, "err": err})
        ok = [r for r in rows if "us" in r]
        default = next(r for r in ok if r["tile"] == (64, 4, None) and r["splits"] == default_splits)
        best = min(ok, key=lambda r: r["us"])
        top = sorted(ok, key=lambda r: r["us"])[:5]
        results.append({"bs": bs, "ctx": ctx, "sdpa_us": sdpa_ms * 1e3, "default_splits": default_splits,
                        "default": default, "best": best, "top5": top, "rows": rows})
        print(f"bs {bs:4d} ctx {ctx:6d}: SDPA {sdpa_ms * 1e3:8.1f} us | default {default['x_sdpa']:.3f}x "
              f"(splits {default_splits}) | best {best['x_sdpa']:.3f}x tile {best['tile']} splits "
              f"{best['splits']} err {best['err']:.1e}", flush=True)
        for r in top:
            print(f"      {r['tile']} splits {r['splits']:3d}: {r['us']:8.1f} us {r['x_sdpa']:.3f}x", flush=True)
        del k, v, kc, vc, bt, q
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
