"""`pdserve bench`: a load generator in the style of `vllm bench serve`.

How a run works: build N synthetic requests (seeded), draw N arrival gaps (Poisson or
fixed rate, seeded), then dispatch request i at time sum(gaps[:i]) from the start — the
schedule is absolute, so a slow event loop does not stretch it — each under the
--max-concurrency semaphore and its own --request-timeout. The whole run stops at
--max-duration; whatever has not finished then counts as failed. A sweep repeats this
for each rate with the same requests. Metrics are computed from the per-request
timings only (see bench_client for the timing contract).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pdserve import env
from pdserve.bench_client import BenchClient, BenchRequest, RequestResult, make_client

logger = logging.getLogger(__name__)

# Common English words that are one token each, with their leading space, in the
# SmolLM2 / GPT-2-style BPE vocabularies: n words tokenize to about n tokens.
WORDS = tuple("""the of and to in is was for on that with as by at from his her it an be
this are or which had not but they have one were all their has been who its also first new
two more time after other some would can into most may over when only many about these
there city year years world such made where part between during then out under three well
used known both she while people state through water long day since being life name local
work war house school high later each end own early film game group music small found
large same great way line number area land light book make good best play side place
point field power old young home left right king church top road team four five six seven
eight nine ten red blue green black white sea river town club family form lead round open
course""".split())
GRPC_TOKEN_RANGE = (1000, 20000)  # plain-text ids in any ~32k+ vocabulary; no specials


def parse_range(spec: str, name: str) -> tuple[int, int]:
    """'N' or 'MIN:MAX' (inclusive) -> (lo, hi)."""
    try:
        parts = [int(x) for x in str(spec).split(":")]
    except ValueError as e:
        raise ValueError(f"{name} must be N or MIN:MAX, got {spec!r}") from e
    if len(parts) not in (1, 2):
        raise ValueError(f"{name} must be N or MIN:MAX, got {spec!r}")
    lo, hi = parts[0], parts[-1]
    if lo < 1 or hi < lo:
        raise ValueError(f"{name} needs 1 <= MIN <= MAX, got {spec!r}")
    return lo, hi


def synthetic_requests(n: int, input_len: tuple[int, int], output_len: tuple[int, int],
                       seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, o = rng.randint(*input_len), rng.randint(*output_len)
        text = " ".join(rng.choice(WORDS) for _ in range(p))
        ids = [rng.randrange(*GRPC_TOKEN_RANGE) for _ in range(p)]
        out.append(BenchRequest(prompt=text, prompt_ids=ids, prompt_len=p, output_len=o))
    return out


def arrival_gaps(n: int, rate: float, arrival: str, seed: int) -> list[float]:
    """Seconds to wait before each request (the first waits 0). rate=inf: all at once."""
    if rate <= 0:
        raise ValueError(f"the request rate must be > 0, got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    if arrival == "fixed":
        return [0.0] + [1.0 / rate] * (n - 1)
    if arrival == "poisson":
        rng = random.Random(seed)
        return [0.0] + [rng.expovariate(rate) for _ in range(n - 1)]
    raise ValueError(f"unknown arrival process {arrival!r}: poisson or fixed")


def parse_slo(spec: str | None) -> tuple[float, float] | None:
    if not spec:
        return None
    try:
        ttft, tpot = (float(x) for x in spec.split(","))
    except ValueError as e:
        raise ValueError(f"--slo must be ttft_ms,tpot_ms, got {spec!r}") from e
    return ttft, tpot


def _stats(name: str, values_ms: list[float]) -> dict[str, float | None]:
    if not values_ms:
        return {f"{k}_{name}_ms": None for k in ("mean", "p50", "p90", "p99")}
    a = np.asarray(values_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])  # linear interpolation, as vLLM
    return {f"mean_{name}_ms": float(a.mean()), f"p50_{name}_ms": float(p50),
            f"p90_{name}_ms": float(p90), f"p99_{name}_ms": float(p99)}


def summarize(results: list[RequestResult], duration: float,
              slo: tuple[float, float] | None) -> dict[str, Any]:
    """The report of one run. TPOT only covers requests with >1 output token (it is
    undefined for one); a one-token request meets any TPOT SLO."""
    ok = [r for r in results if r.success]
    dur = max(duration, 1e-9)
    ttfts = [r.ttft * 1e3 for r in ok]
    tpots = [r.tpot * 1e3 for r in ok if r.output_tokens > 1]
    itls = [g * 1e3 for r in ok for g in r.itl]
    e2es = [r.e2e * 1e3 for r in ok]
    m: dict[str, Any] = {
        "duration_s": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": sum(r.prompt_len for r in ok),
        "total_output_tokens": sum(r.output_tokens for r in ok),
        "request_throughput": len(ok) / dur,
    }
    m["input_throughput"] = m["total_input_tokens"] / dur
    m["output_throughput"] = m["total_output_tokens"] / dur
    for name, vals in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2e", e2es)):
        m.update(_stats(name, vals))
    if slo is not None:
        good = sum(1 for r in ok if r.ttft * 1e3 <= slo[0] and r.tpot * 1e3 <= slo[1])
        m.update(slo_ttft_ms=slo[0], slo_tpot_ms=slo[1], good_requests=good, goodput=good / dur)
    m["errors"] = dict(Counter(r.error for r in results if not r.success).most_common(5))
    m.update(ttfts_ms=ttfts, tpots_ms=tpots, e2es_ms=e2es)  # for plots / later analysis
    return m


async def run_load(client: BenchClient, model: str, requests: list[BenchRequest],
                   gaps: list[float], max_concurrency: int | None, request_timeout: float,
                   max_duration: float, progress: bool) -> tuple[list[RequestResult], float]:
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    results: list[RequestResult | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), disable=not progress, unit="req")

    async def one(i: int, req: BenchRequest) -> None:
        async with sem or nullcontext():
            try:
                async with asyncio.timeout(request_timeout):
                    results[i] = await client.send(req, model)
            except TimeoutError:
                results[i] = RequestResult(prompt_len=req.prompt_len,
                                           error=f"timed out after {request_timeout:g}s")
            except Exception as e:  # a client bug is one failed request, not a dead run
                logger.exception("request %d failed in the client", i)
                results[i] = RequestResult(prompt_len=req.prompt_len, error=repr(e))
        bar.update(1)

    tasks: list[asyncio.Task] = []

    async def dispatch() -> None:
        due = time.perf_counter()
        for i, (req, gap) in enumerate(zip(requests, gaps)):
            due += gap
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i, req)))
        await asyncio.gather(*tasks)

    start = time.perf_counter()
    try:
        async with asyncio.timeout(max_duration):
            await dispatch()
    except TimeoutError:
        logger.warning("--max-duration %gs reached: stopping the run", max_duration)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    duration = time.perf_counter() - start
    bar.close()
    stopped = RequestResult(error=f"not finished within --max-duration {max_duration:g}s")
    return [r if r is not None else stopped for r in results], duration


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_report(m: dict[str, Any]) -> str:
    rows = [("Request rate (req/s)", f"{m['request_rate']:g}"),
            ("Duration (s)", f"{m['duration_s']:.2f}"),
            ("Completed / failed", f"{m['completed']} / {m['failed']}"),
            ("Request throughput (req/s)", f"{m['request_throughput']:.2f}"),
            ("Input token throughput (tok/s)", f"{m['input_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{m['output_throughput']:.2f}")]
    if "goodput" in m:
        rows.append((f"Goodput @ TTFT<={m['slo_ttft_ms']:g}ms, TPOT<={m['slo_tpot_ms']:g}ms "
                     "(req/s)", f"{m['goodput']:.2f}"))
    lines = [f"{k:<52}{v:>14}" for k, v in rows]
    lines.append(f"{'latency (ms)':<20}{'mean':>12}{'p50':>12}{'p90':>12}{'p99':>12}")
    for name in ("ttft", "tpot", "itl", "e2e"):
        lines.append(f"{name.upper():<20}" + "".join(
            f"{_ms(m[f'{k}_{name}_ms']):>12}" for k in ("mean", "p50", "p90", "p99")))
    for err, count in m["errors"].items():
        lines.append(f"error x{count}: {err}")
    bar = "=" * 68
    return "\n".join([bar, " pdserve bench ".center(68, "="), *lines, bar])


def format_sweep(runs: list[dict[str, Any]]) -> str:
    head = f"{'rate':>8}{'ok':>6}{'fail':>6}{'req/s':>9}{'out tok/s':>11}{'goodput':>9}{'p50 TTFT':>10}{'p99 TTFT':>10}"
    lines = [head]
    for m in runs:
        lines.append(f"{m['request_rate']:>8g}{m['completed']:>6}{m['failed']:>6}"
                     f"{m['request_throughput']:>9.2f}{m['output_throughput']:>11.1f}"
                     f"{m.get('goodput', float('nan')):>9.2f}"
                     f"{_ms(m['p50_ttft_ms']):>10}{_ms(m['p99_ttft_ms']):>10}")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: str) -> None:
    """Latency CDFs per run; in a sweep a second row with throughput and goodput vs rate."""
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    sweep = len(runs) > 1
    fig, axes = plt.subplots(2 if sweep else 1, 3, figsize=(15, 8 if sweep else 4), squeeze=False)
    for ax, key, title in zip(axes[0], ("ttfts_ms", "tpots_ms", "e2es_ms"), ("TTFT", "TPOT", "E2E")):
        for m in runs:
            v = np.sort(np.asarray(m[key]))
            if len(v):
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=f"rate {m['request_rate']:g}")
        ax.set(title=f"{title} CDF", xlabel="ms", ylabel="fraction of requests")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if sweep:
        # categorical x: rates may include inf and need not be evenly spaced
        x = np.arange(len(runs))
        labels = [f"{m['request_rate']:g}" for m in runs]
        series = [("output_throughput", "output tok/s"), ("request_throughput", "req/s"),
                  ("p99_ttft_ms", "p99 TTFT (ms)")]
        for ax, (key, ylabel) in zip(axes[1], series):
            ax.plot(x, [m[key] if m[key] is not None else np.nan for m in runs], "o-", label=ylabel)
            if key == "request_throughput" and "goodput" in runs[0]:
                ax.plot(x, [m["goodput"] for m in runs], "s--", label="goodput (req/s)")
            ax.set(xticks=x, xticklabels=labels, xlabel="request rate (req/s)", ylabel=ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def _run_all(args: argparse.Namespace, rates: list[float], requests: list[BenchRequest],
                   slo: tuple[float, float] | None, progress: bool) -> list[dict[str, Any]]:
    client = make_client(args.backend, args.base_url, args.target, args.api_key,
                         args.request_timeout, args.max_concurrency)
    try:
        model = args.model or await client.model_name()
        runs = []
        for rate in rates:
            gaps = arrival_gaps(len(requests), rate, args.arrival, args.seed)
            results, duration = await run_load(client, model, requests, gaps, args.max_concurrency,
                                               args.request_timeout, args.max_duration, progress)
            m = summarize(results, duration, slo)
            m.update(request_rate=rate, backend=args.backend, model=model,
                     max_concurrency=args.max_concurrency, num_prompts=len(requests))
            sys.stdout.write(format_report(m) + "\n")
            runs.append(m)
        return runs
    finally:
        await client.close()


def run_bench(args: argparse.Namespace) -> int:
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    input_len = parse_range(args.input_len, "--input-len")
    output_len = parse_range(args.output_len, "--output-len")
    slo = parse_slo(args.slo)
    rates = ([float(x) for x in args.rate_sweep.split(",")] if args.rate_sweep
             else [args.request_rate])
    requests = synthetic_requests(args.num_prompts, input_len, output_len, args.seed)
    # httpx logs every request at INFO: thousands of lines that would bury the report
    logging.getLogger("httpx").setLevel(logging.WARNING)
    progress = not args.no_progress and not env.no_progress() and sys.stderr.isatty()
    runs = asyncio.run(_run_all(args, rates, requests, slo, progress))
    if len(runs) > 1:
        sys.stdout.write(format_sweep(runs) + "\n")
    if args.result_json:
        Path(args.result_json).parent.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k != "func" and k != "api_key"}
        with open(args.result_json, "w") as f:
            json.dump({"config": config, "runs": runs}, f, indent=1)
    plot_path = args.plot or (args.sweep_plot if len(runs) > 1 else None)
    if plot_path:
        plot(runs, plot_path)
        logger.info("plot written to %s", plot_path)
    return 0 if any(m["completed"] for m in runs) else 1
