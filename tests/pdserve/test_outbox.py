"""Outbox.take: the long poll a router's poller task sits in. Cancelling that task must
always work, even when an output arrives in the same loop iteration (on Python 3.11,
asyncio.wait_for drops such a cancellation, and the router's shutdown then hangs)."""
from __future__ import annotations

import asyncio

import pytest

from pdserve.outputs import Outbox
from pdserve.v1 import worker_pb2


@pytest.mark.parametrize("spins", [0, 1, 2, 3])
def test_cancel_is_never_swallowed_when_an_output_arrives(spins):
    async def run():
        box = Outbox()
        task = asyncio.create_task(box.take(5.0))
        await asyncio.sleep(0)                 # the task now waits on the event
        box.put(worker_pb2.DecodeOutput(request_id="r"))
        for _ in range(spins):                 # let the wake-up progress a little
            await asyncio.sleep(0)
        if not task.cancel():                  # already returned its batch: nothing lost
            assert [o.request_id for o in task.result()] == ["r"]
            return
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(run())


def test_take_returns_batched_items_or_empty_after_timeout():
    async def run():
        box = Outbox()
        assert await box.take(0.05) == []
        box.put(worker_pb2.DecodeOutput(request_id="a"))
        box.put(worker_pb2.DecodeOutput(request_id="b"))
        assert [o.request_id for o in await box.take(1.0)] == ["a", "b"]
    asyncio.run(run())
