"""Re-attaching restarted workers: a prefill worker that comes back but cannot finish its
start() (an nccl worker cannot rejoin its process group) stays out of rotation, is tried
again, and never freezes the load refresh of the other workers; a worker's start() never
reports it started while its first start is still running.

The router runs against stand-in workers (the same methods, protobuf bytes in and out),
so the timing is the router's own."""
from __future__ import annotations

import asyncio
import time
from typing import Callable

import pytest

from pdserve.v1 import worker_pb2
from router.clients import DecodeClient, PrefillClient
from router.core import Router, RouterConfig


class StandIn:
    """A worker's control methods. `dead`: load() fails as for a killed process;
    `start_gate`: start() waits on it, as a start that cannot finish."""

    def __init__(self, worker_id: str, role: int) -> None:
        self.worker_id, self.role = worker_id, role
        self.dead = False
        self.start_gate: asyncio.Event | None = None
        self.starts = self.loads = 0

    async def start(self) -> bytes:
        self.starts += 1
        if self.start_gate is not None:
            await self.start_gate.wait()
        return worker_pb2.WorkerInfo(worker_id=self.worker_id, role=self.role).SerializeToString()

    async def load(self) -> bytes:
        if self.dead:
            raise RuntimeError("actor died")
        self.loads += 1
        return worker_pb2.WorkerLoad(worker_id=self.worker_id, role=self.role,
                                     kv_blocks_free=self.loads,
                                     kv_blocks_total=1 << 20).SerializeToString()

    async def poll(self, router_id: str, timeout_s: float) -> bytes:
        await asyncio.sleep(timeout_s)
        return worker_pb2.DecodeOutputBatch().SerializeToString()

    async def renew(self, keys: list[str], lease_s: float) -> int:
        return 0


async def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.01)


def test_a_prefill_worker_that_cannot_start_stays_out_and_loads_keep_flowing() -> None:
    async def scenario() -> None:
        p = StandIn("prefill-0", worker_pb2.ROLE_PREFILL)
        d = StandIn("decode-0", worker_pb2.ROLE_DECODE)
        router = Router(RouterConfig(load_interval_s=0.02, reattach_timeout_s=0.2),
                        {"prefill-0": PrefillClient(p, is_ray=False)},
                        {"decode-0": DecodeClient(d, is_ray=False)})
        await router.start()
        pv, dv = router.prefill["prefill-0"].view, router.decode["decode-0"].view
        try:
            assert pv.healthy
            p.dead = True                                  # P's process dies
            await _until(lambda: not pv.healthy)
            p.dead, p.start_gate = False, asyncio.Event()  # back, but cannot finish start()
            starts, free = p.starts, dv.kv_blocks_free
            await asyncio.sleep(1.0)
            assert dv.kv_blocks_free > free + 10, "D's loads stopped refreshing"
            assert not pv.healthy, "a worker that is not started was put back in rotation"
            assert p.starts >= starts + 2, "the re-attach was not bounded and tried again"
            p.start_gate.set()                             # its start can finish now
            await _until(lambda: pv.healthy)
        finally:
            await router.stop()
    asyncio.run(scenario())


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_start_waits_for_a_start_in_progress(role: str, default_model_dir: str) -> None:
    from decode_worker.worker import DecodeWorker
    from prefill_worker.worker import PrefillWorker
    from pdserve.worker_spec import WorkerSpec
    spec = WorkerSpec(worker_id=f"{role}-0", role="prefill" if role == "prefill" else "both",
                      model=default_model_dir, dtype="float32", device="cpu", num_blocks=64,
                      transport="grpc", host="127.0.0.1")
    worker = (PrefillWorker if role == "prefill" else DecodeWorker)(spec.to_json())

    async def scenario() -> None:
        gate = asyncio.Event()
        real = worker._start

        async def slow_start(*args) -> None:   # type: ignore[no-untyped-def]
            await gate.wait()
            await real(*args)
        worker._start = slow_start
        first = asyncio.ensure_future(worker.start())
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(worker.start())
        await asyncio.sleep(0.2)
        assert not first.done() and not second.done(), "start() returned before the worker started"
        gate.set()
        a, b = await asyncio.wait_for(asyncio.gather(first, second), 30)
        assert worker_pb2.WorkerInfo.FromString(a).worker_id == f"{role}-0" and a == b
        assert worker_pb2.WorkerInfo.FromString(await worker.start()).worker_id == f"{role}-0"
        await worker.stop()
    asyncio.run(scenario())
