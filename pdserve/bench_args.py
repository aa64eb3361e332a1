"""Arguments of `pdserve bench` (kept apart so `pdserve --help` stays cheap to import)."""
from __future__ import annotations

import argparse


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["openai", "openai-chat", "grpc"], default="openai",
                   help="which API to load: /v1/completions, /v1/chat/completions or gRPC Generate")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="HTTP API base URL")
    p.add_argument("--target", default="127.0.0.1:50051", help="gRPC address")
    p.add_argument("--model", default=None, help="model name (default: the server's first model)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (inf: all at once, limited by --max-concurrency)")
    p.add_argument("--rate-sweep", default=None,
                   help="comma-separated request rates to run one after another (plots throughput vs rate)")
    p.add_argument("--arrival", choices=["poisson", "fixed"], default="poisson")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--input-len", default="32:512", help="prompt tokens: N or MIN:MAX (uniform)")
    p.add_argument("--output-len", default="16:128", help="output tokens: N or MIN:MAX (uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo", default=None, help="goodput SLO as ttft_ms,tpot_ms (e.g. 1000,50)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--result-json", default=None, help="write the metrics as JSON here")
    p.add_argument("--plot", default=None, help="write latency CDFs (and throughput vs rate) as PNG here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds one request may take before it counts as failed")
    p.add_argument("--max-duration", type=float, default=3600.0,
                   help="seconds one run (one rate) may take; unfinished requests count as failed")
    p.add_argument("--sweep-plot", default="pdserve-bench-sweep.png",
                   help="where a --rate-sweep writes its plot when --plot is not given")
