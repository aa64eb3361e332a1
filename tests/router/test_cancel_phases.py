"""Cancellation at each phase of a disaggregated request, 100 times each: the client
cancels while queued, during prefill, during the KV transfer, and while decoding. Each
time both workers' blocks are back within 1 s and the ledger has one `cancelled`."""
from __future__ import annotations

import asyncio

import pytest

from pdserve import SamplingParams
from pdserve.cluster import deploy_in_process
from pdserve.worker_spec import WorkerSpec
from router.core import GenerateInput, RouterConfig

N = 100
PARAMS = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)


async def _settled(dep, timeout=1.0) -> bool:
    workers = [*dep.prefill.values(), *dep.decode.values()]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if (not any(w.engine.pool.stats().in_use for w in workers)
                and all(len(w.table) == 0 for w in dep.decode.values())
                and all(not w.exports for w in dep.prefill.values())):
            return True
        await asyncio.sleep(0.01)
    return False


async def _one(dep, ids, phase: str) -> None:
    reached = asyncio.Event()
    p = next(iter(dep.prefill.values()))

    async def gate(ph, key):
        if ph == phase:
            reached.set()
            await asyncio.sleep(3600)     # hold here until cancelled
    p.gate = gate if phase in ("admitted", "first_token", "kv_sent") else None

    async def consume():
        async for d in dep.router.generate(GenerateInput(list(ids), PARAMS)):
            if d.token_ids:
                reached.set()
    task = asyncio.create_task(consume())
    if phase == "queued":
        await asyncio.sleep(0)            # admitted, dispatch just started
    else:
        await asyncio.wait_for(reached.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    p.gate = None


@pytest.mark.parametrize("phase", ["queued", "admitted", "first_token", "kv_sent", "decoding"])
def test_cancel_at_phase_100_times(default_model_dir, phase):
    base = WorkerSpec(worker_id="base", role="both", model=default_model_dir, dtype="float32",
                      device="cpu", num_blocks=128, transport="local")

    async def run():
        dep = await deploy_in_process(base, 1, 1, RouterConfig(block_size=16))
        try:
            ids = dep.decode["decode-0"].engine.tokenizer.encode("Cancel me, please. " * 6)
            for i in range(N):
                await _one(dep, ids, phase)
                assert await _settled(dep), f"blocks not freed within 1 s (iteration {i})"
            return dict(dep.router.ledger.counts), dep.router.ledger.lost(), dep.router.ledger.double_finish
        finally:
            await dep.stop()

    counts, lost, double = asyncio.run(run())
    assert counts["cancelled"] == N and lost == 0 and double == 0
