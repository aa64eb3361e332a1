"""Latency of one prompt's prefill step on the GPU, split by phase (a profiling tool, not
a test): the suite's 1B-shape model, one prompt at a time through the engine, eager (a
prefill step never replays a graph). For each prompt length it prints the step's wall
time split into schedule / prepare / forward / logits + sample / update, and the CUDA
kernel count and GPU busy time of one step from torch.profiler.

    python benchmarks/prefill_latency.py [--lengths 256,640,1024] [--smoke]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402


async def async_ttft(engine, lengths, repeats, token_range, sync) -> list[tuple[int, float]]:
    """Median ms from AsyncEngine.add_request to the first output, one prompt at a time."""
    import asyncio
    import random
    from pdserve.engine.async_engine import AsyncEngine
    from pdserve.sampling.params import SamplingParams
    rng = random.Random(1)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    aengine = AsyncEngine(engine)
    aengine.start()
    out = []
    try:
        for n in lengths:
            ttfts = []
            for i in range(repeats + 1):      # the first one warms the path
                ids = [rng.randrange(*token_range) for _ in range(n)]
                sync()
                t = time.perf_counter()
                stream = aengine.add_request(f"a-{n}-{i}", ids, params)
                async for _out in stream:
                    if i:
                        ttfts.append(time.perf_counter() - t)
                    break
                async for _out in stream:
                    pass
                await asyncio.sleep(0.05)         # idle between requests, as part f's idle row
            out.append((n, 1e3 * statistics.median(ttfts)))
    finally:
        await aengine.stop()
    return out


def in_ray_actor(path: Path, lengths, repeats, sh) -> list[tuple[str, float]]:
    import logging
    import os
    import ray
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=8, num_gpus=1, include_dashboard=False, logging_level=logging.WARNING)
    try:
        @ray.remote(num_gpus=0.5, num_cpus=1)
        class Probe:
            async def run(self, threads: int):
                from pdserve.llm import LLM
                if threads:
                    torch.set_num_threads(threads)
                llm = LLM(str(path), dtype=str(sh.dtype).removeprefix("torch."), device="cuda",
                          kv_cache_memory_gb=2.0, enable_prefix_caching=False, max_num_seqs=64,
                          max_num_batched_tokens=4096, max_model_len=4096)
                return await async_ttft(llm.engine, lengths, repeats, sh.token_range,
                                        torch.cuda.synchronize)
        rows = []
        for threads in (0, 4):   # 0: as Ray leaves it (OMP_NUM_THREADS=1 for num_cpus=1)
            probe = Probe.remote()
            rows += [(f"{n} tokens, torch threads {threads or 'Ray default'}", ms)
                     for n, ms in ray.get(probe.run.remote(threads), timeout=240)]
            ray.kill(probe)
        return rows
    finally:
        ray.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,640,1024")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--ray", action="store_true",
                        help="also measure AsyncEngine inside a Ray actor placed like a worker")
    args = parser.parse_args()
    import gpu_suite_parts as parts
    from gpu_suite import Suite
    from pdserve.llm import LLM
    from pdserve.sampling.params import SamplingParams

    dev = torch.device("cpu" if args.smoke else "cuda")
    s = Suite(dev, args.smoke, 600.0, Path(tempfile.mkdtemp(prefix="pdserve-prefill-")))
    path = parts.ensure_model_dir(s)
    s.hf_model = None
    sh = s.shapes
    llm = LLM(str(path), dtype=str(sh.dtype).removeprefix("torch."), device=dev.type,
              kv_cache_memory_gb=2.0 if not args.smoke else 0.05, enable_prefix_caching=False,
              max_num_seqs=64, max_num_batched_tokens=4096, max_model_len=4096)
    engine, runner = llm.engine, llm.engine.runner
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    phases: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            sync()
            t = time.perf_counter()
            out = fn(*a, **k)
            sync()
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
            return out
        return wrapper

    rng = __import__("random").Random(0)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    lengths = [int(x) for x in args.lengths.split(",")] if not args.smoke else [16, 40]
    for n in lengths:  # warm-up: compile every kernel variant first
        llm.generate([[rng.randrange(*sh.token_range) for _ in range(n)]], params)
    orig = (engine.scheduler.schedule, runner.prepare, runner._logits, runner.sampler, engine.update)
    engine.scheduler.schedule = timed("schedule", orig[0])
    runner.prepare = timed("prepare", orig[1])
    runner.model.forward = timed("forward", runner.model.forward)
    runner.model.compute_logits = timed("lm_head", runner.model.compute_logits)
    runner.sampler.launch = timed("sample", runner.sampler.launch)
    engine.update = timed("update", orig[4])
    print(f"{'tokens':>6} {'step ms':>8} " + " ".join(f"{k:>9}" for k in
          ("schedule", "prepare", "forward", "lm_head", "sample", "update")))
    for n in lengths:
        walls, per = [], []
        for _ in range(args.repeats):
            ids = [rng.randrange(*sh.token_range) for _ in range(n)]
            engine.add_request(f"r{n}-{len(walls)}", ids, params)
            phases.clear()
            sync()
            t = time.perf_counter()
            while engine.has_unfinished():
                engine.step()
            sync()
            walls.append(time.perf_counter() - t)
            per.append(dict(phases))
        med = statistics.median(walls)
        row = {k: statistics.median(p.get(k, 0.0) for p in per) for k in
               ("schedule", "prepare", "forward", "lm_head", "sample", "update")}
        print(f"{n:6d} {1e3 * med:8.2f} " + " ".join(f"{1e3 * v:9.2f}" for v in row.values()), flush=True)
    # The same prompts through AsyncEngine (the workers' engine thread + asyncio loop), as
    # time from add_request to the first output on the loop: the hand-offs between threads.
    engine.scheduler.schedule, runner.prepare, engine.update = orig[0], orig[1], orig[4]
    del runner.model.forward, runner.model.compute_logits, runner.sampler.launch  # the class methods again
    import asyncio
    for n, ms in asyncio.run(async_ttft(engine, lengths, args.repeats, sh.token_range, sync)):
        print(f"AsyncEngine in this process: {n} tokens, add_request -> first output {ms:.2f} ms",
              flush=True)
    if args.ray and dev.type == "cuda":
        for n, ms in in_ray_actor(path, lengths, args.repeats, sh):
            print(f"AsyncEngine in a Ray actor (num_gpus=0.5, num_cpus=1, as deploy_ray places "
                  f"workers): {n}, add_request -> first output {ms:.2f} ms", flush=True)

    if dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        ids = [rng.randrange(*sh.token_range) for _ in range(lengths[-1])]
        engine.add_request("prof", ids, params)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            while engine.has_unfinished():
                engine.step()
            sync()
        events = [e for e in prof.events() if e.device_type.name == "CUDA"]
        busy = sum(e.device_time for e in events) / 1e3
        print(f"one {lengths[-1]}-token prefill step: {len(events)} CUDA kernels/copies, "
              f"{busy:.2f} ms of GPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    return 0


if __name__ == "__main__":
    sys.exit(main())
