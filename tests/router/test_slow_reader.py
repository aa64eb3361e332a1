"""A streaming client that stops taking data (RELIABILITY.md "slow reader"): once one
write waits longer than Frontend.write_timeout_s, the front end drops the stream and
closes the router's generator, which cancels the request on the workers. Checked on
both front ends, with the server side's write held the way flow control holds it when
the client reads nothing (the HTTP app's ASGI send, the gRPC context's write)."""
from __future__ import annotations

import asyncio
import json
import time

import grpc

from pdserve.tokenizer import Tokenizer
from pdserve.v1 import generation_pb2 as pb
from router.core import Delta
from router.frontend import Frontend
from router.grpc_server import GenerationServicer
from router.http_server import build_http_app

TIMEOUT_S = 0.3
WRITES_TAKEN = 3          # the client takes this many writes, then none


class EndlessRouter:
    """Yields a token every millisecond until its generator is closed."""

    def __init__(self) -> None:
        self.decode: dict = {}
        self.draining = False
        self.yielded = 0
        self.closed = 0

    async def generate(self, inp):
        try:
            while True:
                self.yielded += 1
                yield Delta("req-slow", [42], "x")
                await asyncio.sleep(0.001)
        finally:
            self.closed += 1


def _frontend(model_dir: str, router: EndlessRouter) -> Frontend:
    return Frontend(router=router, tokenizer=Tokenizer(model_dir), model_name="m",  # type: ignore[arg-type]
                    max_model_len=2048, write_timeout_s=TIMEOUT_S)


async def _stalls_after(n: int, sent: list) -> None:
    if len(sent) >= n:
        await asyncio.Event().wait()       # the client takes nothing more


def test_http_stream_to_a_client_that_stops_reading_is_dropped(default_model_dir):
    router = EndlessRouter()
    app = build_http_app(_frontend(default_model_dir, router))
    body = json.dumps({"model": "m", "prompt": "hello", "max_tokens": 1000,
                       "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    sent: list[dict] = []
    received = asyncio.Event()

    async def receive() -> dict:
        if not received.is_set():
            received.set()
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()       # the client never disconnects either
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await _stalls_after(WRITES_TAKEN, sent)
        sent.append(message)

    async def run() -> float:
        t0 = time.monotonic()
        await asyncio.wait_for(app(scope, receive, send), 10)
        return time.monotonic() - t0

    took = asyncio.run(run())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert len(sent) == WRITES_TAKEN and b"data: " in sent[1]["body"]
    assert took < TIMEOUT_S + 2.0
    assert router.closed == 1                # the request was cancelled on the workers
    assert not any(m.get("more_body") is False for m in sent)     # no clean end: dropped


class StalledContext:
    """A grpc.aio servicer context whose client takes WRITES_TAKEN messages, then none."""

    def __init__(self) -> None:
        self.written: list = []
        self.aborted: tuple | None = None

    def time_remaining(self):
        return None

    def invocation_metadata(self):
        return ()

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return self.aborted is not None

    def set_trailing_metadata(self, md) -> None:
        pass

    async def write(self, msg) -> None:
        await _stalls_after(WRITES_TAKEN, self.written)
        self.written.append(msg)

    async def abort(self, code, details) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


def test_grpc_stream_to_a_client_that_stops_reading_is_dropped(default_model_dir):
    router = EndlessRouter()
    servicer = GenerationServicer(_frontend(default_model_dir, router))
    ctx = StalledContext()
    request = pb.GenerateRequest(model="m", prompt="hello",
                                 sampling=pb.SamplingParams(max_tokens=1000))

    async def run() -> float:
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(servicer.Generate(request, ctx), 10)
        except grpc.aio.AbortError:
            pass
        return time.monotonic() - t0

    took = asyncio.run(run())
    assert len(ctx.written) == WRITES_TAKEN
    assert ctx.aborted is not None and ctx.aborted[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "took no data" in ctx.aborted[1]
    assert took < TIMEOUT_S + 2.0
    assert router.closed == 1
