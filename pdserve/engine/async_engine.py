"""AsyncEngine: the engine's step loop on its own thread, streams for asyncio callers.

Workers (Ray actors with an asyncio loop) wrap this. Thread model:

    asyncio loop (callers)            engine thread (owner of LLMEngine)
    add_request / abort / call  ──▶  command queue ─▶ applied between steps
    RequestStream (asyncio.Queue) ◀── outputs of each step (call_soon_threadsafe)

Only the engine thread touches the LLMEngine, so the scheduler needs no locks. If the
step loop raises, every open stream ends with an error and ``on_fatal`` runs (a worker
exits so that Ray restarts it): an engine never dies silently with requests hanging.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from typing import Any, Callable

from pdserve.engine.llm_engine import LLMEngine, RequestOutput
from pdserve.engine.sequence import FINISH_ERROR
from pdserve.profiling import EngineProfiler
from pdserve.sampling.params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class RequestStream:
    """Async iterator over one request's outputs; ends after its terminal output."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False

    def put(self, out: RequestOutput) -> None:
        self._queue.put_nowait(out)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self._queue.get()
        if out.finished:
            self.finished = True
        return out


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_fatal: Callable[[BaseException], None] | None = None,
                 sink: Callable[[RequestOutput], None] | None = None):
        self.engine = engine
        self.on_fatal = on_fatal
        # Workers pass a sink: every output goes to it (on the asyncio loop) instead of a
        # per-request stream, so one outbox can batch all requests of a step.
        self.sink = sink
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
        self.dead: BaseException | None = None
        self._profiler: EngineProfiler | None = None
        # Outputs the engine makes mid-step (overlapped detokenization) go out at once.
        engine.early_sink = self._deliver

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    # -- caller side (asyncio loop) -------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prefill_only: bool = False,
                    output_token_ids: list[int] | tuple[int, ...] = ()) -> RequestStream:
        if self.dead is not None:
            raise EngineDeadError(f"engine loop died: {self.dead}")
        # read-only: safe off-thread
        self.engine.validate([*prompt_token_ids, *output_token_ids], params)
        stream = self.open_stream(request_id)

        def cmd() -> None:
            try:
                self.engine.add_request(request_id, prompt_token_ids, params, prefill_only,
                                        output_token_ids)
            except ValueError as e:
                self._deliver([_error_output(request_id, str(e), len(prompt_token_ids))])
        self._submit(cmd)
        return stream

    def open_stream(self, request_id: str) -> RequestStream:
        """Register a stream for a request that enters the engine another way
        (a decode reservation activated by a KV transfer)."""
        stream = RequestStream(request_id)
        if self.sink is None:
            self._streams[request_id] = stream
        return stream

    def publish(self, outs: list[RequestOutput]) -> None:
        """Deliver outputs produced outside step() (call from the engine thread, in
        order with the step outputs)."""
        self._deliver(outs)

    def abort(self, request_id: str) -> None:
        def cmd() -> None:
            out = self.engine.abort(request_id)
            if out is not None:
                self._deliver([out])
        self._submit(cmd)

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) on the engine thread between steps; return its result."""
        assert self._loop is not None
        fut: asyncio.Future = self._loop.create_future()

        def cmd() -> None:
            try:
                res = fn(self.engine)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._loop.call_soon_threadsafe(_set_exc, fut, e)
            else:
                self._loop.call_soon_threadsafe(_set_res, fut, res)
        self._submit(cmd)
        return await fut

    def call_from_thread(self, fn: Callable[[LLMEngine], Any], timeout: float) -> Any:
        """call() for a thread that is neither the loop's nor the engine's (a gRPC
        handler): fn(engine) runs on the engine thread between steps while this thread
        waits, with no hop through the event loop. TimeoutError if it has not run in
        `timeout` seconds."""
        if self.dead is not None:
            raise EngineDeadError(f"engine loop died: {self.dead}")
        done: concurrent.futures.Future = concurrent.futures.Future()

        def cmd() -> None:
            try:
                done.set_result(fn(self.engine))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                done.set_exception(e)
        self._submit(cmd)
        return done.result(timeout)

    async def start_profile(self, out_dir: str, name: str = "engine") -> None:
        """Start a torch.profiler trace of the engine thread (see pdserve.profiling)."""
        def start(engine: LLMEngine) -> None:
            if self._profiler is None:
                self._profiler = EngineProfiler(name)
            self._profiler.start(out_dir)
            engine.profiling = True
        await self.call(start)

    async def stop_profile(self) -> str:
        """Stop the trace and write it; returns the trace file's path."""
        def stop(engine: LLMEngine) -> str:
            if self._profiler is None:
                raise RuntimeError("no profile is running")
            engine.profiling = False
            return self._profiler.stop()
        return await self.call(stop)

    def _submit(self, cmd: Callable[[], None]) -> None:
        self._commands.put(cmd)
        self._wake.set()

    # -- engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop:
                self._drain_commands()
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._deliver(self.engine.step())
        except BaseException as e:  # noqa: BLE001 - the loop must never die silently
            logger.exception("engine step loop died")
            self.dead = e
            rids = list(self._streams) if self.sink is None else self.engine.pending_request_ids()
            outs = [_error_output(rid, f"engine loop died: {e}", 0) for rid in rids]
            self._deliver(outs)
            if self.on_fatal is not None:
                self.on_fatal(e)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            cmd()

    def _deliver(self, outs: list[RequestOutput]) -> None:
        if not outs or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._dispatch, outs)

    def _dispatch(self, outs: list[RequestOutput]) -> None:
        if self.sink is not None:
            for out in outs:
                self.sink(out)
            return
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]


def _error_output(request_id: str, message: str, num_prompt_tokens: int) -> RequestOutput:
    return RequestOutput(request_id=request_id, new_token_ids=[], new_text="",
                         new_logprobs=None, finished=True, finish_reason=FINISH_ERROR,
                         stop_reason=None, num_prompt_tokens=num_prompt_tokens,
                         num_output_tokens=0, num_cached_tokens=0, error=message)


def _set_res(fut: asyncio.Future, res: Any) -> None:
    if not fut.done():
        fut.set_result(res)


def _set_exc(fut: asyncio.Future, e: BaseException) -> None:
    if not fut.done():
        fut.set_exception(e)
