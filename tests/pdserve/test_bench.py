"""`pdserve bench`: dataset, arrivals, metrics on hand-made timings, and end-to-end runs
against tiny real servers started here (an OpenAI-style SSE app and a gRPC Generation
servicer). Those servers stand for the server under test; they are not pdserve parts.

Fault injection is by request content: max_tokens == 5 gets HTTP 500 and max_tokens == 4
an SSE error object mid-stream; the servers count what they saw, and the test checks
that the report's failures are exactly those requests."""
from __future__ import annotations

import asyncio
import json
import math
import socket
import statistics
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pdserve.bench import (arrival_gaps, parse_range, parse_slo, run_load, summarize,
                           synthetic_requests)
from pdserve.bench_client import BenchRequest, RequestResult
from pdserve.cli import build_parser
from pdserve.v1 import generation_pb2 as pb
from pdserve.v1 import generation_pb2_grpc as pb_grpc


# -- dataset ----------------------------------------------------------------------------
def test_parse_range() -> None:
    assert parse_range("7", "x") == (7, 7)
    assert parse_range("3:9", "x") == (3, 9)
    for bad in ("0", "9:3", "a:b", "1:2:3"):
        with pytest.raises(ValueError):
            parse_range(bad, "x")


def test_dataset_lengths_in_range_and_seeded() -> None:
    reqs = synthetic_requests(200, (32, 64), (4, 8), seed=3)
    assert all(32 <= r.prompt_len <= 64 and 4 <= r.output_len <= 8 for r in reqs)
    assert all(len(r.prompt.split()) == r.prompt_len == len(r.prompt_ids) for r in reqs)
    assert all(1000 <= t < 20000 for r in reqs for t in r.prompt_ids)
    assert {r.prompt_len for r in reqs} == set(range(32, 65))  # uniform covers the range
    assert reqs == synthetic_requests(200, (32, 64), (4, 8), seed=3)
    assert reqs != synthetic_requests(200, (32, 64), (4, 8), seed=4)


def test_prompts_tokenize_to_about_their_length(default_model_dir: str) -> None:
    from pdserve.tokenizer import Tokenizer
    tok = Tokenizer(default_model_dir)
    for r in synthetic_requests(20, (16, 512), (1, 1), seed=0):
        n = len(tok.encode(r.prompt))
        assert abs(n - r.prompt_len) <= max(2, 0.05 * r.prompt_len), (n, r.prompt_len)


# -- arrivals ---------------------------------------------------------------------------
def test_poisson_mean_gap_is_one_over_rate() -> None:
    gaps = arrival_gaps(20001, 4.0, "poisson", seed=1)
    assert gaps[0] == 0.0
    assert statistics.fmean(gaps[1:]) == pytest.approx(0.25, rel=0.03)
    # exponential: the standard deviation equals the mean
    assert statistics.pstdev(gaps[1:]) == pytest.approx(0.25, rel=0.05)
    assert gaps == arrival_gaps(20001, 4.0, "poisson", seed=1)


