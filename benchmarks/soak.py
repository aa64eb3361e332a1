"""Soak: the chaos scenario for longer, with the L5 checks (RELIABILITY.md).

Runs a Ray deployment (P prefill + D decode workers, grpc transport, short leases),
sends requests at a steady rate for --minutes while killing a prefill worker every
--kill-every seconds and failing --fail-rate of KV transfers, and samples the router
process's asyncio tasks, threads, open file descriptors and RSS every 10 s. At the end
it checks L1 (none lost), L2 (one terminal each), L4 (pools back to baseline) and L5
(growth per 10k requests) and prints a JSON summary.

    python benchmarks/soak.py --minutes 30 --rate 4 [--out benchmarks/out/soak.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


async def soak(args: argparse.Namespace) -> dict:
    import psutil
    import ray

    from kv_transfer.faults import FaultPlan
    from pdserve.cluster import deploy_ray
    from pdserve.default_model import prepare_default_model
    from pdserve.sampling.params import SamplingParams
    from pdserve.worker_spec import WorkerSpec
    from router.core import GenerateInput, RequestFailed, RouterConfig
    from router.ledger import Overloaded

    from pdserve.cluster import init_ray
    init_ray(num_cpus=max(4, os.cpu_count() or 2), include_dashboard=False,
             namespace="pdserve-soak", logging_level="WARNING")
    base = WorkerSpec(worker_id="base", role="both", model=str(prepare_default_model()),
                      dtype="float32", device="cpu", num_blocks=512, transport="grpc",
                      lease_s=args.lease, transfer_timeout_s=2.0,
                      faults=FaultPlan(kind="reset", probability=args.fail_rate, seed=1).to_json())
    dep = await deploy_ray(base, args.prefill, args.decode,
                           RouterConfig(lease_ms=int(args.lease * 1000), max_inflight=512))
    r = dep.router
    proc = psutil.Process()
    samples: list[dict] = []
    outcomes = {"completed": 0, "error": 0, "rejected": 0}
    n_sent = 0

    async def one(i: int) -> None:
        ids = list(range(1000 + i % 97, 1000 + i % 97 + 16 + i % 200))
        try:
            async for d in r.generate(GenerateInput(ids, SamplingParams(
                    temperature=0, max_tokens=4 + i % 12, ignore_eos=True))):
                if d.finish_reason:
                    outcomes["completed"] += 1
        except Overloaded:
            outcomes["rejected"] += 1
        except RequestFailed:
            outcomes["error"] += 1

    def sample() -> None:
        samples.append(dict(t=time.monotonic(), sent=n_sent, rss_mb=proc.memory_info().rss / 2**20,
                            threads=threading.active_count(), tasks=len(asyncio.all_tasks()),
                            fds=proc.num_fds(), inflight=r.ledger.inflight))

    t0 = time.monotonic()
    end = t0 + 60 * args.minutes
    next_kill, next_sample, kills = t0 + args.kill_every, t0, 0
    tasks: set[asyncio.Task] = set()
    while time.monotonic() < end:
        t = asyncio.create_task(one(n_sent))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        n_sent += 1
        now = time.monotonic()
        if now >= next_kill:
            ray.kill(list(dep.prefill.values())[kills % len(dep.prefill)], no_restart=False)
            kills += 1
            next_kill += args.kill_every
        if now >= next_sample:
            sample()
            next_sample += 10
        await asyncio.sleep(1.0 / args.rate)
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 300)
    await asyncio.sleep(args.lease + 1)
    sample()
    stats = {}
    for wid, w in {**r.prefill, **r.decode}.items():
        try:
            stats[wid] = await asyncio.wait_for(w.client.stats(), 5)
        except Exception as e:  # noqa: BLE001 - a worker still restarting
            stats[wid] = {"error": str(e)}
    await dep.stop()
    ray.shutdown()
    first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
    per10k = 10_000 / max(1, last["sent"] - first["sent"])
    return dict(
        requests=n_sent, outcomes=outcomes, kills=kills, events=dict(r.events),
        L1_lost=r.ledger.lost(), L2_double_finish=r.ledger.double_finish,
        L4_blocks_in_use={k: s.get("kv_blocks_in_use") for k, s in stats.items()},
        L4_reservations={k: s.get("reservations") for k, s in stats.items()},
        L5_growth_per_10k={k: (last[k] - first[k]) * per10k for k in ("rss_mb", "threads", "tasks", "fds")},
        samples=samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--prefill", type=int, default=2)
    ap.add_argument("--decode", type=int, default=2)
    ap.add_argument("--kill-every", type=float, default=60.0)
    ap.add_argument("--fail-rate", type=float, default=0.05)
    ap.add_argument("--lease", type=float, default=2.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "soak.json"))
    args = ap.parse_args()
    res = asyncio.run(soak(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    summary = {k: v for k, v in res.items() if k != "samples"}
    print(json.dumps(summary, indent=1))
    ok = (res["L1_lost"] == 0 and res["L2_double_finish"] == 0
          and all(v in (0, None) for v in res["L4_blocks_in_use"].values()))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
