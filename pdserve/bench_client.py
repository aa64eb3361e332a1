"""Per-request clients of `pdserve bench`: one streaming request in, one RequestResult out.

Every client follows the same timing contract, so the backends compare fairly:

    t0 = send ──► first chunk carrying tokens = TTFT ──► ... chunk k ... ──► stream end = E2E
                  └───────── ITL: gaps between consecutive chunks carrying tokens ─────────┘

A client never raises for a server-side failure (HTTP status, SSE error object, gRPC
status, finish_reason error/abort, no tokens): it returns success=False with the reason,
so one bad request is counted, never fatal to the run.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import httpx

from pdserve.v1 import generation_pb2 as pb
from pdserve.v1 import generation_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class BenchRequest:
    """One synthetic request; text for the HTTP backends, token ids for gRPC."""
    prompt: str
    prompt_ids: list[int]
    prompt_len: int    # tokens we aimed for (the server's usage, when sent, wins)
    output_len: int    # max_tokens, with ignore_eos so the server produces exactly this


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0                                  # seconds
    e2e: float = 0.0                                   # seconds
    itl: list[float] = field(default_factory=list)     # seconds, one per gap between chunks

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first: (e2e - ttft) / (out - 1)."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


class BenchClient(Protocol):
    async def model_name(self) -> str: ...
    async def send(self, req: BenchRequest, model: str) -> RequestResult: ...
    async def close(self) -> None: ...


class _Timer:
    """Records chunk arrival times against the send time."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.last: float | None = None

    def chunk(self, res: RequestResult) -> None:
        now = time.perf_counter()
        if self.last is None:
            res.ttft = now - self.t0
        else:
            res.itl.append(now - self.last)
        self.last = now

    def finish(self, res: RequestResult, chunks: int, usage_out: int | None) -> None:
        res.e2e = time.perf_counter() - self.t0
        # usage is exact; counting chunks undercounts when a server packs tokens together
        res.output_tokens = usage_out if usage_out is not None else chunks
        if res.output_tokens == 0 and not res.error:
            res.error = "the stream carried no tokens"
        res.success = not res.error


class OpenAIClient:
    """/v1/completions or /v1/chat/completions with stream=true; SSE parsed by hand so the
    timing sees each `data:` line as it arrives."""

    def __init__(self, base_url: str, chat: bool, api_key: str | None, timeout: float,
                 max_connections: int | None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # trust_env=False: a proxy from the environment must not sit between the load
        # generator and a local server (it would add latency and often refuses SSE).
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers, trust_env=False,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections))
        self.chat = chat

    async def model_name(self) -> str:
        try:
            r = await self.http.get("/v1/models")
            data = r.json().get("data") or []
            return str(data[0]["id"]) if data else ""
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            return ""  # the server then picks its default model

    def _payload(self, req: BenchRequest, model: str) -> tuple[str, dict]:
        body: dict = {"max_tokens": req.output_len, "ignore_eos": True, "temperature": 0.0,
                      "stream": True, "stream_options": {"include_usage": True}}
        if model:
            body["model"] = model
        if self.chat:
            body["messages"] = [{"role": "user", "content": req.prompt}]
            return "/v1/chat/completions", body
        body["prompt"] = req.prompt
        return "/v1/completions", body

    async def send(self, req: BenchRequest, model: str) -> RequestResult:
        path, body = self._payload(req, model)
        res = RequestResult(prompt_len=req.prompt_len)
        timer, chunks, usage_out = _Timer(), 0, None
        try:
            async with self.http.stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")[:200]
                    res.error = f"HTTP {resp.status_code}: {text}"
                    timer.finish(res, 0, None)
                    return res
                async for line in resp.aiter_lines():
                    line = line.strip()
                    if not line.startswith("data:"):
                        continue  # blank separators, `:` comments, event/id fields
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    obj = json.loads(data)
                    if obj.get("error"):
                        res.error = f"server error: {obj['error']}"
                        break
                    if obj.get("usage"):
                        res.prompt_len = int(obj["usage"].get("prompt_tokens") or res.prompt_len)
                        usage_out = int(obj["usage"].get("completion_tokens") or 0)
                    for choice in obj.get("choices") or []:
                        text = choice.get("text") if not self.chat else (
                            (choice.get("delta") or {}).get("content"))
                        if text:
                            timer.chunk(res)
                            chunks += 1
        except (httpx.HTTPError, ValueError) as e:
            res.error = f"{type(e).__name__}: {e}"
        timer.finish(res, chunks, usage_out)
        return res

    async def close(self) -> None:
        await self.http.aclose()


class GrpcClient:
    """pdserve.v1.Generation/Generate (server streaming) over one shared channel; HTTP/2
    multiplexes the concurrent streams."""

    _FAILED = (pb.FINISH_REASON_ABORT, pb.FINISH_REASON_ERROR)

    def __init__(self, target: str, api_key: str | None, timeout: float) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout

    async def model_name(self) -> str:
        try:
            resp = await self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata,
                                              timeout=min(self.timeout, 10.0))
            return resp.models[0].id if resp.models else ""
        except grpc.aio.AioRpcError:
            return ""  # empty model: the deployment's default

    async def send(self, req: BenchRequest, model: str) -> RequestResult:
        msg = pb.GenerateRequest(
            model=model, token_ids=pb.TokenIds(ids=req.prompt_ids), client_label="bench",
            sampling=pb.SamplingParams(max_tokens=req.output_len, temperature=0.0,
                                       ignore_eos=True))
        res = RequestResult(prompt_len=req.prompt_len)
        timer, chunks, usage_out = _Timer(), 0, None
        try:
            async for resp in self.stub.Generate(msg, metadata=self.metadata, timeout=self.timeout):
                if resp.token_ids:
                    timer.chunk(res)
                    chunks += len(resp.token_ids)
                if resp.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    if resp.HasField("usage"):
                        res.prompt_len = resp.usage.prompt_tokens or res.prompt_len
                        usage_out = resp.usage.completion_tokens
                    if resp.finish_reason in self._FAILED:
                        res.error = f"finish_reason {pb.FinishReason.Name(resp.finish_reason)}"
        except grpc.aio.AioRpcError as e:
            res.error = f"{e.code().name}: {e.details()}"
        timer.finish(res, chunks, usage_out)
        return res

    async def close(self) -> None:
        await self.channel.close()


def make_client(backend: str, base_url: str, target: str, api_key: str | None,
                timeout: float, max_connections: int | None) -> BenchClient:
    if backend in ("openai", "openai-chat"):
        return OpenAIClient(base_url, backend == "openai-chat", api_key, timeout, max_connections)
    if backend == "grpc":
        return GrpcClient(target, api_key, timeout)
    raise ValueError(f"unknown backend {backend!r}: openai, openai-chat or grpc")
