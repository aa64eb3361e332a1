"""The P/D hand-off scripted step by step on real workers (local transport):
reserve → push → complete → decode → finish, and an abort at each step. After every
step the test reads both workers' block pools."""
from __future__ import annotations

import asyncio
import time

import pytest

from decode_worker.worker import DecodeWorker
from pdserve.protocol import sampling_params_to_proto
from pdserve.sampling.params import SamplingParams
from pdserve.v1 import generation_pb2, worker_pb2
from pdserve.worker_spec import WorkerSpec
from prefill_worker.worker import PrefillWorker

ROUTER = "router-test"
PHASES = ["reserved", "admitted", "first_token", "kv_sent", "completed", "decoding"]


@pytest.fixture(scope="module")
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def workers(default_model_dir, loop):
    base = dict(model=default_model_dir, dtype="float32", device="cpu", num_blocks=64,
                transport="local", lease_s=30.0)
    d = DecodeWorker(WorkerSpec(worker_id="decode-0", role="both", **base).to_json())
    p = PrefillWorker(WorkerSpec(worker_id="prefill-0", role="prefill", **base).to_json())
    loop.run_until_complete(d.start())
    loop.run_until_complete(p.start(local_receivers={d.kv_endpoint: d.receiver}))
    yield p, d
    loop.run_until_complete(p.stop())
    loop.run_until_complete(d.stop())


def in_use(w) -> int:
    return w.engine.pool.stats().in_use


def prompt(tok):
    return tok.encode("The history of the printing press begins with " * 4)


async def reserve(d, rid, attempt, ids, params):
    req = worker_pb2.ReserveRequest(request_id=rid, attempt_id=attempt, num_prompt_tokens=len(ids),
                                    prompt_token_ids=ids, sampling=sampling_params_to_proto(params),
                                    router_id=ROUTER)
    rep = worker_pb2.ReserveReply.FromString(await d.reserve(req.SerializeToString()))
    assert rep.code == worker_pb2.WORKER_ERROR_NONE, rep.error
    return rep.reservation


async def collect(d, rid, timeout=30.0):
    ids, finish = [], None
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while finish is None and loop.time() < end:
        batch = worker_pb2.DecodeOutputBatch.FromString(await d.poll(ROUTER, 0.5))
        for o in batch.outputs:
            if o.request_id == rid:
                ids.extend(o.token_ids)
                if o.finish_reason:
                    finish = o.finish_reason
    return ids, finish


