"""KVReceiver and ReservationTable: every check of kv.proto, scripted step by step
(reserve -> chunks -> complete), plus the local transport."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

import google_crc32c
import pytest
import torch

from kv_transfer import receiver as receiver_mod
from kv_transfer.base import TRANSPORTS, TransferError
from kv_transfer.layout import KVLayout, gather_blocks
from kv_transfer.local import LocalTransport
from kv_transfer.receiver import KVReceiver
from kv_transfer.reservations import ReservationEntry, ReservationState, ReservationTable
from kv_transfer.wire import encode_chunks, plan_chunks
from pdserve.v1 import kv_pb2, worker_pb2

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

OK = kv_pb2.KV_STATUS_OK
LAYOUT = KVLayout(num_layers=2, block_size=2, num_kv_heads=1, head_dim=4, dtype=torch.float32)
HASH = LAYOUT.compat_hash("tiny")
COLUMN = 2 * LAYOUT.layer_block_bytes()      # one block, both layers: 128 bytes
BLOCKS = (5, 2, 7, 0)                        # D's reserved block ids, block-table order


class Harness:
    """D: caches of 8 blocks, a table, a receiver with a fake clock; records callbacks."""

    def __init__(self) -> None:
        self.now = 100.0
        kv = torch.zeros(LAYOUT.num_layers, 2, 8, 2, 1, 4)
        self.caches = [(kv[l, 0], kv[l, 1]) for l in range(LAYOUT.num_layers)]
        self.table = ReservationTable()
        self.completed: list[ReservationEntry] = []
        self.failed: list[tuple[ReservationEntry, int, str]] = []
        self.receiver = KVReceiver(self.caches, LAYOUT, HASH, self.table, self._on_complete,
                                   lambda e, c, m: self.failed.append((e, c, m)), clock=lambda: self.now)

    def _on_complete(self, entry: ReservationEntry, record: worker_pb2.CompletionRecord) -> kv_pb2.CompleteAck:
        self.completed.append(entry)
        return kv_pb2.CompleteAck(ok=True, code=OK)

    def reserve(self, blocks: tuple[int, ...] = BLOCKS, cached: int = 0) -> ReservationEntry:
        return self.table.create("req-1", 7, blocks, num_tokens=2 * len(blocks) - 1, lease_s=10.0,
                                 num_cached_blocks=cached, now=self.now)

    def snapshot(self) -> torch.Tensor:
        return torch.stack([torch.stack(kv) for kv in self.caches]).clone()

    def written(self, entry: ReservationEntry) -> torch.Tensor:
        return gather_blocks(self.caches, 0, LAYOUT.num_layers, entry.block_ids[entry.num_cached_blocks:])


def transfer(entry: ReservationEntry, seed: int = 0,
             max_bytes: int = 2 * COLUMN) -> tuple[list[kv_pb2.KVChunk], torch.Tensor]:
    """P's side: all layers of the entry's writable blocks, 2 blocks per chunk."""
    n = len(entry.block_ids) - entry.num_cached_blocks
    kv = torch.randn(LAYOUT.payload_shape(LAYOUT.num_layers, n), generator=torch.Generator().manual_seed(seed))
    base = kv_pb2.KVChunkHeader(request_id=entry.request_id, attempt_id=entry.attempt_id,
                                reservation_id=entry.reservation_id, compat_hash=HASH)
    d_ids = entry.block_ids[entry.num_cached_blocks:]
    chunks = encode_chunks(base, 0, LAYOUT.num_layers, d_ids, kv, 0, max_bytes)
    return chunks, kv


def record_for(entry: ReservationEntry, chunks: list[kv_pb2.KVChunk]) -> worker_pb2.CompletionRecord:
    checksum = 0
    for c in chunks:
        checksum = google_crc32c.extend(checksum, c.payload)
    return worker_pb2.CompletionRecord(
        request_id=entry.request_id, attempt_id=entry.attempt_id, reservation_id=entry.reservation_id,
        first_token_id=11, num_prompt_tokens=entry.num_tokens, kv_checksum=checksum,
        num_chunks=len(chunks), kv_bytes=sum(len(c.payload) for c in chunks))


def test_full_transfer_writes_reserved_blocks_and_completes_once() -> None:
    d = Harness()
    entry = d.reserve()
    chunks, kv = transfer(entry)
    assert len(chunks) == 2
    for c in chunks:
        assert d.receiver.receive(c.header, c.payload) == (OK, "")
    assert torch.equal(d.written(entry), kv)
    untouched = [b for b in range(8) if b not in BLOCKS]
    assert not gather_blocks(d.caches, 0, 2, untouched).any()
    ack = d.receiver.complete(record_for(entry, chunks))
    assert ack.ok and ack.code == OK and entry.state is ReservationState.COMPLETED
    dup = d.receiver.complete(record_for(entry, chunks))
    assert (dup.ok, dup.code) == (False, kv_pb2.KV_STATUS_DUPLICATE)
    assert d.completed == [entry] and d.failed == []
    # after the owner pops it, a duplicate is still recognised, and changes nothing
    assert d.table.pop(entry.reservation_id) is entry and len(d.table) == 0
    assert d.receiver.complete(record_for(entry, chunks)).code == kv_pb2.KV_STATUS_DUPLICATE
    assert entry.state is ReservationState.COMPLETED and d.completed == [entry]


def _set(field: str, value: object) -> Callable[[kv_pb2.KVChunk, Harness], None]:
    return lambda c, d: setattr(c.header, field, value)


REJECTIONS: list[tuple[str, Callable[[kv_pb2.KVChunk, Harness], None], int, bool]] = [
    # (name, mutation of chunk 1, code, fails the attempt)
    ("unknown_reservation", _set("reservation_id", "f" * 32), kv_pb2.KV_STATUS_UNKNOWN_RESERVATION, False),
    ("stale_attempt", _set("attempt_id", 6), kv_pb2.KV_STATUS_STALE_ATTEMPT, False),
    ("request_mismatch", _set("request_id", "req-2"), kv_pb2.KV_STATUS_STALE_ATTEMPT, False),
    ("expired", lambda c, d: setattr(d, "now", d.now + 10.0), kv_pb2.KV_STATUS_EXPIRED, True),
    ("incompatible", _set("compat_hash", HASH ^ 1), kv_pb2.KV_STATUS_INCOMPATIBLE, True),
    ("block_outside", lambda c, d: c.header.block_ids.__setitem__(0, 3), kv_pb2.KV_STATUS_INVALID, True),
    ("block_twice", lambda c, d: c.header.block_ids.__setitem__(1, c.header.block_ids[0]),
     kv_pb2.KV_STATUS_INVALID, True),
    ("layer_end_too_big", _set("layer_end", 3), kv_pb2.KV_STATUS_INVALID, True),
    ("empty_layer_range", _set("layer_start", 2), kv_pb2.KV_STATUS_INVALID, True),
    ("dtype", _set("dtype", kv_pb2.KV_DTYPE_BFLOAT16), kv_pb2.KV_STATUS_INVALID, True),
    ("dtype_unspecified", _set("dtype", kv_pb2.KV_DTYPE_UNSPECIFIED), kv_pb2.KV_STATUS_INVALID, True),
    ("shape", lambda c, d: c.header.shape.__setitem__(4, 2), kv_pb2.KV_STATUS_INVALID, True),
    ("payload_bytes", lambda c, d: setattr(c.header, "payload_bytes", c.header.payload_bytes + 4),
     kv_pb2.KV_STATUS_INVALID, True),
    ("truncated", lambda c, d: setattr(c, "payload", c.payload[:-1]), kv_pb2.KV_STATUS_INVALID, True),
    ("forged_num_chunks", _set("num_chunks", 1), kv_pb2.KV_STATUS_INVALID, True),
    ("bit_flip", lambda c, d: setattr(c, "payload", c.payload[:9] + bytes([c.payload[9] ^ 4]) + c.payload[10:]),
     kv_pb2.KV_STATUS_CORRUPT, True),
    ("crc_field", lambda c, d: setattr(c.header, "crc32c", c.header.crc32c ^ 1),
     kv_pb2.KV_STATUS_CORRUPT, True),
    ("chunk_index_gap", _set("chunk_index", 2), kv_pb2.KV_STATUS_CORRUPT, True),
    ("chunk_index_repeat", _set("chunk_index", 0), kv_pb2.KV_STATUS_CORRUPT, True),
]


@pytest.mark.parametrize("name,mutate,code,fails", REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_rejected_chunk_writes_nothing(name: str, mutate: Callable[[kv_pb2.KVChunk, Harness], None],
                                       code: int, fails: bool) -> None:
    d = Harness()
    entry = d.reserve()
    chunks, _ = transfer(entry)
    assert d.receiver.receive(chunks[0].header, chunks[0].payload)[0] == OK
    bad = kv_pb2.KVChunk()
    bad.ParseFromString(chunks[1].SerializeToString())
    mutate(bad, d)
    before = d.snapshot()
    got, message = d.receiver.receive(bad.header, bad.payload)
    assert got == code, message
    assert message
    assert torch.equal(d.snapshot(), before)
    if fails:
        assert [(f[0], f[1]) for f in d.failed] == [(entry, code)]
        assert entry.state is ReservationState.FAILED
        # the genuine chunk arriving late is dropped too, and nothing more is notified
        late = d.receiver.receive(chunks[1].header, chunks[1].payload)[0]
        assert late == kv_pb2.KV_STATUS_STALE_ATTEMPT
        assert torch.equal(d.snapshot(), before) and len(d.failed) == 1
        assert d.receiver.complete(record_for(entry, chunks)).code == kv_pb2.KV_STATUS_STALE_ATTEMPT
        assert d.completed == [] and len(d.failed) == 1
    else:
        # a chunk that is not from the live attempt cannot end it
        assert d.failed == [] and entry.state is ReservationState.OPEN
        assert d.receiver.receive(chunks[1].header, chunks[1].payload)[0] == OK
        assert d.receiver.complete(record_for(entry, chunks)).ok


def test_repeated_chunk_is_corrupt_and_not_rewritten() -> None:
    d = Harness()
    entry = d.reserve()
    chunks, _ = transfer(entry)
    assert d.receiver.receive(chunks[0].header, chunks[0].payload)[0] == OK
    again, _ = transfer(entry, seed=5)   # same header fields, other bytes (valid crc)
    before = d.snapshot()
    assert d.receiver.receive(again[0].header, again[0].payload)[0] == kv_pb2.KV_STATUS_CORRUPT
    assert torch.equal(d.snapshot(), before) and len(d.failed) == 1


def test_prefix_cached_blocks_are_never_written() -> None:
    d = Harness()
    entry = d.reserve(cached=1)           # block 5 holds D's cached prefix
    chunks, kv = transfer(entry)
    assert [list(c.header.block_ids) for c in chunks] == [[2, 7], [0]]
    forged = kv_pb2.KVChunk()
    forged.ParseFromString(chunks[0].SerializeToString())
    forged.header.block_ids[0] = 5
    before = d.snapshot()
    assert d.receiver.receive(forged.header, forged.payload)[0] == kv_pb2.KV_STATUS_INVALID
    assert torch.equal(d.snapshot(), before)

    d2 = Harness()
    entry2 = d2.reserve(cached=1)
    chunks2, kv2 = transfer(entry2)
    for c in chunks2:
        assert d2.receiver.receive(c.header, c.payload)[0] == OK
    assert d2.receiver.complete(record_for(entry2, chunks2)).ok
    assert not d2.caches[0][0][5].any()


@pytest.mark.parametrize("change,code", [
    (lambda r: setattr(r, "num_chunks", r.num_chunks + 1), kv_pb2.KV_STATUS_CORRUPT),
    (lambda r: setattr(r, "kv_checksum", r.kv_checksum ^ 1), kv_pb2.KV_STATUS_CORRUPT),
    (lambda r: setattr(r, "kv_bytes", r.kv_bytes - 1), kv_pb2.KV_STATUS_CORRUPT),
    (lambda r: setattr(r, "num_prompt_tokens", r.num_prompt_tokens + 1), kv_pb2.KV_STATUS_INVALID),
])
def test_complete_rejects_a_record_that_does_not_match(change: Callable[[worker_pb2.CompletionRecord], None],
                                                       code: int) -> None:
    d = Harness()
    entry = d.reserve()
    chunks, _ = transfer(entry)
    for c in chunks:
        d.receiver.receive(c.header, c.payload)
    record = record_for(entry, chunks)
    change(record)
    ack = d.receiver.complete(record)
    assert (ack.ok, ack.code) == (False, code)
    assert [(f[0], f[1]) for f in d.failed] == [(entry, code)] and d.completed == []
    assert d.receiver.complete(record_for(entry, chunks)).code == kv_pb2.KV_STATUS_STALE_ATTEMPT


def test_complete_needs_every_layer_of_every_block() -> None:
    d = Harness()
    entry = d.reserve()
    chunks, _ = transfer(entry)
    d.receiver.receive(chunks[0].header, chunks[0].payload)
    ack = d.receiver.complete(record_for(entry, chunks[:1]))   # consistent counts, half the KV
    assert ack.code == kv_pb2.KV_STATUS_INVALID and len(d.failed) == 1


def test_complete_unknown_stale_expired() -> None:
    d = Harness()
    entry = d.reserve()
    chunks, _ = transfer(entry)
    for c in chunks:
        d.receiver.receive(c.header, c.payload)
    record = record_for(entry, chunks)
    unknown = worker_pb2.CompletionRecord()
    unknown.CopyFrom(record)
    unknown.reservation_id = "0" * 32
    assert d.receiver.complete(unknown).code == kv_pb2.KV_STATUS_UNKNOWN_RESERVATION
    stale = worker_pb2.CompletionRecord()
    stale.CopyFrom(record)
    stale.attempt_id = 99
    assert d.receiver.complete(stale).code == kv_pb2.KV_STATUS_STALE_ATTEMPT
    assert d.failed == [] and entry.live
    d.now += 10.0
    assert d.receiver.complete(record).code == kv_pb2.KV_STATUS_EXPIRED
    assert [(f[0], f[1]) for f in d.failed] == [(entry, kv_pb2.KV_STATUS_EXPIRED)] and d.completed == []


def test_on_complete_raising_fails_the_attempt_once() -> None:
    d = Harness()
    def full(entry: ReservationEntry, record: worker_pb2.CompletionRecord) -> kv_pb2.CompleteAck:
        raise RuntimeError("batch full")

    d.receiver._on_complete = full
    entry = d.reserve()
    chunks, _ = transfer(entry)
    for c in chunks:
        d.receiver.receive(c.header, c.payload)
    ack = d.receiver.complete(record_for(entry, chunks))
    assert not ack.ok and entry.state is ReservationState.FAILED and len(d.failed) == 1


def test_late_chunks_after_expiry_sweep_and_release_are_dropped() -> None:
    d = Harness()
    entry = d.reserve()
    chunks, _ = transfer(entry)
    d.now += 11.0
    assert d.table.expired(d.now) == [entry]
    assert d.table.fail(entry.reservation_id, "lease expired") is entry
    assert d.table.fail(entry.reservation_id, "lease expired") is None      # owner frees once
    assert d.table.expired(d.now) == []
    before = d.snapshot()
    assert d.receiver.receive(chunks[0].header, chunks[0].payload)[0] == kv_pb2.KV_STATUS_STALE_ATTEMPT
    d.table.pop(entry.reservation_id)
    assert d.receiver.receive(chunks[0].header, chunks[0].payload)[0] == kv_pb2.KV_STATUS_UNKNOWN_RESERVATION
    assert d.receiver.complete(record_for(entry, chunks)).code == kv_pb2.KV_STATUS_UNKNOWN_RESERVATION
    assert torch.equal(d.snapshot(), before) and d.failed == [] and d.completed == []


def test_tensor_payloads_check_crc_unless_opted_out() -> None:
    d = Harness()
    entry = d.reserve()
    base = kv_pb2.KVChunkHeader(request_id="req-1", attempt_id=7, reservation_id=entry.reservation_id,
                                compat_hash=HASH)
    kv = torch.randn(LAYOUT.payload_shape(1, 4))
    (h, t), = plan_chunks(base, 0, 1, list(BLOCKS), kv, 0, 1 << 20)
    assert d.receiver.receive(h, t.to(torch.float16))[0] == kv_pb2.KV_STATUS_INVALID
    d2 = Harness()
    entry2 = d2.reserve()
    base.reservation_id = entry2.reservation_id
    (h, t), = plan_chunks(base, 0, 1, list(BLOCKS), kv, 0, 1 << 20)
    flipped = t.clone()
    flipped[0, 0, 0, 0, 0, 0] += 1.0
    assert d2.receiver.receive(h, flipped)[0] == kv_pb2.KV_STATUS_CORRUPT
    assert not d2.snapshot().any()
    d3 = Harness()
    entry3 = d3.reserve()
    base.reservation_id = entry3.reservation_id
    chunks = plan_chunks(base, 0, 1, list(BLOCKS), kv, 0, 1 << 20, checksum=False)
    chunks += plan_chunks(base, 1, 2, list(BLOCKS), kv, 1, 1 << 20, checksum=False)
    for h, t in chunks:
        assert d3.receiver.receive(h, t) == (OK, "")
    record = worker_pb2.CompletionRecord(request_id="req-1", attempt_id=7, reservation_id=entry3.reservation_id,
                                         num_prompt_tokens=entry3.num_tokens, num_chunks=2,
                                         kv_bytes=2 * kv.numel() * 4, kv_checksum=0)
    assert d3.receiver.complete(record).ok


def test_pop_waits_for_a_chunk_being_written(monkeypatch: pytest.MonkeyPatch) -> None:
    d = Harness()
    entry = d.reserve()
    chunks, _ = transfer(entry)
    started, release = threading.Event(), threading.Event()
    real = receiver_mod.scatter_blocks

    def slow_scatter(*args: object) -> None:
        started.set()
        release.wait(5)
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(receiver_mod, "scatter_blocks", slow_scatter)
    results: dict[str, object] = {}
    writer = threading.Thread(
        target=lambda: results.update(code=d.receiver.receive(chunks[0].header, chunks[0].payload)))
    popper = threading.Thread(target=lambda: results.update(popped=d.table.pop(entry.reservation_id)))
    writer.start()
    assert started.wait(5)
    popper.start()
    time.sleep(0.2)
    assert popper.is_alive()          # the owner cannot free blocks mid-write
    release.set()
    writer.join(5)
    popper.join(5)
    assert results["code"] == (OK, "") and results["popped"] is entry
    assert entry.state is ReservationState.FAILED
    assert d.receiver.receive(chunks[1].header, chunks[1].payload)[0] == kv_pb2.KV_STATUS_UNKNOWN_RESERVATION


def test_table_validates_and_counts() -> None:
    table = ReservationTable()
    with pytest.raises(ValueError):
        table.create("r", 0, [1], 1, 1.0)
    with pytest.raises(ValueError):
        table.create("r", 1, [1, 1], 1, 1.0)
    with pytest.raises(ValueError):
        table.create("r", 1, [], 1, 1.0)
    a = table.create("r", 1, [1, 2], 3, 1.0, now=0.0)
    b = table.create("r2", 1, [3], 1, 5.0, now=0.0)
    assert len(table) == 2 and a.reservation_id != b.reservation_id and len(a.reservation_id) == 32
    assert table.expired(2.0) == [a]
    assert table.pop(a.reservation_id) is a and table.pop(a.reservation_id) is None
    assert a.reservation_id not in table and len(table) == 1


# --- local transport ---------------------------------------------------------------------

def test_local_transport_lifecycle() -> None:
    assert TRANSPORTS["local"] is LocalTransport
    d = Harness()
    entry = d.reserve()
    p_kv = torch.randn(LAYOUT.num_layers, 2, 6, 2, 1, 4)
    p_caches = [(p_kv[l, 0], p_kv[l, 1]) for l in range(LAYOUT.num_layers)]
    p_blocks = [3, 0, 5, 1]                                   # P's ids for the same tokens
    transport = LocalTransport(max_chunk_bytes=100)           # < one block column: 1 block/chunk
    transport.bind("d0", d.receiver)
    reservation = worker_pb2.Reservation(reservation_id=entry.reservation_id, endpoint="d0",
                                         block_ids=entry.block_ids, compat_hash=HASH, attempt_id=7,
                                         block_size=2, num_tokens=entry.num_tokens)
    handle = transport.open(reservation, "req-1", 7)
    for layer in range(LAYOUT.num_layers):                    # layer by layer, as P computes
        handle.send(layer, layer + 1, gather_blocks(p_caches, layer, layer + 1, p_blocks))
    summary = handle.finish(1.0)
    assert summary.num_chunks == 8 and entry.state is ReservationState.RECEIVED
    record = worker_pb2.CompletionRecord(request_id="req-1", attempt_id=7, reservation_id=entry.reservation_id,
                                         num_prompt_tokens=entry.num_tokens, num_chunks=summary.num_chunks,
                                         kv_checksum=summary.checksum, kv_bytes=summary.num_bytes)
    assert transport.complete(reservation, record, 1.0).ok
    assert torch.equal(d.written(entry), gather_blocks(p_caches, 0, 2, p_blocks))
    assert transport.complete(reservation, record, 1.0).code == kv_pb2.KV_STATUS_DUPLICATE


def test_local_transport_reports_a_refused_chunk_in_finish() -> None:
    d = Harness()
    entry = d.reserve()
    transport = LocalTransport()
    transport.bind("d0", d.receiver)
    reservation = worker_pb2.Reservation(reservation_id=entry.reservation_id, endpoint="d0",
                                         block_ids=entry.block_ids, compat_hash=HASH ^ 2, attempt_id=7)
    handle = transport.open(reservation, "req-1", 7)
    handle.send(0, 2, torch.randn(LAYOUT.payload_shape(2, 4)))
    with pytest.raises(TransferError) as e:
        handle.finish(1.0)
    assert e.value.code == kv_pb2.KV_STATUS_INCOMPATIBLE and len(d.failed) == 1
    handle2 = transport.open(reservation, "req-1", 7)
    handle2.abort()
    with pytest.raises(TransferError):
        handle2.finish(1.0)
