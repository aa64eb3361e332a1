"""The first token reaches the client before its KV reaches D (P streams it as soon as it
is sampled), and a request whose hand-off fails after that token resumes on other
workers from the tokens already sent. Real workers in one process (local transport, the
default model on CPU), checked against LLM.generate."""
from __future__ import annotations

import asyncio

import pytest

from pdserve import LLM, SamplingParams
from pdserve.cluster import deploy_in_process
from pdserve.worker_spec import WorkerSpec
from router.clients import WorkerDied
from router.core import GenerateInput, RouterConfig

PROMPT = "Write a short note about moving the KV cache between two GPU workers."


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return LLM(default_model_dir, dtype="float32", device="cpu", num_blocks=64)


def spec(model_dir: str) -> WorkerSpec:
    return WorkerSpec(worker_id="base", role="both", model=model_dir, dtype="float32",
                      device="cpu", num_blocks=64, transport="local")


async def collect(router, ids, params, on_delta=None):
    toks, text, deltas = [], "", []
    async for d in router.generate(GenerateInput(list(ids), params)):
        toks.extend(d.token_ids)
        text += d.text
        deltas.append(d)
        if on_delta is not None:
            on_delta(d)
    return toks, text, deltas


async def settled(dep, timeout: float = 3.0) -> list[int]:
    workers = [*dep.prefill.values(), *dep.decode.values()]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        used = [w.engine.pool.stats().in_use for w in workers]
        if not any(used) or loop.time() > end:
            return used
        await asyncio.sleep(0.05)


async def until(cond, timeout: float = 10.0) -> bool:
    """Wait for cond() (polled every 10 ms) at most timeout seconds; its last value."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond() and loop.time() < end:
        await asyncio.sleep(0.01)
    return bool(cond())


def test_the_first_token_is_streamed_before_the_kv_hand_off(default_model_dir, llm):
    """P holds its hand-off (gate after the first token, before the KV is finished) until
    the client got a delta: it comes from P, and the whole stream equals LLM.generate's."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    ids = llm.tokenizer.encode(PROMPT)
    ref = llm.generate([ids], params)[0]

    async def run():
        dep = await deploy_in_process(spec(default_model_dir), 1, 1, RouterConfig(block_size=16))
        got_first = asyncio.Event()
        seen: dict[str, object] = {}

        async def gate(phase, key):
            if phase == "first_token":
                try:
                    await asyncio.wait_for(got_first.wait(), 10)
                    seen["client_had_it"] = True
                except TimeoutError:
                    seen["client_had_it"] = False
                seen["d_running"] = dep.decode["decode-0"].engine.stats()["num_running"]
        dep.prefill["prefill-0"].gate = gate
        try:
            out = await collect(dep.router, ids, params, lambda d: got_first.set())
            return out, seen, await settled(dep)
        finally:
            await dep.stop()

    (toks, text, deltas), seen, used = asyncio.run(run())
    assert seen == {"client_had_it": True, "d_running": 0}   # before D had the request
    assert deltas[0].token_ids == ref.token_ids[:1]
    assert toks == ref.token_ids and text == ref.text
    lps = [lp for d in deltas for lp in (d.logprobs or [])]
    assert [lp.token_id for lp in lps] == ref.token_ids
    assert len(lps[0].top) == 2
    assert used == [0, 0]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=6, stop=[" "]),
], ids=["max_tokens_1", "stop_string"])
def test_a_first_token_that_ends_the_request_is_not_sent_early(default_model_dir, llm, params):
    """Only D reports a request's end (finish reason, stop string cut): P sends nothing
    early then, and the client gets exactly LLM.generate's output."""
    ids = llm.tokenizer.encode(PROMPT)
    ref = llm.generate([ids], params)[0]

    async def run():
        dep = await deploy_in_process(spec(default_model_dir), 1, 1, RouterConfig(block_size=16))
        p = dep.prefill["prefill-0"]
        early: list[int] = []
        real = p._first_token

        def spy(*args):
            first = real(*args)
            early.append(first is not None)
            return first
        p._first_token = spy
        try:
            return await collect(dep.router, ids, params), early
        finally:
            await dep.stop()

    (toks, text, deltas), early = asyncio.run(run())
    assert toks == ref.token_ids and text == ref.text
    assert deltas[-1].finish_reason == ref.finish_reason
    if params.max_tokens == 1:
        assert early == [False]


