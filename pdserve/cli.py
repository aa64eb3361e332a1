"""`pdserve` command line: prepare-default-model, serve, generate, bench."""
from __future__ import annotations

import argparse
import logging
import sys

from pdserve import env


def _cmd_prepare(args: argparse.Namespace) -> int:
    from pdserve.default_model import prepare_default_model
    path = prepare_default_model(force=args.force)
    print(path)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from pdserve.serve import run_serve
    return run_serve(args)


def _cmd_generate(args: argparse.Namespace) -> int:
    from pdserve.client import run_generate
    return run_generate(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from pdserve.bench import run_bench
    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving")
    sub = p.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare-default-model",
                          help="convert the embedded SmolLM2-135M-Instruct GGUF into a model directory")
    prep.add_argument("--force", action="store_true", help="convert again even if present")
    prep.set_defaults(func=_cmd_prepare)

    serve = sub.add_parser("serve", help="start a router and prefill/decode workers on Ray")
    add_serve_args(serve)
    serve.set_defaults(func=_cmd_serve)

    gen = sub.add_parser("generate", help="send one prompt to a running server (gRPC) and stream the answer")
    gen.add_argument("prompt", help="user message (rendered with the chat template) or raw prompt with --raw")
    gen.add_argument("--target", default="127.0.0.1:50051", help="router gRPC address")
    gen.add_argument("--raw", action="store_true", help="send as a raw prompt, not a chat message")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--api-key", default=None, help="API key (gRPC metadata authorization)")
    gen.set_defaults(func=_cmd_generate)

    bench = sub.add_parser("bench", help="load generator against a running server")
    from pdserve.bench_args import add_bench_args
    add_bench_args(bench)
    bench.set_defaults(func=_cmd_bench)
    return p


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers")
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument("--mode", choices=["disaggregated", "colocated"], default="disaggregated")
    p.add_argument("--transport", choices=["auto", "grpc", "nccl", "ipc", "local"], default="auto",
                   help="KV transport between prefill and decode workers (auto: ipc on one GPU, nccl across GPUs, grpc on CPU)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start a local one)")
    p.add_argument("--host", default="127.0.0.1", help="address the public gRPC and HTTP ports bind to")
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache memory per worker")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks per worker (overrides --kv-cache-gb)")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--prefill-policy", choices=["round_robin", "least_loaded", "prefix_aware"],
                   default="prefix_aware")
    p.add_argument("--decode-policy", choices=["kv_free"], default="kv_free")
    p.add_argument("--disagg-threshold", type=int, default=0,
                   help="prompts shorter than this many tokens skip the transfer (served by a decode worker in the both role)")
    p.add_argument("--max-queue", type=int, default=64, help="admission limit: requests in flight per router")
    p.add_argument("--api-key", default=None, help="require this API key (or set PDSERVE_API_KEY)")
    p.add_argument("--worker-metrics-port", type=int, default=0,
                   help="each worker's own /metrics port on its node address (0: any free port, -1: off)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve gRPC and HTTP over TLS")
    p.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM/Ctrl-C: seconds to let requests in flight finish (new ones get 503)")
    p.add_argument("--write-timeout", type=float, default=30.0,
                   help="seconds a streaming client may take no data before it is dropped "
                        "and its request cancelled")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--prefill-ray-resource", default=None,
                   help="custom Ray resource a prefill worker needs (pins them to a node group, e.g. pdserve_prefill)")
    p.add_argument("--decode-ray-resource", default=None,
                   help="custom Ray resource a decode worker needs (e.g. pdserve_decode)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs per worker actor (default: 1 when CUDA is present, 0.5 with --transport ipc)")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=env.get("PDSERVE_LOG_LEVEL"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
