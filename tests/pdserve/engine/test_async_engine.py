"""AsyncEngine: streams, aborts, calls between steps, and a dying step loop."""
from __future__ import annotations

import asyncio

import pytest

from pdserve import SamplingParams
from pdserve.config import CacheConfig, EngineConfig
from pdserve.engine.async_engine import AsyncEngine, EngineDeadError
from pdserve.engine.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def engine(default_model_dir):
    return LLMEngine(EngineConfig(model=default_model_dir, dtype="float32", device="cpu",
                                  cache=CacheConfig(num_blocks=64)))


def test_stream_abort_and_call(engine):
    async def run():
        ae = AsyncEngine(engine)
        ae.start()
        try:
            ids = engine.tokenizer.encode("Count to ten: one, two,")
            s1 = ae.add_request("a", ids, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
            outs = [o async for o in s1]
            assert sum(len(o.new_token_ids) for o in outs) == 5 and outs[-1].finished
            s2 = ae.add_request("b", ids, SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
            first = await s2.__anext__()
            ae.abort("b")
            rest = [o async for o in s2]
            assert rest[-1].finish_reason == "abort"
            used = await ae.call(lambda e: e.pool.stats().in_use)
            assert used == 0 and first.new_token_ids
        finally:
            await ae.stop()
    asyncio.run(run())


def test_dying_step_loop_ends_every_request_with_an_error(engine, monkeypatch):
    fatal = []

    async def run():
        ae = AsyncEngine(engine, on_fatal=fatal.append)
        ae.start()
        ids = engine.tokenizer.encode("Hello")
        calls = {"n": 0}
        real_step = engine.step

        def broken_step():
            calls["n"] += 1
            if calls["n"] > 2:
                raise RuntimeError("injected: device lost")
            return real_step()
        monkeypatch.setattr(engine, "step", broken_step)
        streams = [ae.add_request(f"r{i}", ids, SamplingParams(max_tokens=50, ignore_eos=True))
                   for i in range(3)]
        finals = []
        for s in streams:
            outs = [o async for o in s]
            finals.append(outs[-1])
        with pytest.raises(EngineDeadError):
            ae.add_request("late", ids, SamplingParams())
        await ae.stop()
        return finals
    finals = asyncio.run(run())
    assert all(f.finished and f.finish_reason == "error" and "device lost" in f.error for f in finals)
    assert len(fatal) == 1 and "device lost" in str(fatal[0])
    # leave the shared engine clean for other tests
    for rid in list(engine.seqs):
        engine.abort(rid)


def test_profile_trace_of_the_engine_thread(engine, tmp_path):
    """start_profile / stop_profile (the workers' profiling calls) write a Chrome trace
    holding the engine's step phases and the torch ops they ran; a second start while
    one runs, or a stop with none, is an error, and the engine keeps serving."""
    import json

    async def run():
        ae = AsyncEngine(engine)
        ae.start()
        try:
            ids = engine.tokenizer.encode("Count to ten: one, two,")
            params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
            with pytest.raises(RuntimeError, match="no profile"):
                await ae.stop_profile()
            await ae.start_profile(str(tmp_path / "prof"), "decode-0")
            with pytest.raises(RuntimeError, match="already running"):
                await ae.start_profile(str(tmp_path / "prof"))
            assert engine.profiling
            outs = [o async for o in ae.add_request("p", ids, params)]
            path = await ae.stop_profile()
            assert not engine.profiling
            more = [o async for o in ae.add_request("q", ids, params)]
            return outs, more, path
        finally:
            await ae.stop()
    outs, more, path = asyncio.run(run())
    assert outs[-1].finished and more[-1].finished
    assert path.startswith(str(tmp_path / "prof" / "decode-0-"))
    names = [e.get("name") for e in json.loads(open(path).read())["traceEvents"]]
    for phase in ("pdserve.schedule", "pdserve.launch", "pdserve.resolve", "pdserve.update"):
        assert names.count(phase) >= 3, phase     # one per step: prefill + 2 decode steps
    assert "aten::embedding" in names


def test_call_from_thread_runs_on_the_engine_thread(engine):
    """A gRPC handler thread runs fn(engine) between steps without the event loop (the
    decode worker's KV Complete); fn's exception reaches the caller."""
    import threading

    async def run():
        ae = AsyncEngine(engine)
        ae.start()
        try:
            seen = {}

            def handler() -> None:
                seen["result"] = ae.call_from_thread(
                    lambda e: (threading.current_thread().name, e.pool.stats().in_use), 5.0)
                try:
                    ae.call_from_thread(lambda e: 1 / 0, 5.0)
                except ZeroDivisionError:
                    seen["raised"] = True
            await asyncio.to_thread(handler)
            return seen
        finally:
            await ae.stop()
    assert asyncio.run(run()) == {"result": ("pdserve-engine", 0), "raised": True}
