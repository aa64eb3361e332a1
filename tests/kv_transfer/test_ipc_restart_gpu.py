"""ipc on a real Ray cluster, one GPU: a decode worker that Ray restarts after a kill (a
new process with a new KV cache, under the same actor name) gets its KV through its new
cache. The prefill worker had the dead worker's cache open; copying into it would leave
the restarted worker decoding from blocks nobody wrote. Greedy outputs after the restart
must equal those before it, every request going through the prefill worker."""
from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.timeout(600)
def test_a_restarted_decode_worker_is_served_through_its_new_cache(tiny_llama_dir: str) -> None:
    ray = pytest.importorskip("ray")
    from pdserve.cluster import deploy_ray, init_ray
    from pdserve.sampling.params import SamplingParams
    from pdserve.worker_spec import WorkerSpec
    from router.core import GenerateInput, RouterConfig

    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)   # actors import the repo
    init_ray(num_cpus=4, num_gpus=1, include_dashboard=False, ignore_reinit_error=True,
             logging_level="WARNING")
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 290) for _ in range(n)] for n in (40, 75, 130)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    base = WorkerSpec(worker_id="", role="both", model=tiny_llama_dir, dtype="bfloat16",
                      device="cuda", kv_cache_gb=0.5, enable_prefix_caching=False,
                      max_num_seqs=8, max_num_batched_tokens=512, max_model_len=512,
                      transport="ipc")

    async def run() -> tuple[list[list[int]], list[list[int]], dict]:
        dep = await deploy_ray(base, 1, 1, RouterConfig(transport="ipc", lease_ms=10_000,
                                                        max_model_len=512),
                               cpus_per_worker=1, gpus_per_worker=0.5)
        router = dep.router

        async def generate(ids: list[int]) -> list[int]:
            out: list[int] = []
            async for d in router.generate(GenerateInput(list(ids), params)):
                out += d.token_ids
            return out
        try:
            before = [await generate(p) for p in prompts]
            (wid, actor), = dep.decode.items()
            pid = router.decode[wid].info.pid
            ray.kill(actor, no_restart=False)
            end = time.monotonic() + 180
            while not (router.decode[wid].view.healthy and router.decode[wid].info.pid != pid):
                assert time.monotonic() < end, "the decode worker did not come back"
                await asyncio.sleep(0.5)
            after = [await generate(p) for p in prompts]
            return before, after, dict(router.events)
        finally:
            await dep.stop()
            for a in [*dep.prefill.values(), *dep.decode.values()]:
                ray.kill(a, no_restart=True)

    try:
        before, after, events = asyncio.run(run())
    finally:
        ray.shutdown()
    assert all(len(t) == params.max_tokens for t in before)
    assert after == before
    # every request was prefilled on P and its KV copied over ipc, none fell back
    assert events["disaggregated"] == 2 * len(prompts) and events["colocated"] == 0
    assert events["retries"] == 0