def test_fixed_and_infinite_rates() -> None:
    assert arrival_gaps(5, 4.0, "fixed", seed=0) == [0.0, 0.25, 0.25, 0.25, 0.25]
    assert arrival_gaps(3, math.inf, "poisson", seed=0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        arrival_gaps(3, 0.0, "fixed", seed=0)


# -- metrics ----------------------------------------------------------------------------
def _res(ttft: float, e2e: float, out: int, ok: bool = True) -> RequestResult:
    return RequestResult(success=ok, error="" if ok else "boom", prompt_len=10,
                         output_tokens=out, ttft=ttft, e2e=e2e,
                         itl=[(e2e - ttft) / (out - 1)] * (out - 1) if out > 1 else [])


def test_tpot_definition() -> None:
    assert _res(0.1, 1.0, 10).tpot == pytest.approx(0.1)
    assert _res(0.1, 0.1, 1).tpot == 0.0


def test_summary_percentiles_throughput_and_goodput() -> None:
    results = [_res(0.1, 1.0, 10), _res(0.2, 2.0, 10), _res(0.3, 0.75, 4), _res(0.4, 0.4, 1),
               _res(9.0, 9.0, 2, ok=False)]
    m = summarize(results, duration=2.0, slo=parse_slo("250,150"))
    assert (m["completed"], m["failed"]) == (4, 1)
    assert m["errors"] == {"boom": 1}
    assert m["total_output_tokens"] == 25 and m["total_input_tokens"] == 40
    assert m["request_throughput"] == pytest.approx(2.0)
    assert m["output_throughput"] == pytest.approx(12.5)
    assert m["mean_ttft_ms"] == pytest.approx(250.0)
    assert m["p50_ttft_ms"] == pytest.approx(250.0)
    assert m["p90_ttft_ms"] == pytest.approx(370.0)   # linear: 300 + 0.7 * 100
    assert m["p99_ttft_ms"] == pytest.approx(397.0)
    # TPOT over requests with >1 token: 100, 200, 150 ms
    assert m["mean_tpot_ms"] == pytest.approx(150.0)
    assert m["p50_tpot_ms"] == pytest.approx(150.0)
    assert m["mean_e2e_ms"] == pytest.approx(1037.5)
    assert len(m["ttfts_ms"]) == 4 and m["p50_itl_ms"] == pytest.approx(150.0)
    # SLO TTFT<=250, TPOT<=150: requests 1 (100,100) and 2 (200,200 -> TPOT fails),
    # 3 (300 -> TTFT fails), 4 (400 -> fails) => 1 good request in 2 s
    assert m["good_requests"] == 1 and m["goodput"] == pytest.approx(0.5)


def test_summary_with_no_success_has_null_latencies() -> None:
    m = summarize([_res(1, 2, 3, ok=False)], duration=1.0, slo=None)
    assert m["completed"] == 0 and m["p99_ttft_ms"] is None and "goodput" not in m


# -- the load loop with an in-process client ----------------------------------------------
class _SlowClient:
    """Sleeps per request (0.05 s, or 10 s when output_len == 99); tracks concurrency."""

    def __init__(self) -> None:
        self.inflight = self.peak = 0

    async def send(self, req: BenchRequest, model: str) -> RequestResult:
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            await asyncio.sleep(10.0 if req.output_len == 99 else 0.05)
        finally:
            self.inflight -= 1
        return RequestResult(success=True, prompt_len=req.prompt_len, output_tokens=1,
                             ttft=0.05, e2e=0.05)


def test_run_load_caps_concurrency_and_bounds_time() -> None:
    reqs = [BenchRequest("x", [1], 1, 1)] * 12 + [BenchRequest("x", [1], 1, 99)]
    client = _SlowClient()
    results, dur = asyncio.run(run_load(client, "", reqs, [0.0] * 13, max_concurrency=3,
                                        request_timeout=0.5, max_duration=30, progress=False))
    assert client.peak == 3
    assert sum(r.success for r in results) == 12
    assert results[-1].error.startswith("timed out") and dur < 5
    # --max-duration: the slow request is cut by the run's bound, not its own timeout
    results, dur = asyncio.run(run_load(_SlowClient(), "", reqs, [0.0] * 13, None,
                                        request_timeout=60, max_duration=0.5, progress=False))
    assert sum(r.success for r in results) == 12 and "max-duration" in results[-1].error
    assert dur < 5


# -- end to end against a tiny OpenAI-style SSE server -----------------------------------
def _openai_app(seen: dict[str, int]) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "tiny", "object": "model"}]}

    async def _stream(body: dict, chat: bool):
        n = body["max_tokens"]
        assert body["ignore_eos"] is True and body["stream"] is True
        for i in range(n):
            if n == 4 and i == 2:
                yield f"data: {json.dumps({'error': {'message': 'injected', 'code': 500}})}\n\n"
                return
            choice = {"index": 0, "delta": {"content": " w"}} if chat else {"index": 0, "text": " w"}
            yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            await asyncio.sleep(0.002)
        last = {"index": 0, "finish_reason": "length", **({"delta": {}} if chat else {"text": ""})}
        yield f"data: {json.dumps({'choices': [last]})}\n\n"
        usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    async def handle(request: Request, chat: bool):
        body = await request.json()
        seen[body.get("model", "")] = seen.get(body.get("model", ""), 0) + 1
        seen[f"max_tokens={body['max_tokens']}"] = seen.get(f"max_tokens={body['max_tokens']}", 0) + 1
        if body["max_tokens"] == 5:
            return JSONResponse({"error": {"message": "injected"}}, status_code=500)
        return StreamingResponse(_stream(body, chat), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, chat=True)

    return app


