"""One in-process deployment (1 prefill + 1 decode, local transport, the default model on
CPU) with BOTH public servers on free 127.0.0.1 ports, all in one asyncio loop on a
background thread. Tests talk to it with ordinary sync clients from the main thread and
reach the loop through `Served.run`."""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable

import pytest

MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class Served:
    loop: asyncio.AbstractEventLoop
    deployment: Any
    frontend: Any
    http_url: str
    grpc_target: str

    def run(self, coro: Awaitable[Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def worker_stats(self) -> dict[str, dict]:
        async def all_stats() -> dict[str, dict]:
            d = self.deployment
            return {k: await w.stats() for k, w in [*d.prefill.items(), *d.decode.items()]}
        return self.run(all_stats())

    def wait_idle(self, timeout: float = 2.0) -> dict[str, dict]:
        """Polls until no KV block is in use (prefix-cached blocks don't count) and no
        reservation or request is open on any worker; returns the last stats."""
        end = time.monotonic() + timeout
        while True:
            stats = self.worker_stats()
            busy = [k for k, s in stats.items() if s["kv_blocks_in_use"]
                    or s.get("reservations", 0) or s.get("requests", 0)]
            if not busy and not self.deployment.router.ledger.inflight:
                return stats
            if time.monotonic() > end:
                return stats
            time.sleep(0.05)

    def start_grpc(self, **frontend_changes: Any) -> tuple[Any, int]:
        """A second gRPC server on the same router with a modified Frontend."""
        from router.grpc_server import build_grpc_server

        async def up() -> tuple[Any, int]:
            server, port = build_grpc_server(replace(self.frontend, **frontend_changes),
                                             "127.0.0.1", 0)
            await server.start()
            return server, port
        return self.run(up())


@pytest.fixture(scope="session")
def served(default_model_dir: str):
    import uvicorn

    from pdserve.cluster import deploy_in_process
    from pdserve.metrics import make_registry
    from pdserve.tokenizer import Tokenizer
    from pdserve.worker_spec import WorkerSpec
    from router.core import RouterConfig
    from router.frontend import Frontend
    from router.grpc_server import build_grpc_server
    from router.http_server import build_http_app

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="served-loop", daemon=True)
    thread.start()

    def run(coro: Awaitable[Any], timeout: float = 180.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    async def up() -> dict[str, Any]:
        spec = WorkerSpec(worker_id="base", role="both", model=default_model_dir,
                          model_name=MODEL_NAME, dtype="float32", device="cpu",
                          num_blocks=512, transport="local")
        dep = await deploy_in_process(spec, 1, 1, RouterConfig(model_name=MODEL_NAME,
                                                               transport="local"))
        max_len = min(w.info.max_model_len for w in dep.router.decode.values())
        fe = Frontend(router=dep.router, tokenizer=Tokenizer(default_model_dir),
                      model_name=MODEL_NAME, max_model_len=max_len, api_key=None,
                      metrics_registry=make_registry(dep.router))
        grpc_server, grpc_port = build_grpc_server(fe, "127.0.0.1", 0)
        await grpc_server.start()
        config = uvicorn.Config(build_http_app(fe), host="127.0.0.1", port=0,
                                log_level="warning", lifespan="off")
        http = uvicorn.Server(config)
        task = asyncio.ensure_future(http.serve())
        while not http.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        http_port = http.servers[0].sockets[0].getsockname()[1]
        return dict(dep=dep, fe=fe, grpc=grpc_server, grpc_port=grpc_port, http=http,
                    http_task=task, http_port=http_port)

    parts = run(up())
    yield Served(loop, parts["dep"], parts["fe"], f"http://127.0.0.1:{parts['http_port']}",
                 f"127.0.0.1:{parts['grpc_port']}")

    async def down() -> None:
        parts["http"].should_exit = True
        await parts["grpc"].stop(grace=0.5)
        try:
            await asyncio.wait_for(parts["http_task"], 5)
        except asyncio.TimeoutError:
            parts["http_task"].cancel()
        await parts["dep"].stop()

    try:
        run(down(), timeout=30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


class FakeRouter:
    """Stands in for the Router where a test needs a failure on demand: raises `exc`
    at admission, or after one delta when `after_first`. No decode workers: unhealthy."""

    def __init__(self, exc: BaseException, after_first: bool = False) -> None:
        self.exc = exc
        self.after_first = after_first
        self.decode: dict[str, Any] = {}
        self.closed = 0

    async def generate(self, inp: Any):
        from router.core import Delta
        try:
            if self.after_first:
                yield Delta("req-fake", [42], "x")
            raise self.exc
        finally:
            self.closed += 1


@pytest.fixture(scope="session")
def fake_router() -> type[FakeRouter]:
    return FakeRouter


@pytest.fixture(scope="session")
def reference(default_model_dir: str) -> Callable[..., str]:
    """Greedy text from the single-process engine, memoized: reference("prompt", text,
    n) / reference("ids", ids, n) / reference("chat", messages, n)."""
    from pdserve import LLM, SamplingParams

    llm = LLM(default_model_dir, dtype="float32", device="cpu", num_blocks=256)
    cache: dict[Any, str] = {}

    def ref(kind: str, value: Any, max_tokens: int, **kw: Any) -> str:
        key = (kind, repr(value), max_tokens, tuple(sorted(kw.items())))
        if key not in cache:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)
            if kind == "chat":
                out = llm.chat(value, params)[0]
            else:
                out = llm.generate(value, params)[0]
            cache[key] = out.text
        return cache[key]
    return ref
