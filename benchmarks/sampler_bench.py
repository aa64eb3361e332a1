"""The sampled part of a decode step on CUDA: pdserve's sort-free Triton kernel against
its torch sort path (the default; PDSERVE_SAMPLER_KERNEL=1 picks the kernel), both
through Sampler.launch + results on the same logits, at the Llama-3 vocabulary (128,256)
and batch 1-128.

    python3 benchmarks/sampler_bench.py [--out OUT.json]
    TRITON_INTERPRET=1 python3 benchmarks/sampler_bench.py --vocab 500 --batches 1,4  # CPU dry run

Knob sets: temperature 0.8 + top-p 0.9 (part d's sampled step), top-k 50 + top-p 0.95,
min-p 0.05 alone, and temperature only. Times are medians of CUDA-event timed calls (the
host work of launch() included, as in a step), interleaved between the two paths.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))     # gpu_suite_parts

import torch  # noqa: E402

from gpu_suite_parts import median_ms  # noqa: E402
from pdserve.sampling.params import SamplingParams  # noqa: E402
from pdserve.sampling.sampler import Sampler, SamplingRow  # noqa: E402

KNOBS = {"t0.8 p0.9": dict(temperature=0.8, top_p=0.9),
         "k50 p0.95": dict(temperature=1.0, top_k=50, top_p=0.95),
         "min-p 0.05": dict(temperature=1.0, min_p=0.05),
         "t0.8 only": dict(temperature=0.8)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batches", default="1,8,32,128")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (interpreter)"
    print(f"{name} | vocab {args.vocab} | ms per Sampler call "
          f"(launch + results), torch sort path / Triton kernel", flush=True)
    for name, kw in KNOBS.items():
        for bs in (int(b) for b in args.batches.split(",")):
            gen = torch.Generator(device=dev).manual_seed(bs)
            logits = torch.randn(bs, args.vocab, device=dev, generator=gen) * 4
            rows = [SamplingRow(SamplingParams(**kw), [], [], None) for _ in range(bs)]
            paths = {"torch": Sampler([0], kernel=False), "kernel": Sampler([0], kernel=True)}
            times: dict[str, list[float]] = {k: [] for k in paths}
            for _ in range(3):
                for k, s in paths.items():
                    times[k].append(median_ms(lambda s=s: s(logits, rows), dev, target_s=0.1, max_iters=20))
            t, k = statistics.median(times["torch"]), statistics.median(times["kernel"])
            results.append({"knobs": name, "bs": bs, "torch_ms": t, "kernel_ms": k})
            print(f"  {name:11s} bs {bs:4d}: torch {t:7.3f} ms | kernel {k:7.3f} ms | "
                  f"x{t / k:5.2f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