@pytest.fixture()
def openai_server():
    import uvicorn

    seen: dict[str, int] = {}
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(_openai_app(seen), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", seen
    server.should_exit = True
    thread.join(timeout=10)


def _bench(argv: list[str]) -> int:
    args = build_parser().parse_args(["bench", "--no-progress", "--seed", "5", *argv])
    return args.func(args)


@pytest.mark.parametrize("backend", ["openai", "openai-chat"])
def test_run_bench_openai_end_to_end(openai_server, tmp_path: Path, backend: str) -> None:
    url, seen = openai_server
    out = tmp_path / "r.json"
    rc = _bench(["--backend", backend, "--base-url", url, "--num-prompts", "30",
                 "--input-len", "8:16", "--output-len", "2:5", "--request-rate", "200",
                 "--max-concurrency", "8", "--slo", "10000,10000", "--result-json", str(out)])
    assert rc == 0
    lens = [r.output_len for r in synthetic_requests(30, (8, 16), (2, 5), seed=5)]
    n_fail = sum(1 for n in lens if n in (4, 5))
    assert 0 < n_fail < 30
    run = json.loads(out.read_text())["runs"][0]
    assert seen["tiny"] == 30                     # the model came from /v1/models
    assert seen.get("max_tokens=5", 0) == lens.count(5)
    assert (run["completed"], run["failed"]) == (30 - n_fail, n_fail)
    assert run["total_output_tokens"] == sum(n for n in lens if n not in (4, 5))
    assert run["total_input_tokens"] == 7 * (30 - n_fail)    # the server's usage wins
    assert run["good_requests"] == run["completed"]
    assert sum(run["errors"].values()) == n_fail
    assert run["p50_ttft_ms"] > 0 and run["mean_tpot_ms"] > 0


def test_run_bench_sweep_writes_plot(openai_server, tmp_path: Path) -> None:
    url, _ = openai_server
    png, out = tmp_path / "p.png", tmp_path / "r.json"
    rc = _bench(["--base-url", url, "--num-prompts", "6", "--input-len", "8",
                 "--output-len", "3", "--rate-sweep", "50,inf", "--arrival", "fixed",
                 "--slo", "1000,100", "--plot", str(png), "--result-json", str(out)])
    assert rc == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["request_rate"] for r in runs] == [50, math.inf]
    assert all(r["completed"] == 6 for r in runs)
    assert png.stat().st_size > 10_000


def test_run_bench_unreachable_server_fails_cleanly(tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    out = tmp_path / "r.json"
    rc = _bench(["--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "3",
                 "--input-len", "4", "--output-len", "2", "--result-json", str(out)])
    run = json.loads(out.read_text())["runs"][0]
    assert rc == 1 and (run["completed"], run["failed"]) == (0, 3)


# -- end to end against a tiny gRPC Generation servicer ---------------------------------
class _Gen(pb_grpc.GenerationServicer):
    def __init__(self) -> None:
        self.prompt_lens: list[int] = []

    def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[pb.ModelCard(id="tiny")])

    def Generate(self, request, context):
        self.prompt_lens.append(len(request.token_ids.ids))
        n = request.sampling.max_tokens
        if n == 5:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "injected")
        for i in range(n - 1):
            yield pb.GenerateResponse(request_id="r", token_ids=[100 + i], text=" w")
        yield pb.GenerateResponse(
            request_id="r", token_ids=[1], finish_reason=pb.FINISH_REASON_LENGTH,
            usage=pb.Usage(prompt_tokens=len(request.token_ids.ids), completion_tokens=n))


def test_run_bench_grpc_end_to_end(tmp_path: Path) -> None:
    servicer = _Gen()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        out = tmp_path / "r.json"
        rc = _bench(["--backend", "grpc", "--target", f"127.0.0.1:{port}", "--num-prompts", "20",
                     "--input-len", "8:16", "--output-len", "3:5", "--result-json", str(out)])
    finally:
        server.stop(0)
    reqs = synthetic_requests(20, (8, 16), (3, 5), seed=5)
    ok = [r for r in reqs if r.output_len != 5]
    run = json.loads(out.read_text())["runs"][0]
    assert 0 < len(ok) < 20
    assert rc == 0 and (run["completed"], run["failed"]) == (len(ok), 20 - len(ok))
    assert run["total_input_tokens"] == sum(r.prompt_len for r in ok)
    assert run["total_output_tokens"] == sum(r.output_len for r in ok)
    assert sorted(servicer.prompt_lens) == sorted(r.prompt_len for r in reqs)
    assert run["errors"] == {"RESOURCE_EXHAUSTED: injected": 20 - len(ok)}
