"""One-row GEMMs of the Llama-3-8B shape: cuBLAS (F.linear; for down_proj with the SiLU
kernel before it) against pdserve's split-K GEMV kernels (pdserve/kernels/triton_gemv.py:
"fma" and "dot" designs, the split-K reduce in the same launch, silu(gate) * up computed
on the fly for down_proj), over a sample of tile configurations, on one GPU, in one run.

Each case is timed as gemv_probe.py times it: a CUDA graph of back-to-back calls over
rotating weight copies (>= 256 MiB, so the L2 holds none of them), median per call. Each
configuration is checked against F.linear first, and again after the timed replays (the
split-K counters must come back to zero after every call for the output to stay right).

    python benchmarks/gemv_splitk_probe.py [--per-design 24] [--budget-s 300] [--out OUT.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))     # gpu_suite_parts

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gpu_suite_parts import per_call_ms  # noqa: E402
from pdserve.kernels import triton_fused  # noqa: E402
from pdserve.kernels.triton_gemv import GemvConfig, gemv  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "down": (4096, 14336),
          "gate_up": (28672, 4096), "lm_head": (128256, 4096)}
SPLITS = (1, 2, 4, 7, 8, 14)


def candidates(n: int, k: int) -> dict[str, list[GemvConfig]]:
    fma, dot = [], []
    for bn, bk, u, nw, s in itertools.product((2, 4, 8), (512, 1024), (1, 2, 4), (4, 8), SPLITS):
        cfg = GemvConfig("fma", bn, bk, s, u, nw)
        per_thread = bn * bk * u * 2 / (nw * 32)
        if k % s or (k // s) % (bk * u) or not 64 <= per_thread <= 256:
            continue
        if 1024 <= n // bn * s <= 8192:
            fma.append(cfg)
    for bn, bk, st, s in itertools.product((16, 32, 64), (128, 256), (4, 6), SPLITS):
        cfg = GemvConfig("dot", bn, bk, s, 1, 4, st)
        if k % s or (k // s) % bk or st * (bn + 16) * bk * 2 > 160 * 1024:
            continue
        if 264 <= n // bn * s <= 4096:
            dot.append(cfg)
    return {"fma": fma, "dot": dot}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-design", type=int, default=24)
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", default="benchmarks/out/gemv_splitk_probe.json")
    args = ap.parse_args()
    t_end = time.monotonic() + args.budget_s
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    rng = random.Random(0)
    res: dict = {"device": torch.cuda.get_device_name(), "shapes": {}}
    print(res["device"], flush=True)
    names = args.shapes.split(",")
    for idx, name in enumerate(names):
        n, k = SHAPES[name]
        copies = max(2, -(-(256 << 20) // (n * k * 2)))
        ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
        silu = name == "down"
        x = torch.randn(1, 2 * k if silu else k, device=dev, dtype=dt)
        ref = F.linear(triton_fused.reference_silu_and_mul(x) if silu else x, ws[0])
        if silu:
            base = [lambda w=w: F.linear(triton_fused.silu_and_mul(x), w) for w in ws]
        else:
            base = [lambda w=w: F.linear(x, w) for w in ws]
        cublas_us = per_call_ms(base, dev)[0] * 1e3
        row = res["shapes"][name] = {"n": n, "k": k, "bytes": n * k * 2, "cublas_us": cublas_us,
                                     "configs": []}
        share = (t_end - time.monotonic()) / (len(names) - idx)
        t_shape = time.monotonic() + share
        cands = candidates(n, k)
        for design in cands:
            rng.shuffle(cands[design])
        pool = [c for pair in itertools.zip_longest(*(cands[d][:args.per_design] for d in cands))
                for c in pair if c is not None]
        for cfg in pool:
            if time.monotonic() > t_shape:
                break
            entry = {"cfg": cfg.__dict__}
            try:
                err = rel(gemv(x, ws[0], cfg, silu_mul=silu), ref)
                us = per_call_ms([lambda w=w: gemv(x, w, cfg, silu_mul=silu) for w in ws], dev)[0] * 1e3
                err_after = rel(gemv(x, ws[0], cfg, silu_mul=silu), ref)
            except Exception as e:  # noqa: BLE001 - a tile that does not compile or fit
                entry["error"] = str(e)[:200]
                row["configs"].append(entry)
                continue
            entry.update(us=us, rel_err=err, rel_err_after=err_after, x_cublas=cublas_us / us)
            row["configs"].append(entry)
        ok = sorted((c for c in row["configs"] if "us" in c), key=lambda c: c["us"])
        bad = [c for c in ok if max(c["rel_err"], c["rel_err_after"]) > 2e-2]
        print(f"{name:8s} {n}x{k}: cuBLAS{' + SiLU' if silu else ''} {cublas_us:7.1f} us "
              f"({n * k * 2 / cublas_us / 1e3:5.0f} GB/s); {len(ok)} configs timed, "
              f"{len(bad)} wrong", flush=True)
        for design in ("fma", "dot"):
            top = [c for c in ok if c["cfg"]["design"] == design][:3]
            for c in top:
                print(f"    {design} {c['us']:7.1f} us ({n * k * 2 / c['us'] / 1e3:5.0f} GB/s) "
                      f"x{c['x_cublas']:.3f} err {c['rel_err']:.1e}/{c['rel_err_after']:.1e} "
                      f"{ {kk: v for kk, v in c['cfg'].items() if kk != 'design'} }", flush=True)
        del ws
        torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
