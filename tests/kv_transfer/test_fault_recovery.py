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
from router.core import GenerateInput, RequestFailed, RouterConfig

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
            return got, injected, dict(dep.router.events), await _settled(dep), dep.router.ledger
        finally:
            await dep.stop()

    got, injected, events, used, ledger = asyncio.run(run())
    assert injected[fault] == 1, injected          # the fault really happened
    assert got == ref                             # never a wrong completed output
    assert events["retries"] == (1 if fails else 0), events
    assert used == [0, 0, 0]                       # every block back in its pool
    assert ledger.counts["completed"] == 1 and ledger.lost() == 0 and ledger.double_finish == 0


@pytest.mark.parametrize("last_resort", [True, False])
def test_two_failed_prefills_end_colocated(last_resort, default_model_dir, reference):
    """Both prefill workers reset their transfer: the third attempt prefills on the decode
    worker itself and completes with the reference output; without the last resort the
    request ends with one 'unavailable' error. Either way every block is back."""
    ids, ref = reference
    base = WorkerSpec(worker_id="base", role="both", model=default_model_dir, dtype="float32",
                      device="cpu", num_blocks=64, transport="grpc", transfer_timeout_s=2.0)
    reset = FaultPlan(kind="reset", pattern=[1]).to_json()

    async def run():
        dep = await deploy_in_process(
            base, 2, 1, RouterConfig(prefill_policy="round_robin", block_size=16,
                                     colocated_last_resort=last_resort),
            faults={"prefill-0": reset, "prefill-1": reset})
        got, error = [], None
        try:
            try:
                async for d in dep.router.generate(GenerateInput(list(ids), PARAMS)):
                    got.extend(d.token_ids)
            except RequestFailed as e:
                error = e.kind
            injected = [(await p.stats())["faults_injected"]["reset"] for p in dep.prefill.values()]
            workers = dep.router.ledger.history[-1].workers
            return got, error, injected, workers, dict(dep.router.events), await _settled(dep), dep.router.ledger
        finally:
            await dep.stop()

    got, error, injected, workers, events, used, ledger = asyncio.run(run())
    assert injected == [1, 1]
    assert used == [0, 0, 0]
    assert ledger.lost() == 0 and ledger.double_finish == 0
    if last_resort:
        assert error is None and got == ref
        assert events["retries"] == 2 and events["last_resort"] == 1 and events["colocated"] == 1
        # P0 (reset) with its reservation on D, P1 (reset) likewise, then D alone
        assert workers == ["prefill-0", "decode-0", "prefill-1", "decode-0", "decode-0"], workers
        assert ledger.counts["completed"] == 1
    else:
        # each prefill worker streamed the token it sampled before its hand-off failed
        assert error == "unavailable" and got == ref[:2]
        assert events["retries"] == 1 and events["last_resort"] == 0 and events["colocated"] == 0
        assert ledger.counts["error"] == 1


async def _settled(dep, within_s: float = 3.0) -> list[int]:
    """Blocks in use on every worker, once they are all back or within_s has passed."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within_s
    while True:
        used = [w.engine.pool.stats().in_use for w in [*dep.prefill.values(), *dep.decode.values()]]
        if not any(used) or loop.time() >= end:
            return used
        await asyncio.sleep(0.05)
