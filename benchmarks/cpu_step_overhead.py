"""Where a CPU decode step goes besides the GEMMs (issue "Engine core", acceptance 6).

1. Single stream: ms per decode step of the default model (fp32, 32-token prompt, greedy),
   with the real GEMMs and with `pdserve.model.llama.linear` returning zeros: the second
   figure is everything else in the step (per-op overhead, attention, norms, sampling).
   Best of 2 runs of 64 tokens each.
2. `--chunk-sweep 512,1024,2048`: seconds for engine_cpu.py's 64-request set (prompts
   32-512, outputs 16-128, seed 0) at each max_num_batched_tokens, alternating, two rounds.

To compare two trees, run it from each checkout in alternating processes:

    python benchmarks/cpu_step_overhead.py                       # this tree
    python /path/to/other/checkout/benchmarks/cpu_step_overhead.py
    python benchmarks/cpu_step_overhead.py --chunk-sweep 512,1024,2048
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))        # this checkout's pdserve, whatever is installed
sys.path.insert(1, str(ROOT / "benchmarks"))

import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk-sweep", default="", help="comma-separated max_num_batched_tokens")
    ap.add_argument("--requests", type=int, default=64, help="requests in the chunk sweep")
    args = ap.parse_args()
    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    import pdserve
    import pdserve.model.llama as llama
    from pdserve import LLM, SamplingParams
    from pdserve.default_model import prepare_default_model
    model = str(prepare_default_model())
    print(f"pdserve from {Path(pdserve.__file__).parent}, {torch.get_num_threads()} threads")

    if args.chunk_sweep:
        from engine_cpu import make_requests, pd_generate
        reqs = make_requests(args.requests, (32, 512), (16, 128), 0)
        llms = {}
        for n in (int(x) for x in args.chunk_sweep.split(",")):
            llms[n] = LLM(model, dtype="float32", device="cpu", kv_cache_memory_gb=2.0,
                          enable_prefix_caching=False, max_num_seqs=128, seed=0,
                          max_num_batched_tokens=n)
            pd_generate(llms[n], make_requests(2, (16, 16), (4, 4), 999))   # warm-up
        for _ in range(2):
            for n, llm in llms.items():
                print(f"max_num_batched_tokens {n}: {pd_generate(llm, reqs):.1f} s", flush=True)
        return 0

    llm = LLM(model, dtype="float32", device="cpu", kv_cache_memory_gb=2.0,
              enable_prefix_caching=False, max_num_seqs=128, seed=0)
    rng = random.Random(0)
    ids = [rng.randrange(1000, 20000) for _ in range(32)]

    def run(n: int) -> float:
        t = time.perf_counter()
        llm.generate([ids], [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)])
        return time.perf_counter() - t

    real = llama.linear
    for mode in ("real GEMMs", "GEMMs as zeros"):
        llama.linear = real if mode == "real GEMMs" else (
            lambda x, w, b=None: torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype))
        run(4)
        best = min((run(65) - run(1)) / 64 for _ in range(2))
        print(f"single stream, {mode}: {best * 1e3:.2f} ms per decode step", flush=True)
    llama.linear = real
    return 0


if __name__ == "__main__":
    sys.exit(main())
