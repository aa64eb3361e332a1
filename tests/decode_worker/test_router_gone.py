"""A router that stops polling its decode worker (hung, or its process gone) leaves
nothing there: within router_gone_s (+ one reaper period) D ends its decoding requests
and its reservations whose KV never came, and every block is back in the pool, while a
router that keeps polling keeps its request. Real decode worker, the default model."""
from __future__ import annotations

import asyncio
import time

from decode_worker.worker import DecodeWorker
from pdserve.protocol import sampling_params_to_proto
from pdserve.sampling.params import SamplingParams
from pdserve.v1 import worker_pb2
from pdserve.worker_spec import WorkerSpec

GONE_S = 1.0
PARAMS = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)


def active(stats: dict) -> int:
    return int(stats["num_running"] + stats["num_waiting"])


def test_a_router_that_stops_polling_leaves_nothing_on_the_decode_worker(default_model_dir):
    spec = WorkerSpec(worker_id="decode-0", role="both", model=default_model_dir,
                      dtype="float32", device="cpu", num_blocks=256, transport="local",
                      lease_s=60.0, router_gone_s=GONE_S)
    sampling = sampling_params_to_proto(PARAMS)

    async def run():
        d = DecodeWorker(spec.to_json())
        await d.start()
        try:
            ids = d.engine.tokenizer.encode("A request whose router went away " * 3)
            for router, rid in (("router-gone", "req-a"), ("router-alive", "req-b")):
                rep = worker_pb2.SubmitReply.FromString(await d.submit(worker_pb2.SubmitRequest(
                    request_id=rid, attempt_id=1, prompt_token_ids=ids, sampling=sampling,
                    router_id=router).SerializeToString()))
                assert rep.code == worker_pb2.WORKER_ERROR_NONE, rep.error
            # a reservation of the gone router whose KV never comes (lease: 60 s)
            rep = worker_pb2.ReserveReply.FromString(await d.reserve(worker_pb2.ReserveRequest(
                request_id="req-c", attempt_id=2, num_prompt_tokens=len(ids),
                prompt_token_ids=ids, sampling=sampling, router_id="router-gone",
                lease_ms=60_000).SerializeToString()))
            assert rep.code == worker_pb2.WORKER_ERROR_NONE, rep.error
            await d.poll("router-gone", timeout_s=0.2)       # its last poll
            t_last = time.monotonic()
            before = dict(await d.stats())
            alive_tokens = 0
            ended_after = None
            while time.monotonic() - t_last < GONE_S + 5.0:
                out = worker_pb2.DecodeOutputBatch.FromString(await d.poll("router-alive", timeout_s=0.2))
                alive_tokens += sum(len(o.token_ids) for o in out.outputs)
                st = await d.stats()
                if active(st) == 1 and st["reservations"] == 0:
                    ended_after = time.monotonic() - t_last
                    break
            after = dict(await d.stats())
            routes = sorted(d.routes)
            await d.abort("req-b", 1)
            loop = asyncio.get_running_loop()
            end = loop.time() + 3.0
            while d.engine.pool.stats().in_use and loop.time() < end:
                await asyncio.sleep(0.05)
            return before, after, ended_after, routes, alive_tokens, d.engine.pool.stats()
        finally:
            await d.stop()

    before, after, ended_after, routes, alive_tokens, pool = asyncio.run(run())
    assert active(before) == 2 and before["reservations"] == 1
    assert ended_after is not None and GONE_S <= ended_after <= GONE_S + 2.0, ended_after
    assert after["reservations"] == 0 and active(after) == 1
    assert routes == ["req-b/1"]            # only the polling router's request is left
    assert alive_tokens > 0                 # and it kept decoding meanwhile
    assert pool.in_use == 0 and pool.free + pool.cached == pool.total
