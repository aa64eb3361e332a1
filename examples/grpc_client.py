"""Stream a chat answer from `pdserve serve` over gRPC (default 127.0.0.1:50051).

    python examples/grpc_client.py "What is the capital of France?" [--target HOST:PORT]

Set PDSERVE_API_KEY if the server was started with --api-key."""
from __future__ import annotations

import argparse
import os

import grpc

from pdserve.v1 import generation_pb2 as pb
from pdserve.v1 import generation_pb2_grpc as pb_grpc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("question", nargs="?", default="What is the capital of France?")
    ap.add_argument("--target", default="127.0.0.1:50051")
    args = ap.parse_args()
    key = os.environ.get("PDSERVE_API_KEY")
    metadata = [("authorization", f"Bearer {key}")] if key else None

    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        model = stub.ListModels(pb.ListModelsRequest(), metadata=metadata).models[0]
        print(f"model: {model.id} (context {model.max_model_len} tokens)")

        messages = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=args.question)])
        count = stub.Tokenize(pb.TokenizeRequest(messages=messages), metadata=metadata).count
        print(f"prompt: {count} tokens")

        request = pb.GenerateRequest(
            messages=messages,
            sampling=pb.SamplingParams(max_tokens=64, temperature=0.0))
        try:
            # timeout= becomes the request's deadline on the server too.
            for resp in stub.Generate(request, metadata=metadata, timeout=60):
                print(resp.text, end="", flush=True)
                if resp.finish_reason:
                    u = resp.usage
                    print(f"\n[{pb.FinishReason.Name(resp.finish_reason)}] "
                          f"{u.prompt_tokens} prompt + {u.completion_tokens} completion tokens")
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}")


if __name__ == "__main__":
    main()
