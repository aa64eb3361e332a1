"""Where a request's TTFT goes inside the workers (a profiling tool, not a test): part f
of gpu_suite.py (one GPU, the 1B shape, colocated then disaggregated over ipc), with a
torch.profiler trace of every worker's engine (Worker.start_profile / stop_profile)
while idle requests run one at a time. For each trace it prints, per engine step that
holds a prefill, the step's phases (pdserve.schedule / launch / resolve / update), the
host time spent in torch ops during launch, and the GPU time of the kernels launched.

    python benchmarks/serve_profile.py [--requests 4] [--smoke]

Traces are written to $OUT (or benchmarks/out/profiles) for chrome://tracing or Perfetto.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

PHASES = ("pdserve.schedule", "pdserve.launch", "pdserve.resolve", "pdserve.update")


def summarize(trace_path: str) -> list[dict]:
    """One row per engine step: phase durations (ms), host ms inside torch ops while
    launching, number of kernels, and their GPU ms."""
    doc = json.loads(Path(trace_path).read_text())
    events = [e for e in doc.get("traceEvents", []) if e.get("ph") == "X"]
    ranges = sorted((e for e in events if e.get("name") in PHASES), key=lambda e: e["ts"])
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    runtime = {e["args"].get("correlation"): e for e in events
               if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    cpu_ops = [e for e in events if e.get("cat") == "cpu_op"]
    steps: list[dict] = []
    cur: dict | None = None
    for r in ranges:
        name = r["name"].removeprefix("pdserve.")
        if name == "schedule":
            cur = {"t0": r["ts"], "tid": r.get("tid")}
            steps.append(cur)
        elif cur is None:
            continue
        cur[name] = r["dur"] / 1e3
        if name == "launch":
            cur["launch_window"] = (r["ts"], r["ts"] + r["dur"])
        elif name == "update":
            cur["t1"] = r["ts"] + r["dur"]
    for st in steps:
        if "launch_window" not in st:
            continue
        t0, t1 = st.pop("launch_window")
        # top-level torch ops inside launch: their own host time
        ops = [e for e in cpu_ops if e.get("tid") == st["tid"]
               and t0 <= e["ts"] and e["ts"] + e["dur"] <= t1]
        ops.sort(key=lambda e: (e["ts"], -e["dur"]))
        top, end = [], -1.0
        for e in ops:
            if e["ts"] >= end:
                top.append(e)
                end = e["ts"] + e["dur"]
        st["ops"] = len(top)
        st["op_host_ms"] = sum(e["dur"] for e in top) / 1e3
        ks = []
        for k in kernels:
            rt = runtime.get(k.get("args", {}).get("correlation"))
            if rt is not None and t0 <= rt["ts"] <= st.get("t1", t1):
                ks.append(k)
        st["kernels"] = len(ks)
        st["gpu_ms"] = sum(k["dur"] for k in ks) / 1e3
        if ks:
            st["gpu_span_ms"] = (max(k["ts"] + k["dur"] for k in ks) - min(k["ts"] for k in ks)) / 1e3
        st["wall_ms"] = (st.get("t1", t1) - st["t0"]) / 1e3
    return [{k: v for k, v in s.items() if k != "tid"} for s in steps if "launch" in s]


async def _mode(s, path: Path, mode: str, n: int, out_dir: Path) -> dict:
    import ray
    import gpu_suite_parts as parts
    sh = s.shapes
    _, prompt, _ = sh.serve
    dep, _ = await parts.deploy_part_f(s, path, mode)
    actors = {**dep.prefill, **dep.decode}
    try:
        warm = parts.make_requests(8, prompt, (8, 8), sh.token_range, seed=99)
        await parts._load(dep.router, warm[:1], 100.0, 0)
        await parts._load(dep.router, warm, 100.0, 0)
        idle = parts.make_requests(n, prompt, (2, 2), sh.token_range, seed=7)
        for a in actors.values():
            await a.start_profile.remote(str(out_dir))
        rows = [await parts._load(dep.router, [r], 1.0, 0) for r in idle]
        traces = {wid: await a.stop_profile.remote() for wid, a in actors.items()}
        legs = {k: statistics.median(r["ttft_phases_median_ms"].get(k, float("nan")) for r in rows)
                for k in rows[0]["ttft_phases_median_ms"]}
        return {"mode": mode, "ttft_ms": [r["ttft_median_ms"] for r in rows], "legs": legs,
                "traces": traces}
    finally:
        await dep.stop()
        for actor in actors.values():
            ray.kill(actor, no_restart=True)
        await asyncio.sleep(3.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, grpc transport")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray
    import gpu_suite_parts as parts
    from gpu_suite import Suite
    from pdserve.cluster import init_ray
    dev = torch.device("cpu" if args.smoke else "cuda")
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "out" / "profiles")
    out_dir.mkdir(parents=True, exist_ok=True)
    s = Suite(dev, args.smoke, 600.0, Path(tempfile.mkdtemp(prefix="pdserve-serve-profile-")))
    path = parts.ensure_model_dir(s)
    s.hf_model = None
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    init_ray(num_cpus=8 if dev.type == "cuda" else 2, num_gpus=1 if dev.type == "cuda" else 0,
             include_dashboard=False, ignore_reinit_error=True, logging_level=logging.WARNING)
    try:
        results = [asyncio.run(_mode(s, path, m, args.requests, out_dir))
                   for m in ("colocated", "disaggregated")]
    finally:
        ray.shutdown()
    cols = ("wall_ms", "schedule", "launch", "resolve", "update", "ops", "op_host_ms",
            "kernels", "gpu_ms", "gpu_span_ms")
    for r in results:
        print(f"\n== {r['mode']}: TTFT ms {', '.join(f'{t:.1f}' for t in r['ttft_ms'])}; "
              f"legs {json.dumps({k: round(v, 1) for k, v in r['legs'].items()})}")
        for wid, trace in r["traces"].items():
            steps = summarize(trace)
            print(f"-- {wid}: {Path(trace).name}, {len(steps)} steps with a launch")
            print("   " + " ".join(f"{c:>11}" for c in cols))
            for st in steps:
                print("   " + " ".join(f"{st.get(c, float('nan')):11.2f}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
