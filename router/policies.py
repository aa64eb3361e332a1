"""Routing policies: which prefill worker runs a prompt, which decode worker holds it.

    prefill: round_robin   — next healthy worker in turn
             least_loaded  — fewest queued + running prompts (ties: fewest in flight here)
             prefix_aware  — rendezvous hash of the prompt's first full blocks, so prompts
                             sharing a prefix land where it is cached; falls back to
                             least_loaded when that worker is much busier than the least
                             loaded one (load gap > PREFIX_SLACK requests)
    decode:  kv_free       — most free KV blocks (after this router's pending reservations),
                             then fewest running
A policy sees worker views, never requests' state or tensors.
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

PREFIX_SLACK = 4
PREFIX_BLOCKS = 4          # how many leading blocks define a prompt's "prefix"


@dataclass
class WorkerView:
    worker_id: str
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_free: int = 0
    kv_blocks_total: int = 0
    inflight: int = 0          # this router's requests currently on the worker
    healthy: bool = True
    draining: bool = False     # refuses new work; its requests in flight go on

    @property
    def queue(self) -> int:
        return self.num_running + self.num_waiting + self.inflight


class RoundRobin:
    def __init__(self) -> None:
        self._n = itertools.count()

    def pick(self, workers: Sequence[WorkerView], prompt: Sequence[int]) -> WorkerView:
        return workers[next(self._n) % len(workers)]


class LeastLoaded:
    def pick(self, workers: Sequence[WorkerView], prompt: Sequence[int]) -> WorkerView:
        return min(workers, key=lambda w: (w.queue, w.inflight))


class PrefixAware:
    def __init__(self, block_size: int = 16) -> None:
        self.block_size = block_size
        self._fallback = LeastLoaded()

    def pick(self, workers: Sequence[WorkerView], prompt: Sequence[int]) -> WorkerView:
        n = min(len(prompt) // self.block_size, PREFIX_BLOCKS) * self.block_size
        if n == 0:
            return self._fallback.pick(workers, prompt)
        key = b"".join(int(t).to_bytes(4, "little") for t in prompt[:n])
        best = max(workers, key=lambda w: _score(key, w.worker_id))
        least = self._fallback.pick(workers, prompt)
        return best if best.queue - least.queue <= PREFIX_SLACK else least


class KVFree:
    def pick(self, workers: Sequence[WorkerView], prompt: Sequence[int]) -> WorkerView:
        return max(workers, key=lambda w: (w.kv_blocks_free, -w.queue))


def _score(key: bytes, worker_id: str) -> int:
    h = hashlib.blake2b(key + worker_id.encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


PREFILL_POLICIES: dict[str, Callable[..., object]] = {
    "round_robin": RoundRobin, "least_loaded": LeastLoaded, "prefix_aware": PrefixAware}
DECODE_POLICIES: dict[str, Callable[..., object]] = {"kv_free": KVFree}


def make_prefill_policy(name: str, block_size: int):
    if name not in PREFILL_POLICIES:
        raise ValueError(f"unknown prefill policy {name!r}; choose {sorted(PREFILL_POLICIES)}")
    return PrefixAware(block_size) if name == "prefix_aware" else PREFILL_POLICIES[name]()


def make_decode_policy(name: str):
    if name not in DECODE_POLICIES:
        raise ValueError(f"unknown decode policy {name!r}; choose {sorted(DECODE_POLICIES)}")
    return DECODE_POLICIES[name]()
