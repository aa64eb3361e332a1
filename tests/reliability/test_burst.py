"""A burst of 5x the admission limit: the excess is rejected before any stream starts
(gRPC RESOURCE_EXHAUSTED with retry-after; HTTP 429 with Retry-After), and every
accepted request completes with the reference output."""
from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest

from pdserve import LLM, SamplingParams
from pdserve.cluster import deploy_in_process
from pdserve.tokenizer import Tokenizer
from pdserve.v1 import generation_pb2, generation_pb2_grpc
from pdserve.worker_spec import WorkerSpec
from router.core import RouterConfig
from router.frontend import Frontend
from router.grpc_server import build_grpc_server
from router.http_server import build_http_app

LIMIT = 8
PROMPT = "Name three rivers in Europe."


@pytest.mark.timeout(300)
def test_burst_5x_admission_limit(default_model_dir):
    ref = LLM(default_model_dir, dtype="float32", device="cpu", num_blocks=64).generate(
        [PROMPT], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    base = WorkerSpec(worker_id="base", role="both", model=default_model_dir, dtype="float32",
                      device="cpu", num_blocks=256, transport="local")

    async def run():
        dep = await deploy_in_process(base, 1, 1, RouterConfig(max_inflight=LIMIT, block_size=16))
        fe = Frontend(router=dep.router, tokenizer=Tokenizer(default_model_dir),
                      model_name="m", max_model_len=2048)
        server, port = build_grpc_server(fe, "127.0.0.1", 0)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = generation_pb2_grpc.GenerationStub(ch)
                req = generation_pb2.GenerateRequest(prompt=PROMPT, sampling=generation_pb2.SamplingParams(
                    temperature=0.0, max_tokens=24, ignore_eos=True))

                async def one():
                    call = stub.Generate(req, timeout=120)
                    ids, n_msgs = [], 0
                    try:
                        async for r in call:
                            n_msgs += 1
                            ids.extend(r.token_ids)
                        return "ok", ids, n_msgs, None
                    except grpc.aio.AioRpcError as e:
                        md = dict(e.trailing_metadata() or ())
                        return e.code().name, ids, n_msgs, md.get("retry-after")
                grpc_results = await asyncio.gather(*[one() for _ in range(5 * LIMIT)])
            # The same burst over HTTP (non-streaming), straight into the ASGI app.
            app = build_http_app(fe)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://t", timeout=120) as client:
                body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
                http_results = await asyncio.gather(*[client.post("/v1/completions", json=body)
                                                      for _ in range(5 * LIMIT)])
            return grpc_results, http_results, dep.router.ledger
        finally:
            await server.stop(0)
            await dep.stop()

    grpc_results, http_results, ledger = asyncio.run(run())
    ok = [r for r in grpc_results if r[0] == "ok"]
    rejected = [r for r in grpc_results if r[0] == "RESOURCE_EXHAUSTED"]
    assert len(ok) + len(rejected) == 5 * LIMIT, {r[0] for r in grpc_results}
    assert len(rejected) >= 3 * LIMIT and len(ok) >= LIMIT
    assert all(n == 0 and ra is not None for _, _, n, ra in rejected)   # before any stream
    assert all(ids == ref.token_ids for _, ids, _, _ in ok)
    codes = [r.status_code for r in http_results]
    assert set(codes) <= {200, 429} and codes.count(429) >= 3 * LIMIT
    assert all("Retry-After" in r.headers for r in http_results if r.status_code == 429)
    assert all(r.json()["choices"][0]["text"] == ref.text for r in http_results if r.status_code == 200)
    assert ledger.lost() == 0 and ledger.double_finish == 0