async def settle(*ws, timeout=1.0):
    """Blocks back to zero on every worker within `timeout` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while any(in_use(w) for w in ws) and loop.time() < end:
        await asyncio.sleep(0.02)
    return [in_use(w) for w in ws]


def test_full_lifecycle_with_block_checks(workers, loop, default_model_dir):
    p, d = workers
    tok = p.engine.tokenizer
    ids = prompt(tok)
    nblocks = -(-len(ids) // 16)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    seen: dict[str, tuple[int, int]] = {}

    async def gate(phase, key):
        seen[phase] = (in_use(p), in_use(d))
    p.gate = gate

    async def run():
        res = await reserve(d, "r1", 1, ids, params)
        seen["reserved"] = (in_use(p), in_use(d))
        assert len(res.block_ids) == nblocks
        task = worker_pb2.PrefillTask(request_id="r1", attempt_id=1, prompt_token_ids=ids,
                                      sampling=sampling_params_to_proto(params), reservation=res)
        reply = worker_pb2.PrefillReply.FromString(await p.prefill(task.SerializeToString()))
        assert reply.code == worker_pb2.WORKER_ERROR_NONE, reply.error
        out, finish = await collect(d, "r1")
        return reply, out, finish

    try:
        reply, out, finish = loop.run_until_complete(run())
    finally:
        p.gate = None
    # reserve: D holds the prompt's blocks, P holds nothing yet.
    assert seen["reserved"] == (0, nblocks)
    # admitted into P's engine (blocks are taken at its first step).
    assert seen["admitted"][1] == nblocks
    # first token: P's KV went out layer by layer during the forward pass; P freed its blocks.
    assert seen["first_token"] == (0, nblocks)
    assert seen["kv_sent"] == (0, nblocks)
    assert seen["completed"][0] == 0 and seen["completed"][1] >= nblocks
    assert reply.record.num_chunks >= 30 and reply.record.kv_bytes > 0
    assert finish == generation_pb2.FINISH_REASON_LENGTH and len(out) == 8
    ref = LLMRef.get(default_model_dir).generate([ids], params)[0].token_ids
    assert out == ref
    assert loop.run_until_complete(settle(p, d)) == [0, 0]


class LLMRef:
    _llm = None

    @classmethod
    def get(cls, model_dir):
        if cls._llm is None:
            from pdserve import LLM
            cls._llm = LLM(model_dir, dtype="float32", device="cpu", num_blocks=64)
        return cls._llm


@pytest.mark.parametrize("phase", PHASES)
def test_abort_at_each_phase_frees_both_sides(workers, loop, phase):
    p, d = workers
    ids = prompt(p.engine.tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    rid = f"abort-{phase}"

    async def abort_both():
        await p.abort(rid, 1)
        await d.abort(rid, 1)

    async def gate(ph, key):
        if ph == phase:
            await abort_both()
    p.gate = gate

    async def run():
        res = await reserve(d, rid, 1, ids, params)
        if phase == "reserved":
            await abort_both()
        task = worker_pb2.PrefillTask(request_id=rid, attempt_id=1, prompt_token_ids=ids,
                                      sampling=sampling_params_to_proto(params), reservation=res)
        reply = worker_pb2.PrefillReply.FromString(await p.prefill(task.SerializeToString()))
        if phase == "decoding":
            assert reply.code == worker_pb2.WORKER_ERROR_NONE
            await asyncio.sleep(0.2)
            await abort_both()
        return reply

    try:
        reply = loop.run_until_complete(run())
    finally:
        p.gate = None
    if phase in ("reserved", "admitted", "first_token", "kv_sent"):
        assert reply.code != worker_pb2.WORKER_ERROR_NONE   # the attempt failed cleanly
    assert loop.run_until_complete(settle(p, d)) == [0, 0]
    assert len(d.table) == 0 and not d.res_ids
    # drain D's outbox for the next test
    loop.run_until_complete(d.poll(ROUTER, 0.05))


def test_whole_prompt_send_for_a_transport_that_is_not_layerwise(workers, loop, default_model_dir):
    """A transport with layerwise = False (ipc: a device copy) gets one send of every
    layer after the forward pass, and D decodes from it exactly as from per-layer chunks."""
    p, d = workers
    ids = prompt(p.engine.tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    sends: list[tuple[int, int]] = []
    real_open = p.transport.open

    def open_spy(*args, **kwargs):
        handle = real_open(*args, **kwargs)
        real_send = handle.send

        def send(start, end, kv):
            sends.append((start, end))
            return real_send(start, end, kv)
        handle.send = send
        return handle

    async def run():
        res = await reserve(d, "whole", 1, ids, params)
        task = worker_pb2.PrefillTask(request_id="whole", attempt_id=1, prompt_token_ids=ids,
                                      sampling=sampling_params_to_proto(params), reservation=res)
        reply = worker_pb2.PrefillReply.FromString(await p.prefill(task.SerializeToString()))
        assert reply.code == worker_pb2.WORKER_ERROR_NONE, reply.error
        return reply, await collect(d, "whole")

    p.set_layerwise(False)
    p.transport.open = open_spy
    try:
        reply, (out, finish) = loop.run_until_complete(run())
    finally:
        p.set_layerwise(True)
        p.transport.open = real_open
    layers = p.engine.model_config.num_hidden_layers
    assert sends == [(0, layers)]
    assert reply.record.num_chunks >= 1 and reply.record.kv_bytes > 0
    assert finish == generation_pb2.FINISH_REASON_LENGTH
    assert out == LLMRef.get(default_model_dir).generate([ids], params)[0].token_ids
    assert loop.run_until_complete(settle(p, d)) == [0, 0]


async def attach(p, rid, attempt, res):
    await p.attach_reservation(worker_pb2.AttachReservation(
        request_id=rid, attempt_id=attempt, reservation=res).SerializeToString())


def follows_task(rid, ids, params, deadline_ms=0):
    return worker_pb2.PrefillTask(request_id=rid, attempt_id=1, prompt_token_ids=ids,
                                  sampling=sampling_params_to_proto(params),
                                  reservation_follows=True, deadline_unix_ms=deadline_ms)


@pytest.mark.parametrize("when", ["after_first_token", "before_task"])
def test_a_reservation_that_follows_the_task(workers, loop, default_model_dir, when):
    """The router reserves on D while P already computes. Attached after P's forward pass
    (P kept the KV of every layer, and freed its own blocks), or before P even got the
    task: D decodes the reference tokens, and both pools settle."""
    p, d = workers
    ids = prompt(p.engine.tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    rid = f"follows-{when}"
    seen: dict[str, object] = {}

    async def gate(phase, key):
        if phase == "first_token" and when == "after_first_token":
            handle = p.exports[key][0]
            seen["kept"] = len(handle._kept)
            seen["blocks"] = (in_use(p), in_use(d))
            await attach(p, rid, 1, seen["res"])

    async def run():
        seen["res"] = await reserve(d, rid, 1, ids, params)
        if when == "before_task":
            await attach(p, rid, 1, seen["res"])
        reply = worker_pb2.PrefillReply.FromString(
            await p.prefill(follows_task(rid, ids, params).SerializeToString()))
        assert reply.code == worker_pb2.WORKER_ERROR_NONE, reply.error
        return reply, await collect(d, rid)

    p.gate = gate
    try:
        reply, (out, finish) = loop.run_until_complete(run())
    finally:
        p.gate = None
    if when == "after_first_token":
        assert seen["kept"] == p.engine.model_config.num_hidden_layers   # one send a layer
        assert seen["blocks"] == (0, -(-len(ids) // 16))
    assert reply.record.reservation_id == seen["res"].reservation_id
    assert finish == generation_pb2.FINISH_REASON_LENGTH
    assert out == LLMRef.get(default_model_dir).generate([ids], params)[0].token_ids
    assert loop.run_until_complete(settle(p, d)) == [0, 0]
    assert not p.exports and not p._early_res and len(d.table) == 0


@pytest.mark.parametrize("case", ["never_comes", "incompatible"])
def test_a_reservation_that_never_comes_or_cannot_be_used(workers, loop, case):
    p, d = workers
    ids = prompt(p.engine.tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    rid = f"follows-{case}"

    async def run():
        res = None
        if case == "incompatible":
            res = await reserve(d, rid, 1, ids, params)
            bad = worker_pb2.Reservation()
            bad.CopyFrom(res)
            bad.compat_hash ^= 1
            await attach(p, rid, 1, bad)
        deadline = int((time.time() + 1.0) * 1000)
        t0 = time.monotonic()
        reply = worker_pb2.PrefillReply.FromString(
            await p.prefill(follows_task(rid, ids, params, deadline).SerializeToString()))
        if res is not None:
            await d.abort(rid, 1)      # what the router does with a failed attempt
        return reply, time.monotonic() - t0

    reply, took = loop.run_until_complete(run())
    assert reply.code == worker_pb2.WORKER_ERROR_TRANSFER
    assert ("no reservation" if case == "never_comes" else "incompatible") in reply.error
    assert took < 5.0
    assert loop.run_until_complete(settle(p, d)) == [0, 0]
    assert not p.exports and not p._early_res and len(d.table) == 0
    loop.run_until_complete(d.poll(ROUTER, 0.05))


def test_an_abort_that_overtakes_its_task_is_not_computed(workers, loop):
    """The router's abort and the task are separate calls: an abort that arrives first
    makes the task a no-op (CANCELLED), so P never computes an attempt already ended."""
    p, d = workers
    ids = prompt(p.engine.tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    async def run():
        await p.abort("overtaken", 1)
        reply = worker_pb2.PrefillReply.FromString(
            await p.prefill(follows_task("overtaken", ids, params).SerializeToString()))
        return reply, p.engine.stats()["num_running"] + p.engine.stats()["num_waiting"]

    reply, queued = loop.run_until_complete(run())
    assert reply.code == worker_pb2.WORKER_ERROR_CANCELLED
    assert queued == 0 and not p.exports and in_use(p) == 0
