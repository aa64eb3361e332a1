"""Each KV fault class, injected deterministically on real workers (in-process, grpc
transport), with the count of injected faults checked: the router re-prefills on the
other prefill worker, the client sees the reference output, and both pools settle."""
from __future__ import annotations

import asyncio

import pytest

from kv_transfer.faults import FaultPlan
from pdserve import LLM, SamplingParams
from pdserve.cluster import deploy_in_process
from pdserve.worker_spec import WorkerSpec
from router.core import GenerateInput, RouterConfig

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

# fault -> (plan on the worker it targets, worker id, does the first attempt fail?)
CASES = {
    "reset": (FaultPlan(kind="reset", pattern=[1]), "prefill-0", True),
    "drop": (FaultPlan(kind="drop", pattern=[1]), "prefill-0", True),
    "stall": (FaultPlan(kind="stall", pattern=[1], stall_s=5.0), "prefill-0", True),
    "delay": (FaultPlan(kind="delay", pattern=[1], delay_ms=50), "prefill-0", False),
    "corrupt": (FaultPlan(kind="corrupt", pattern=[1]), "decode-0", True),
    "duplicate": (FaultPlan(kind="duplicate", pattern=[1]), "decode-0", True),
    "late_complete": (FaultPlan(kind="late_complete", pattern=[1]), "decode-0", False),
}


@pytest.fixture(scope="module")
def reference(default_model_dir):
    llm = LLM(default_model_dir, dtype="float32", device="cpu", num_blocks=64)
    ids = llm.tokenizer.encode("Disaggregated serving moves the KV cache between workers " * 3)
    return ids, llm.generate([ids], PARAMS)[0].token_ids


@pytest.mark.parametrize("fault", sorted(CASES))
def test_fault_is_detected_and_recovered(fault, default_model_dir, reference):
    plan, target, fails = CASES[fault]
    ids, ref = reference
    base = WorkerSpec(worker_id="base", role="both", model=default_model_dir, dtype="float32",
                      device="cpu", num_blocks=64, transport="grpc", transfer_timeout_s=2.0)

    async def run():
        dep = await deploy_in_process(
            base, 2, 1, RouterConfig(prefill_policy="round_robin", block_size=16),
            faults={target: plan.to_json()})
        try:
            got = []
            async for d in dep.router.generate(GenerateInput(list(ids), PARAMS)):
                got.extend(d.token_ids)
            worker = {**dep.prefill, **dep.decode}[target]
            injected = (await worker.stats())["faults_injected"]
            loop = asyncio.get_running_loop()
            end = loop.time() + 3.0
            while loop.time() < end:
                used = [w.engine.pool.stats().in_use for w in [*dep.prefill.values(), *dep.decode.values()]]
                if not any(used):
                    break
                await asyncio.sleep(0.05)
            return got, injected, dict(dep.router.events), used, dep.router.ledger
        finally:
            await dep.stop()

    got, injected, events, used, ledger = asyncio.run(run())
    assert injected[fault] == 1, injected          # the fault really happened
    assert got == ref                             # never a wrong completed output
    assert events["retries"] == (1 if fails else 0), events
    assert used == [0, 0, 0]                       # every block back in its pool
    assert ledger.counts["completed"] == 1 and ledger.lost() == 0 and ledger.double_finish == 0
