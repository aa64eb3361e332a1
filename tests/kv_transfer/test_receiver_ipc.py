"""KVReceiver for peer-written (ipc) reservations: P copies the KV into D's blocks itself,
so no chunk reaches D's receiver; Complete checks identity, lease and token count only.
Scripted step by step: reserve -> (P writes) -> complete. CPU only."""
from __future__ import annotations

import gc

import pytest
import torch

from kv_transfer.layout import KVLayout
from kv_transfer.receiver import KVReceiver
from kv_transfer.reservations import ReservationEntry, ReservationState, ReservationTable
from kv_transfer.wire import encode_chunks
from pdserve.v1 import kv_pb2, worker_pb2

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

OK = kv_pb2.KV_STATUS_OK
LAYOUT = KVLayout(num_layers=2, block_size=2, num_kv_heads=1, head_dim=4, dtype=torch.float32)
HASH = LAYOUT.compat_hash("tiny")
BLOCKS = (5, 2, 7, 0)                        # D's reserved block ids, block-table order
TOKENS = 7                                   # 4 blocks of 2 tokens, the last one half full


class Harness:
    """D: 8-block caches, a table, a receiver on a fake clock; records the callbacks."""

    def __init__(self) -> None:
        self.now = 100.0
        kv = torch.zeros(LAYOUT.num_layers, 2, 8, 2, 1, 4)
        self.caches = [(kv[l, 0], kv[l, 1]) for l in range(LAYOUT.num_layers)]
        self.table = ReservationTable()
        self.completed: list[ReservationEntry] = []
        self.failed: list[tuple[ReservationEntry, int, str]] = []
        self.receiver = KVReceiver(self.caches, LAYOUT, HASH, self.table, self._on_complete,
                                   lambda e, c, m: self.failed.append((e, c, m)),
                                   clock=lambda: self.now)

    def _on_complete(self, entry: ReservationEntry,
                     record: worker_pb2.CompletionRecord) -> kv_pb2.CompleteAck:
        self.completed.append(entry)
        return kv_pb2.CompleteAck(ok=True, code=OK)

    def reserve(self, peer_written: bool = True) -> ReservationEntry:
        entry = self.table.create("req-1", 7, BLOCKS, num_tokens=TOKENS, lease_s=10.0, now=self.now)
        if peer_written:
            self.receiver.expect_peer_writes(entry)
        return entry


def ipc_record(entry: ReservationEntry, **changes: object) -> worker_pb2.CompletionRecord:
    """What an ipc P sends: no chunks and no checksum (ipc.IpcSendHandle.finish), the
    bytes it copied, the prompt's token count."""
    fields: dict[str, object] = dict(
        request_id=entry.request_id, attempt_id=entry.attempt_id,
        reservation_id=entry.reservation_id, first_token_id=11, num_prompt_tokens=entry.num_tokens,
        kv_checksum=0, num_chunks=0, kv_bytes=LAYOUT.num_layers * 2 * len(BLOCKS) * 2 * 4 * 4)
    fields.update(changes)
    return worker_pb2.CompletionRecord(**fields)


def test_peer_written_reservation_completes_without_chunks() -> None:
    d = Harness()
    entry = d.reserve()
    assert d.receiver.is_peer_written(entry)
    ack = d.receiver.complete(ipc_record(entry))
    assert (ack.ok, ack.code) == (True, OK)
    assert entry.state is ReservationState.COMPLETED and d.completed == [entry] and d.failed == []
    # a second Complete is a duplicate and starts nothing, before and after the pop
    assert d.receiver.complete(ipc_record(entry)).code == kv_pb2.KV_STATUS_DUPLICATE
    assert d.table.pop(entry.reservation_id) is entry
    assert d.receiver.complete(ipc_record(entry)).code == kv_pb2.KV_STATUS_DUPLICATE
    assert d.completed == [entry]


