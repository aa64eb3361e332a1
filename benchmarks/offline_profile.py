"""Where pdserve's offline time goes on the suite's part e workload (a profiling tool,
not a test): the same 1B-shape model, requests and engine settings as
`gpu_suite.py` part e, run once after the same warm-up, with every engine step split
into schedule / launch (step inputs to the device, forward pass and sampling queued) /
resolve (the wait for the sampled tokens: device time the host did not hide) / update
(stop rules, detokenization, outputs), and the steps counted by kind.

    python benchmarks/offline_profile.py [--smoke] [--cprofile] [--ab N]

--ab N adds N rounds of three runs (same engine, same requests): neither of the engine's
host-overlap features, overlapped detokenization alone, and both it and the look-ahead.
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
    parser.add_argument("--find-syncs", action="store_true",
                        help="last, one run that prints where the host waits for the GPU "
                             "outside resolve() (torch.cuda sync debug mode)")
    parser.add_argument("--ab", type=int, default=0, metavar="N",
                        help="then N rounds of runs with the engine's overlap features off / partly / all on")
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
    orig_schedule, orig_launch, orig_resolve, orig_update = (
        engine.scheduler.schedule, engine.runner.launch, engine.runner.resolve, engine.update)
    kinds: dict[str, int] = defaultdict(int)

    def schedule():
        t = time.perf_counter()
        out = orig_schedule()
        timing["schedule"].append(time.perf_counter() - t)
        if not out.is_empty:
            decode_only = all(getattr(x, "num_new_tokens", 1) == 1 for x in getattr(out, "scheduled", []))
            kinds["decode_only" if decode_only else "with_prefill"] += 1
        return out

    def launch(sched_out, source=None):
        t = time.perf_counter()
        out = orig_launch(sched_out, source)
        timing["launch"].append(time.perf_counter() - t)
        return out

    def resolve(flight):
        t = time.perf_counter()
        mode = torch.cuda.get_sync_debug_mode() if dev.type == "cuda" else 0
        if mode:
            torch.cuda.set_sync_debug_mode(0)   # the one wait a step should have
        out = orig_resolve(flight)
        if mode:
            torch.cuda.set_sync_debug_mode(mode)
        timing["resolve"].append(time.perf_counter() - t)
        return out

    def update(sched_out, sampled, step=None):
        t = time.perf_counter()
        out = orig_update(sched_out, sampled, step)
        timing["update"].append(time.perf_counter() - t)
        return out

    engine.scheduler.schedule, engine.runner.launch, engine.runner.resolve, engine.update = (
        schedule, launch, resolve, update)
    prof = cProfile.Profile() if args.cprofile else None

    from pdserve.sampling.params import SamplingParams
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True) for r in reqs]
    first: list = []

    def run(label: str) -> None:
        timing.clear()
        kinds.clear()
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        outs = llm.generate([r.ids for r in reqs], params)
        seconds = time.perf_counter() - t0
        if prof:
            prof.disable()
        got = [(o.token_ids, o.text) for o in outs]
        first[:] = first or got
        wall = time.perf_counter() - t0
        useful = sum(r.max_tokens for r in reqs)
        steps = len(timing["launch"])
        print(f"offline ({label}): {n} requests, {sum(len(r.ids) for r in reqs)} prompt tokens, "
              f"{useful} output tokens: {seconds:.2f} s ({useful / seconds:.0f} output tok/s), "
              f"{steps} steps ({dict(kinds)})")
        for name in ("schedule", "launch", "resolve", "update"):
            xs = timing[name]
            print(f"  {name:9s} {sum(xs):7.3f} s total, {1e3 * sum(xs) / max(1, len(xs)):6.2f} ms a step")
        rest = wall - sum(sum(v) for v in timing.values())
        print(f"  other     {rest:7.3f} s (generate's own loop, request setup, output assembly)")
        print(f"  token ids and text the same as the first run's: {got == first}")

    def label() -> str:
        return (f"detokenize overlapped {'on' if engine.overlap_detokenize else 'off'}, "
                f"look-ahead {'on' if engine.look_ahead else 'off'}")

    run(label())
    for _ in range(args.ab):
        for overlap, ahead in ((False, False), (True, False), (True, True)):
            engine.overlap_detokenize, engine.look_ahead = overlap, ahead
            run(f"A/B, {label()}")
    if args.find_syncs and dev.type == "cuda":
        import traceback
        import warnings
        stacks: dict[str, int] = {}

        def show(message, category, filename, lineno, file=None, line=None):
            frames = [f for f in traceback.extract_stack()[:-2] if "warnings" not in f.filename]
            key = "".join(traceback.format_list(frames[-7:]))
            stacks[key] = stacks.get(key, 0) + 1

        warnings.showwarning = show
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        run(f"sync check, {label()}")
        torch.cuda.set_sync_debug_mode(0)
        print(f"host waits for the GPU outside resolve(): {sum(stacks.values())} at "
              f"{len(stacks)} places")
        for key, count in sorted(stacks.items(), key=lambda kv: -kv[1])[:6]:
            print(f"--- {count} times:\n{key}")
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(35)
        print(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
