"""Where pdserve's offline time goes on the suite's part e workload (a profiling tool,
not a test): the same 1B-shape model, requests and engine settings as
`gpu_suite.py` part e, run once after the same warm-up, with every engine step split
into schedule / model execute (prepare + forward + sample, host sync included) / update
(stop rules, detokenization, outputs), and the steps counted by kind.

    python benchmarks/offline_profile.py [--smoke] [--cprofile]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for CPU")
    parser.add_argument("--cprofile", action="store_true", help="also print the top functions")
    args = parser.parse_args()
    import gpu_suite_parts as parts
    from gpu_suite import Suite
    from pdserve.llm import LLM

    dev = torch.device("cpu" if args.smoke else "cuda")
    s = Suite(dev, args.smoke, 600.0, Path(tempfile.mkdtemp(prefix="pdserve-offline-")))
    sh = s.shapes
    path = parts.ensure_model_dir(s)
    s.hf_model = None
    n, prompt, output = sh.offline
    reqs = parts.make_requests(n, prompt, output, sh.token_range, seed=0)
    llm = LLM(str(path), dtype=str(sh.dtype).removeprefix("torch."), device=dev.type,
              kv_cache_memory_gb=sh.engine_kv_gb, enable_prefix_caching=False,
              max_num_seqs=max(n, 8), max_num_batched_tokens=sh.max_batched_tokens,
              max_model_len=prompt[1] + output[1] + 16)
    import random
    rng = random.Random(1)
    warm = [parts.Req([rng.randrange(*sh.token_range) for _ in range(prompt[1] if i == 0 else 16 + i)],
                      1 + i * 64 // n) for i in range(n)]
    parts._pd_generate(llm, warm)

    engine = llm.engine
    timing: dict[str, list[float]] = defaultdict(list)
    orig_schedule, orig_execute, orig_update = (engine.scheduler.schedule, engine.runner.execute,
                                                engine.update)
    kinds: dict[str, int] = defaultdict(int)

    def schedule():
        t = time.perf_counter()
        out = orig_schedule()
        timing["schedule"].append(time.perf_counter() - t)
        if not out.is_empty:
            decode_only = all(getattr(x, "num_new_tokens", 1) == 1 for x in getattr(out, "scheduled", []))
            kinds["decode_only" if decode_only else "with_prefill"] += 1
        return out

    def execute(sched_out):
        t = time.perf_counter()
        out = orig_execute(sched_out)
        timing["execute"].append(time.perf_counter() - t)
        return out

    def update(sched_out, sampled):
        t = time.perf_counter()
        out = orig_update(sched_out, sampled)
        timing["update"].append(time.perf_counter() - t)
        return out

    engine.scheduler.schedule, engine.runner.execute, engine.update = schedule, execute, update
    prof = cProfile.Profile() if args.cprofile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    seconds = parts._pd_generate(llm, reqs)
    if prof:
        prof.disable()
    wall = time.perf_counter() - t0
    useful = sum(r.max_tokens for r in reqs)
    steps = len(timing["execute"])
    print(f"offline: {n} requests, {sum(len(r.ids) for r in reqs)} prompt tokens, {useful} output "
          f"tokens: {seconds:.2f} s ({useful / seconds:.0f} output tok/s), {steps} steps "
          f"({dict(kinds)})")
    for name in ("schedule", "execute", "update"):
        xs = timing[name]
        print(f"  {name:9s} {sum(xs):7.3f} s total, {1e3 * sum(xs) / max(1, len(xs)):6.2f} ms a step")
    rest = wall - sum(sum(v) for v in timing.values())
    print(f"  other     {rest:7.3f} s (generate's own loop, request setup, output assembly)")
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(35)
        print(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