def test_the_same_record_is_rejected_without_the_mark() -> None:
    """The mode is explicit: an ordinary reservation still needs every chunk."""
    d = Harness()
    entry = d.reserve(peer_written=False)
    assert not d.receiver.is_peer_written(entry)
    ack = d.receiver.complete(ipc_record(entry))
    assert not ack.ok and ack.code == kv_pb2.KV_STATUS_CORRUPT   # 0 bytes received, not N
    assert entry.state is ReservationState.FAILED and d.completed == []
    assert [(e, c) for e, c, _ in d.failed] == [(entry, kv_pb2.KV_STATUS_CORRUPT)]


@pytest.mark.parametrize("changes,code", [
    (dict(reservation_id="f" * 32), kv_pb2.KV_STATUS_UNKNOWN_RESERVATION),
    (dict(attempt_id=6), kv_pb2.KV_STATUS_STALE_ATTEMPT),
    (dict(request_id="req-2"), kv_pb2.KV_STATUS_STALE_ATTEMPT),
], ids=["unknown_reservation", "stale_attempt", "request_mismatch"])
def test_identity_mismatch_is_refused_and_leaves_the_attempt_live(changes: dict, code: int) -> None:
    d = Harness()
    entry = d.reserve()
    ack = d.receiver.complete(ipc_record(entry, **changes))
    assert (ack.ok, ack.code) == (False, code)
    # a record that is not from the live attempt cannot end it
    assert entry.state is ReservationState.OPEN and d.failed == [] and d.completed == []
    assert d.receiver.complete(ipc_record(entry)).ok


def test_expired_lease_fails_the_attempt() -> None:
    d = Harness()
    entry = d.reserve()
    d.now += 10.0
    ack = d.receiver.complete(ipc_record(entry))
    assert (ack.ok, ack.code) == (False, kv_pb2.KV_STATUS_EXPIRED)
    assert entry.state is ReservationState.FAILED and d.completed == []
    assert [(e, c) for e, c, _ in d.failed] == [(entry, kv_pb2.KV_STATUS_EXPIRED)]


def test_token_count_mismatch_fails_the_attempt() -> None:
    d = Harness()
    entry = d.reserve()
    ack = d.receiver.complete(ipc_record(entry, num_prompt_tokens=TOKENS + 1))
    assert (ack.ok, ack.code) == (False, kv_pb2.KV_STATUS_INVALID)
    assert entry.state is ReservationState.FAILED and d.completed == []
    assert len(d.failed) == 1


def test_chunks_and_accounting_fields_are_ignored() -> None:
    """Whatever chunk fields P puts in the record, only identity/lease/tokens count."""
    d = Harness()
    entry = d.reserve()
    ack = d.receiver.complete(ipc_record(entry, num_chunks=3, kv_bytes=1, kv_checksum=0xDEAD))
    assert ack.ok and entry.state is ReservationState.COMPLETED


def test_chunk_for_a_peer_written_reservation_is_dropped() -> None:
    d = Harness()
    entry = d.reserve()
    kv = torch.randn(LAYOUT.payload_shape(LAYOUT.num_layers, len(BLOCKS)))
    base = kv_pb2.KVChunkHeader(request_id=entry.request_id, attempt_id=entry.attempt_id,
                                reservation_id=entry.reservation_id, compat_hash=HASH)
    chunk = encode_chunks(base, 0, LAYOUT.num_layers, BLOCKS, kv, 0, 1 << 20)[0]
    code, message = d.receiver.receive(chunk.header, chunk.payload)
    assert code == kv_pb2.KV_STATUS_INVALID and "peer" in message
    assert not any(t.any() for kv_pair in d.caches for t in kv_pair), "a dropped chunk wrote"
    assert entry.state is ReservationState.OPEN and d.failed == []
    assert d.receiver.complete(ipc_record(entry)).ok


def test_the_mark_goes_with_the_entry() -> None:
    d = Harness()
    entry = d.reserve()
    rid = entry.reservation_id
    d.table.fail(rid, "lease expired")
    d.table.pop(rid)
    del entry
    gc.collect()
    assert len(d.receiver._peer_written) == 0
