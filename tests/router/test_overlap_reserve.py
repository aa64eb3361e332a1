"""The router reserves on D while P already computes (RouterConfig.overlap_reserve): the
task goes out with reservation_follows and the reservation follows it. Real workers in
one process (local transport, the default model on CPU)."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from pdserve import SamplingParams
from pdserve.cluster import deploy_in_process
from pdserve.v1 import worker_pb2
from pdserve.worker_spec import WorkerSpec
from router.core import GenerateInput, RequestFailed, RouterConfig

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def spec(model_dir: str) -> WorkerSpec:
    return WorkerSpec(worker_id="base", role="both", model=model_dir, dtype="float32",
                      device="cpu", num_blocks=64, transport="local")


def spy_tasks(p) -> list[bool]:
    """Records reservation_follows of every task the prefill worker gets."""
    seen: list[bool] = []
    real = p._prefill

    async def prefill(task: worker_pb2.PrefillTask, on_first) -> bytes:
        seen.append(task.reservation_follows)
        return await real(task, on_first)
    p._prefill = prefill
    return seen


async def idle(dep, timeout: float = 3.0) -> list[int]:
    workers = [*dep.prefill.values(), *dep.decode.values()]
    end = asyncio.get_running_loop().time() + timeout
    while True:
        used = [w.engine.pool.stats().in_use for w in workers]
        if not any(used) or asyncio.get_running_loop().time() > end:
            return used
        await asyncio.sleep(0.05)


def test_overlapped_and_serial_reserve_give_the_same_tokens(default_model_dir):
    async def run():
        dep = await deploy_in_process(spec(default_model_dir), 1, 1,
                                      RouterConfig(block_size=16, disagg_threshold=0))
        try:
            tok = dep.prefill["prefill-0"].engine.tokenizer
            prompts = [tok.encode(f"Request {i}: the KV cache moves between workers " * (i + 1))
                       for i in range(3)]
            seen = spy_tasks(dep.prefill["prefill-0"])

            async def one(ids):
                got = []
                async for d in dep.router.generate(GenerateInput(list(ids), PARAMS)):
                    got.extend(d.token_ids)
                return got
            overlapped = await asyncio.gather(*[one(ids) for ids in prompts])
            follows_on = list(seen)
            seen.clear()
            dep.router.config = replace(dep.router.config, overlap_reserve=False)
            serial = await asyncio.gather(*[one(ids) for ids in prompts])
            return overlapped, serial, follows_on, list(seen), await idle(dep), dep.router.ledger
        finally:
            await dep.stop()

    overlapped, serial, follows_on, follows_off, used, ledger = asyncio.run(run())
    assert follows_on == [True] * 3 and follows_off == [False] * 3
    assert overlapped == serial and all(len(t) == 6 for t in overlapped)
    assert used == [0, 0]
    assert ledger.counts["completed"] == 6 and ledger.lost() == 0


@pytest.mark.timeout(120)
def test_a_reserve_that_fails_while_prefill_computes_frees_everything(default_model_dir):
    """D refuses every reservation (draining) while P has already computed: the request
    ends with one 'exhausted' error, and P drops the KV it kept for D."""
    async def run():
        dep = await deploy_in_process(spec(default_model_dir), 1, 1,
                                      RouterConfig(block_size=16, reserve_wait_s=0.5))
        try:
            p, d = dep.prefill["prefill-0"], dep.decode["decode-0"]
            seen = spy_tasks(p)
            d.draining = True
            ids = p.engine.tokenizer.encode("A prompt whose reservation never comes " * 4)
            with pytest.raises(RequestFailed) as e:
                async for _ in dep.router.generate(GenerateInput(ids, PARAMS)):
                    pass
            loop = asyncio.get_running_loop()
            end = loop.time() + 3.0
            while (p.exports or (await p.stats())["num_running"]) and loop.time() < end:
                await asyncio.sleep(0.05)
            return e.value.kind, seen, dict(p.exports), len(d.table), await idle(dep), dep.router.ledger
        finally:
            await dep.stop()

    kind, seen, exports, reservations, used, ledger = asyncio.run(run())
    assert seen == [True]               # P got the task before D answered
    assert kind == "exhausted"
    assert exports == {} and reservations == 0 and used == [0, 0]
    assert ledger.counts["error"] == 1 and ledger.lost() == 0 and ledger.double_finish == 0


@pytest.mark.timeout(120)
def test_a_draining_decode_worker_gets_no_new_work(default_model_dir):
    """decode-0 drains (its drain() actor method): new requests go to decode-1 and
    complete, instead of asking decode-0 again until the capacity wait runs out."""
    async def run():
        dep = await deploy_in_process(spec(default_model_dir), 1, 2,
                                      RouterConfig(block_size=16, reserve_wait_s=2.0))
        try:
            await dep.decode["decode-0"].drain()
            ids = dep.prefill["prefill-0"].engine.tokenizer.encode("Route me elsewhere " * 4)
            got = []
            for _ in range(3):
                toks = []
                async for d in dep.router.generate(GenerateInput(list(ids), PARAMS)):
                    toks.extend(d.token_ids)
                got.append(toks)
            workers = [r.workers for r in dep.router.ledger.history]
            return got, workers, dep.router.ledger, await idle(dep)
        finally:
            await dep.stop()

    got, workers, ledger, used = asyncio.run(run())
    assert all(len(t) == 6 for t in got) and got[0] == got[1] == got[2]
    assert all("decode-0" not in w for w in workers), workers
    assert ledger.counts["completed"] == 3 and ledger.counts["error"] == 0
    assert used == [0, 0, 0]