@pytest.mark.parametrize("params,n_prefill", [
    (SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), 2),
    (SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, frequency_penalty=1.5,
                    presence_penalty=0.5), 2),
    (SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, frequency_penalty=1.5), 1),
], ids=["greedy", "penalties", "colocated_retry"])
def test_a_hand_off_that_fails_after_the_first_token_resumes_from_it(default_model_dir, llm,
                                                                     params, n_prefill):
    """prefill-0's transfer fails after its first token reached the client. The router
    resumes after that token (it counts as output: max_tokens, penalties) on prefill-1,
    or, with no other prefill worker, colocated on the decode worker; the client gets
    LLM.generate's tokens and text, with one retry and every block back in its pool."""
    ids = llm.tokenizer.encode(PROMPT)
    ref = llm.generate([ids], params)[0]

    async def run():
        dep = await deploy_in_process(spec(default_model_dir), n_prefill, 1,
                                      RouterConfig(block_size=16, prefill_policy="round_robin"))
        p0 = dep.prefill["prefill-0"]
        tasks: list[tuple[str, list[int]]] = []
        for wid, p in dep.prefill.items():
            real = p._prefill

            async def prefill(task, on_first, wid=wid, real=real):
                tasks.append((wid, list(task.resume_token_ids)))
                return await real(task, on_first)
            p._prefill = prefill
        sent_before_failure: list[int] = []

        async def gate(phase, key):
            if phase == "first_token":
                await asyncio.sleep(0.2)            # the early token reaches the client
                sent_before_failure.append(next(iter(dep.router.states.values())).tokens_sent)
                p0.exports[key][0].abort()          # the transfer fails after it
        p0.gate = gate
        try:
            out = await collect(dep.router, ids, params)
            return out, tasks, sent_before_failure, dict(dep.router.events), \
                await settled(dep), dep.router.ledger
        finally:
            await dep.stop()

    (toks, text, deltas), tasks, sent, events, used, ledger = asyncio.run(run())
    assert sent == [1]
    if n_prefill == 2:
        assert tasks == [("prefill-0", []), ("prefill-1", ref.token_ids[:1])]
    else:
        assert tasks == [("prefill-0", [])] and events["colocated"] == 1
    assert events["retries"] == 1
    assert toks == ref.token_ids and text == ref.text
    assert deltas[-1].usage.completion_tokens == len(ref.token_ids)
    assert used == [0] * (n_prefill + 1)
    assert ledger.counts["completed"] == 1 and ledger.lost() == 0 and ledger.double_finish == 0


def test_a_decode_worker_lost_after_only_the_first_token_resumes(default_model_dir, llm):
    """The tokens a client has are all P's: the request resumes on another decode
    worker instead of failing. (After a token from a decode step it fails, as before.)"""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ids = llm.tokenizer.encode(PROMPT)
    ref = llm.generate([ids], params)[0]

    async def run():
        dep = await deploy_in_process(spec(default_model_dir), 1, 2, RouterConfig(block_size=16))
        p = dep.prefill["prefill-0"]
        lost: list[str] = []

        async def gate(phase, key):
            if phase == "first_token" and not lost:
                await asyncio.sleep(0.2)           # the early token reaches the client
                st = next(iter(dep.router.states.values()))
                lost.append(st.decode_id)
                # what the router's poller does when a poll fails (it re-attaches later)
                asyncio.ensure_future(dep.router._decode_lost(st.decode_id,
                                                              RuntimeError("test: lost")))
        p.gate = gate
        try:
            out = await collect(dep.router, ids, params)
            return out, lost, dict(dep.router.events), dep.router.ledger
        finally:
            await dep.stop()

    (toks, text, _), lost, events, ledger = asyncio.run(run())
    assert len(lost) == 1 and events["decode_lost"] == 1 and events["retries"] == 1
    assert toks == ref.token_ids and text == ref.text
    assert ledger.counts["completed"] == 1 and ledger.lost() == 0


def test_a_reply_that_comes_after_the_request_ended_is_still_recorded(default_model_dir, llm):
    """D can finish a short request before P's reply reaches the router (the first token
    no longer waits for it): the reply is still taken, with the transfer's figures."""
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    ids = llm.tokenizer.encode(PROMPT)

    async def run():
        dep = await deploy_in_process(spec(default_model_dir), 1, 1, RouterConfig(block_size=16))
        r = dep.router
        waited: list[bool] = []

        async def gate(phase, key):
            if phase == "completed":        # D acknowledged; P's reply not sent yet
                waited.append(await until(lambda: r.ledger.counts["completed"] == 1))
        dep.prefill["prefill-0"].gate = gate
        try:
            toks, _, _ = await collect(r, ids, params)
            await until(lambda: r.ledger.history[-1].prefill_done_at is not None, 5.0)
            return toks, waited, r.ledger.history[-1], r.prefill["prefill-0"].view.inflight
        finally:
            await dep.stop()

    toks, waited, rec, inflight = asyncio.run(run())
    assert len(toks) == 2 and waited == [True]
    assert rec.prefill_done_at is not None and rec.transfer_seconds > 0
    assert inflight == 0


def test_a_prefill_worker_lost_after_the_hand_off_does_not_end_the_request(default_model_dir,
                                                                           llm):
    """P dies after D acknowledged Complete and started decoding, before P's reply reached
    the router (it no longer waits for it): D has everything, so the request completes
    with LLM.generate's tokens, with no retry and no error."""
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    ids = llm.tokenizer.encode(PROMPT)
    ref = llm.generate([ids], params)[0]

    async def run():
        dep = await deploy_in_process(spec(default_model_dir), 1, 1, RouterConfig(block_size=16))
        r = dep.router
        decoded: list[int] = []

        async def gate(phase, key):
            if phase == "completed":        # D acknowledged; P's reply not sent yet
                await until(lambda: any(s.tokens_sent >= 3 for s in r.states.values()))
                decoded.append(max(s.tokens_sent for s in r.states.values()))
                raise WorkerDied("test: the prefill actor died")     # as Ray reports it
        dep.prefill["prefill-0"].gate = gate
        try:
            out = await collect(r, ids, params)
            return out, decoded, dict(r.events), await settled(dep), r.ledger
        finally:
            await dep.stop()

    (toks, text, _), decoded, events, used, ledger = asyncio.run(run())
    assert decoded and decoded[0] >= 3           # D's own tokens reached the client first
    assert toks == ref.token_ids and text == ref.text
    assert events["retries"] == 0
    assert used == [0, 0]
    assert ledger.counts["completed"] == 1 and ledger.lost() == 0 and ledger.double_finish == 0
