"""Probe: does a head-major page layout make pdserve's decode attention faster?

The paged cache is token-major, [num_blocks, page, Hkv, D]: a one-kv-head program of the
decode kernel reads 256-byte rows 2 KiB apart (bf16, D 128, Hkv 8). Head-major pages,
[num_blocks, Hkv, page, D], hold each head's page as one contiguous 4 KiB run, the way
SDPA reads contiguous KV. The kernel takes the cache's strides, so the same kernel runs on
both: the head-major cache is passed as a [num_blocks, page, Hkv, D] view with permuted
strides. Nothing else differs (the same values, block order, block tables, tiles and
split counts), so the difference is the layout's alone.

It times torch SDPA, the kernel on each layout with its default tiles, and the head-major
layout over a small tile x split sweep, as gpu_suite part b times its cases (CUDA-graph
replays over rotated copies of the inputs). The answer goes into benchmarks/RESULTS.md.

    python benchmarks/kv_layout_probe.py [--out OUT.json]

With --split-sweep it instead times batch 1 at contexts 512, 1040 and 4096 (the 8B decode
step's) over split counts x BLOCK_N, against pdserve's own choice.
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

from gpu_suite_parts import PAGE, DecodeCase, per_call_ms, rel_err  # noqa: E402

SHAPES = [(32, 4096), (32, 32768), (128, 4096), (128, 32768), (8, 4096), (1, 32768)]
TILES = list(itertools.product((64, 128), (4, 8), (3, 4)))  # BLOCK_N, warps, stages
SWEPT = {(32, 4096), (32, 32768), (128, 4096), (128, 32768)}   # the goal's region


def head_major(cache: torch.Tensor) -> torch.Tensor:
    """The same values as `cache` [nb, page, Hkv, D], stored head-major and viewed back
    as [nb, page, Hkv, D]."""
    return cache.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)


def split_sweep(ta, hq: int, hkv: int, d: int, gen: torch.Generator, dev: torch.device,
                out: str) -> int:
    results = []
    # Batch 1 at short contexts (the 8B decode step's): split count x tile.
    for ctx in (512, 1040, 4096):
        c = DecodeCase.make(1, ctx, hq, hkv, d, gen, dev)
        rows = []
        for splits in (2, 4, 8, 16, 32, 64):
            for tiles in ((64, 4, None), (32, 4, None), (16, 4, None)):
                if ctx / splits < tiles[0]:
                    continue
                calls = [lambda i=i, s=splits, t=tiles: ta.decode_attention(
                    c.q[i], c.k_cache, c.v_cache, c.seq_lens, c.tables(i), c.scale,
                    num_splits=s, tiles=t) for i in range(c.copies)]
                rows.append({"splits": splits, "tiles": tiles,
                             "us": per_call_ms(calls, dev)[0] * 1e3})
        calls = [lambda i=i: ta.decode_attention(c.q[i], c.k_cache, c.v_cache, c.seq_lens,
                                                 c.tables(i), c.scale, max_seq_len=ctx)
                 for i in range(c.copies)]
        default_us = per_call_ms(calls, dev)[0] * 1e3
        rows.sort(key=lambda r: r["us"])
        default = ta.choose_num_splits(1, hkv, ctx, dev)
        results.append({"bs": 1, "ctx": ctx, "default_splits": default,
                        "default_us": default_us, "sweep": rows})
        print(f"bs 1 ctx {ctx}: pdserve's choice ({default} splits) {default_us:.1f} us; "
              "fastest: " + "; ".join(f"{r['us']:.1f} us s{r['splits']} n{r['tiles'][0]}"
                                       for r in rows[:6]), flush=True)
        del c
        torch.cuda.empty_cache()
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--split-sweep", action="store_true")
    args = ap.parse_args()
    from pdserve.kernels import triton_attention as ta
    hq, hkv, d = 32, 8, 128
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    print(f"{torch.cuda.get_device_name()} | GQA {hq}/{hkv}, head dim {d}, bf16, page {PAGE}", flush=True)
    if args.split_sweep:
        return split_sweep(ta, hq, hkv, d, gen, dev, args.out)
    results = []
    for bs, ctx in SHAPES:
        c = DecodeCase.make(bs, ctx, hq, hkv, d, gen, dev, layout="token")
        kh, vh = head_major(c.k_cache), head_major(c.v_cache)
        default_splits = ta.choose_num_splits(bs, hkv, ctx, dev)

        def run(i: int, kc, vc, splits=None, tiles=None) -> torch.Tensor:
            return ta.decode_attention(c.q[i], kc, vc, c.seq_lens, c.tables(i), c.scale,
                                       num_splits=splits, max_seq_len=ctx, tiles=tiles)

        def us(fn) -> float:
            return per_call_ms([lambda i=i: fn(i) for i in range(c.copies)], dev)[0] * 1e3

        ref = c.sdpa(0)
        row = {"bs": bs, "ctx": ctx, "splits": default_splits}
        row["sdpa_us"] = us(c.sdpa)
        row["token_major_us"] = us(lambda i: run(i, c.k_cache, c.v_cache))
        row["head_major_us"] = us(lambda i: run(i, kh, vh))
        row["head_major_err"] = rel_err(run(0, kh, vh), ref)
        # The two layouts alternate once more, so drift within the run shows.
        row["token_major_us_2"] = us(lambda i: run(i, c.k_cache, c.v_cache))
        row["head_major_us_2"] = us(lambda i: run(i, kh, vh))
        sweep = []
        if not args.no_sweep and (bs, ctx) in SWEPT:
            for tile in TILES:
                for f in (0.5, 1, 2):
                    splits = max(1, int(default_splits * f))
                    if f != 1 and splits == default_splits:
                        continue
                    try:
                        t = us(lambda i, s=splits, tl_=tile: run(i, kh, vh, s, tl_))
                    except Exception as e:  # noqa: BLE001 - a tile that does not fit
                        sweep.append({"tile": tile, "splits": splits, "error": str(e)[:160]})
                        continue
                    sweep.append({"tile": tile, "splits": splits, "us": t})
        ok = sorted((r for r in sweep if "us" in r), key=lambda r: r["us"])
        row["sweep_top5"] = ok[:5]
        results.append(row)
        tm = min(row["token_major_us"], row["token_major_us_2"])
        hm = min(row["head_major_us"], row["head_major_us_2"])
        best = ok[0] if ok else {"us": float("nan"), "tile": None, "splits": None}
        print(f"bs {bs:4d} ctx {ctx:6d} splits {default_splits:3d}: SDPA {row['sdpa_us']:8.1f} us | "
              f"token-major {row['token_major_us']:8.1f}/{row['token_major_us_2']:8.1f} "
              f"({row['sdpa_us'] / tm:.3f}x SDPA) | head-major {row['head_major_us']:8.1f}/"
              f"{row['head_major_us_2']:8.1f} ({row['sdpa_us'] / hm:.3f}x SDPA, err "
              f"{row['head_major_err']:.1e}) | head-major swept best {best['us']:8.1f} "
              f"({row['sdpa_us'] / best['us']:.3f}x SDPA) tile {best['tile']} splits {best['splits']}",
              flush=True)
        del c, kh, vh
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
