"""`pdserve generate`: send one prompt to a running router over gRPC and stream the
answer to stdout (a CLI command, so it writes to stdout/stderr directly)."""
from __future__ import annotations

import argparse
import sys

import grpc

from pdserve.v1 import generation_pb2 as pb
from pdserve.v1 import generation_pb2_grpc as pb_grpc

_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
           pb.FINISH_REASON_ABORT: "abort", pb.FINISH_REASON_ERROR: "error"}


def build_request(prompt: str, raw: bool, max_tokens: int | None,
                  temperature: float | None) -> pb.GenerateRequest:
    sampling = pb.SamplingParams()
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if temperature is not None:
        sampling.temperature = temperature
    req = pb.GenerateRequest(sampling=sampling, client_label="pdserve-cli")
    if raw:
        req.prompt = prompt
    else:
        req.messages.messages.add(role="user", content=prompt)
    return req


def run_generate(args: argparse.Namespace) -> int:
    if args.max_tokens is not None and args.max_tokens < 1:
        sys.stderr.write("error: --max-tokens must be >= 1\n")
        return 2
    req = build_request(args.prompt, args.raw, args.max_tokens, args.temperature)
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        call = stub.Generate(req, metadata=metadata)
        last: pb.GenerateResponse | None = None
        try:
            for resp in call:
                if resp.text:
                    sys.stdout.write(resp.text)
                    sys.stdout.flush()
                last = resp
        except grpc.RpcError as e:
            sys.stdout.write("\n")
            sys.stderr.write(f"error: {e.code().name}: {e.details()}\n")  # type: ignore[attr-defined]
            return 1
        except KeyboardInterrupt:
            call.cancel()         # the router aborts the request on its workers
            sys.stderr.write("\ncancelled\n")
            return 130
    sys.stdout.write("\n")
    if last is not None and last.finish_reason:
        u = last.usage
        sys.stderr.write(f"[{_FINISH.get(last.finish_reason, '?')}] {u.prompt_tokens} prompt + "
                         f"{u.completion_tokens} completion tokens ({u.cached_tokens} cached)\n")
    return 0
