"""Typed clients for the workers' control methods: one class for Ray actor handles,
the same interface for in-process workers (tests, single-process mode).

Every method takes and returns protobuf bytes (or plain ids): nothing but bytes and
strings crosses a process boundary."""
from __future__ import annotations

from typing import Any, AsyncIterator


class WorkerDied(RuntimeError):
    """The worker process is gone (Ray ActorDiedError / unavailable)."""


def _is_death(e: BaseException) -> bool:
    try:
        import ray.exceptions as rx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, (rx.RayActorError, rx.ActorUnavailableError, rx.ActorDiedError))


class WorkerClient:
    def __init__(self, target: Any, is_ray: bool) -> None:
        self.target = target
        self.is_ray = is_ray

    async def _call(self, method: Any, *args: Any) -> Any:
        try:
            if self.is_ray:
                return await method.remote(*args)
            return await method(*args)
        except Exception as e:
            if _is_death(e):
                raise WorkerDied(str(e)) from e
            raise

    async def start(self) -> bytes:
        return await self._call(self.target.start)

    async def load(self) -> bytes:
        return await self._call(self.target.load)

    async def stats(self) -> dict:
        return await self._call(self.target.stats)

    async def abort(self, request_id: str, attempt_id: int) -> None:
        await self._call(self.target.abort, request_id, attempt_id)

    async def drain(self) -> None:
        await self._call(self.target.drain)


class DecodeClient(WorkerClient):
    async def reserve(self, data: bytes) -> bytes:
        return await self._call(self.target.reserve, data)

    async def submit(self, data: bytes) -> bytes:
        return await self._call(self.target.submit, data)

    async def renew(self, keys: list[str], lease_s: float) -> int:
        return await self._call(self.target.renew, keys, lease_s)

    async def poll(self, router_id: str, timeout_s: float) -> bytes:
        return await self._call(self.target.poll, router_id, timeout_s)


class PrefillClient(WorkerClient):
    async def prefill(self, data: bytes) -> bytes:
        return await self._call(self.target.prefill, data)

    async def prefill_stream(self, data: bytes) -> AsyncIterator[bytes]:
        """The worker's prefill_stream: an early message with the first token, then the
        reply (a Ray streaming generator call for an actor)."""
        try:
            if self.is_ray:
                gen = self.target.prefill_stream.options(num_returns="streaming").remote(data)
                async for ref in gen:
                    yield await ref
            else:
                async for item in self.target.prefill_stream(data):
                    yield item
        except Exception as e:
            if _is_death(e):
                raise WorkerDied(str(e)) from e
            raise

    async def attach_reservation(self, data: bytes) -> None:
        await self._call(self.target.attach_reservation, data)
