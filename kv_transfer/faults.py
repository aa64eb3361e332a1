"""Fault injection for KV transfers: the rig behind the reliability tests and drills.

Two wrappers, one plan:

    P side  FaultyTransport(inner, plan)   wraps any KVTransport's send handles:
            reset  (the attempt fails: finish() raises, as after a connection reset)
            delay  (sleep `delay_ms` before each send and before finish)
            stall  (finish() blocks for `stall_s`, then times out: a hung transfer)
            drop   (one send() of the attempt silently never leaves: D sees a hole)
    D side  FaultyReceiver(inner, plan)    wraps the KVReceiver (bytes as they arrive):
            corrupt   (flip one bit of a chunk's payload after P computed its crc)
            duplicate (deliver a chunk twice, as a retransmission would)
            late_complete (deliver each completion record twice)

Each fault fires by a seeded probability per attempt or on a fixed pattern of attempt
numbers, and every firing is counted in `plan.injected[kind]`, so a test can assert
that the fault really happened. Plans travel as JSON (WorkerSpec.faults), never pickle.
"""
from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from kv_transfer.base import KVSendHandle, KVTransport, SendSummary, TransferError
from pdserve.v1 import kv_pb2, worker_pb2

KINDS = ("reset", "delay", "stall", "drop", "corrupt", "duplicate", "late_complete")


@dataclass
class FaultPlan:
    kind: str = "reset"
    probability: float = 0.0          # per attempt, drawn from `seed`
    pattern: list[int] = field(default_factory=list)   # 1-based attempt numbers that fault
    delay_ms: float = 0.0
    stall_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; choose from {KINDS}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError("probability must be in [0, 1]")
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._attempts = 0
        self.injected: dict[str, int] = {k: 0 for k in KINDS}

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps({k: d[k] for k in ("kind", "probability", "pattern", "delay_ms",
                                             "stall_s", "seed")})

    @staticmethod
    def from_json(text: str) -> "FaultPlan":
        return FaultPlan(**json.loads(text))

    def roll(self) -> bool:
        """One draw per attempt: does this attempt get the fault?"""
        with self._lock:
            self._attempts += 1
            if self.pattern:
                return self._attempts in self.pattern
            return self._rng.random() < self.probability

    def count(self, kind: str) -> None:
        with self._lock:
            self.injected[kind] += 1


class FaultyTransport(KVTransport):
    def __init__(self, inner: KVTransport, plan: FaultPlan) -> None:
        self.inner, self.plan = inner, plan
        self.name = getattr(inner, "name", "faulty")
        self.layerwise = getattr(inner, "layerwise", True)

    def open(self, reservation: worker_pb2.Reservation, request_id: str,
             attempt_id: int) -> KVSendHandle:
        handle = self.inner.open(reservation, request_id, attempt_id)
        if self.plan.kind in ("reset", "delay", "stall", "drop") and self.plan.roll():
            return _FaultyHandle(handle, self.plan)
        return handle

    def complete(self, reservation, record, timeout: float) -> kv_pb2.CompleteAck:
        return self.inner.complete(reservation, record, timeout)

    def close(self) -> None:
        self.inner.close()


class _FaultyHandle(KVSendHandle):
    def __init__(self, inner: KVSendHandle, plan: FaultPlan) -> None:
        self.inner, self.plan = inner, plan
        self._dropped = False

    def send(self, layer_start: int, layer_end: int, kv: Tensor) -> None:
        if self.plan.kind == "delay":
            time.sleep(self.plan.delay_ms / 1000)
        if self.plan.kind == "drop" and not self._dropped:
            self._dropped = True
            self.plan.count("drop")
            return
        self.inner.send(layer_start, layer_end, kv)

    def finish(self, timeout: float) -> SendSummary:
        kind = self.plan.kind
        if kind == "reset":
            self.plan.count("reset")
            self.inner.abort()
            raise TransferError("injected fault: connection reset")
        if kind == "delay":
            self.plan.count("delay")
            time.sleep(self.plan.delay_ms / 1000)
        if kind == "stall":
            self.plan.count("stall")
            time.sleep(min(self.plan.stall_s, timeout))
            if self.plan.stall_s >= timeout:
                self.inner.abort()
                raise TransferError(f"no KVPushAck within {timeout:.1f}s (injected stall)")
        return self.inner.finish(timeout)

    def abort(self) -> None:
        self.inner.abort()


class FaultyReceiver:
    """Stands in front of a KVReceiver on the decode side (same two methods)."""

    def __init__(self, inner, plan: FaultPlan) -> None:
        self.inner, self.plan = inner, plan
        self._faulty: dict[tuple[str, int], bool] = {}
        self._lock = threading.Lock()

    def _attempt_faults(self, request_id: str, attempt_id: int) -> bool:
        key = (request_id, attempt_id)
        with self._lock:
            if key not in self._faulty:
                self._faulty[key] = self.plan.roll()
                if len(self._faulty) > 100_000:
                    self._faulty.pop(next(iter(self._faulty)))
            return self._faulty[key]

    def receive(self, header: kv_pb2.KVChunkHeader, payload):
        kind = self.plan.kind
        if kind in ("corrupt", "duplicate") and header.chunk_index == 0 and \
                self._attempt_faults(header.request_id, header.attempt_id):
            if kind == "corrupt":
                self.plan.count("corrupt")
                payload = _flip_bit(payload)
            else:
                self.plan.count("duplicate")
                first = self.inner.receive(header, payload)
                if first[0] != kv_pb2.KV_STATUS_OK:
                    return first
        return self.inner.receive(header, payload)

    def complete(self, record: worker_pb2.CompletionRecord) -> kv_pb2.CompleteAck:
        ack = self.inner.complete(record)
        if self.plan.kind == "late_complete" and self._attempt_faults(record.request_id,
                                                                      record.attempt_id):
            self.plan.count("late_complete")
            again = self.inner.complete(record)       # must be DUPLICATE, with no effect
            assert again.code != kv_pb2.KV_STATUS_OK or not again.ok, "duplicate completed twice"
        return ack

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def _flip_bit(payload):
    """One flipped bit in the middle of the payload (a copy; the sender's data is intact)."""
    if isinstance(payload, Tensor):
        flat = payload.detach().cpu().contiguous().view(-1).view(torch.uint8).clone()
        flat[flat.numel() // 2] ^= 0x10
        return flat.view(payload.dtype).view(payload.shape).to(payload.device)
    raw = bytearray(payload)
    raw[len(raw) // 2] ^= 0x10
    return bytes(raw)
