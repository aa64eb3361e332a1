"""The grpc transport over a real server on 127.0.0.1: full transfers, authentication,
backpressure, corruption and the never-unpickle guarantee."""
from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from kv_transfer import grpc_transport
from kv_transfer.base import TRANSPORTS, SendSummary, TransferError
from kv_transfer.grpc_transport import SECRET_METADATA_KEY, GrpcSendHandle, GrpcTransport, serve_kv
from kv_transfer.layout import KVLayout, gather_blocks
from kv_transfer.receiver import KVReceiver
from kv_transfer.reservations import ReservationEntry, ReservationState, ReservationTable
from pdserve.v1 import kv_pb2, kv_pb2_grpc, worker_pb2

pytestmark = [pytest.mark.filterwarnings("ignore:The given buffer is not writable"),
              pytest.mark.timeout(60)]

OK = kv_pb2.KV_STATUS_OK
SECRET = "cluster-secret"
LAYOUT = KVLayout(num_layers=3, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)
HASH = LAYOUT.compat_hash("tiny")
D_BLOCKS = (9, 1, 6, 3, 12)      # D's ids
P_BLOCKS = [0, 7, 2, 5, 4]       # P's ids for the same five blocks


class Decode:
    """A decode worker's KV side: caches, table, receiver and its gRPC listener."""

    def __init__(self, secret: str | None = SECRET, layout: KVLayout = LAYOUT, num_blocks: int = 16) -> None:
        kv = torch.zeros(layout.payload_shape(layout.num_layers, num_blocks), dtype=layout.dtype)
        self.caches = [(kv[l, 0], kv[l, 1]) for l in range(layout.num_layers)]
        self.table = ReservationTable()
        self.completed: list[ReservationEntry] = []
        self.failed: list[tuple[ReservationEntry, int, str]] = []
        self.receiver = KVReceiver(self.caches, layout, layout.compat_hash("tiny"), self.table,
                                   self._on_complete, lambda e, c, m: self.failed.append((e, c, m)))
        self.server, self.port = serve_kv(self.receiver, "127.0.0.1", 0, secret)

    def _on_complete(self, entry: ReservationEntry, record: worker_pb2.CompletionRecord) -> kv_pb2.CompleteAck:
        self.completed.append(entry)
        return kv_pb2.CompleteAck(ok=True, code=OK)

    def reserve(self, blocks: tuple[int, ...] = D_BLOCKS) -> tuple[ReservationEntry, worker_pb2.Reservation]:
        entry = self.table.create("req-1", 2, blocks, num_tokens=4 * len(blocks) - 2, lease_s=30.0)
        reservation = worker_pb2.Reservation(
            reservation_id=entry.reservation_id, endpoint=f"127.0.0.1:{self.port}", block_ids=blocks,
            num_tokens=entry.num_tokens, compat_hash=self.receiver.compat_hash, attempt_id=2,
            transport="grpc", block_size=self.receiver.layout.block_size)
        return entry, reservation

    def snapshot(self) -> torch.Tensor:
        return torch.stack([torch.stack(kv) for kv in self.caches]).clone()


@pytest.fixture
def decode() -> Iterator[Decode]:
    d = Decode()
    yield d
    d.server.stop(0)


# Big enough that D's processing, not buffering, sets the pace: once warm, gRPC's HTTP/2
# window (BDP probing grows it) plus loopback socket buffers absorb 16-32 MiB of chunks.
# 128 KiB per block of both layers: 64 MiB for 512 blocks.
BIG = KVLayout(num_layers=2, block_size=16, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
BIG_BLOCKS = 512


@pytest.fixture
def big_decode() -> Iterator[Decode]:
    d = Decode(layout=BIG, num_blocks=BIG_BLOCKS)
    yield d
    d.server.stop(0)


def prefill_caches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    kv = torch.randn(LAYOUT.num_layers, 2, 8, 4, 2, 8, generator=torch.Generator().manual_seed(seed))
    kv = kv.to(torch.bfloat16)
    return [(kv[l, 0], kv[l, 1]) for l in range(LAYOUT.num_layers)]


def record_for(reservation: worker_pb2.Reservation, summary: SendSummary) -> worker_pb2.CompletionRecord:
    return worker_pb2.CompletionRecord(
        request_id="req-1", attempt_id=2, reservation_id=reservation.reservation_id, first_token_id=5,
        num_prompt_tokens=reservation.num_tokens, kv_checksum=summary.checksum,
        num_chunks=summary.num_chunks, kv_bytes=summary.num_bytes)


def push_all(transport: GrpcTransport, reservation: worker_pb2.Reservation,
             p_caches: list[tuple[torch.Tensor, torch.Tensor]], timeout: float = 10.0) -> SendSummary:
    handle = transport.open(reservation, "req-1", 2)
    for layer in range(LAYOUT.num_layers):
        handle.send(layer, layer + 1, gather_blocks(p_caches, layer, layer + 1, P_BLOCKS))
    return handle.finish(timeout)


def test_full_transfer_over_grpc(decode: Decode) -> None:
    assert TRANSPORTS["grpc"] is GrpcTransport
    entry, reservation = decode.reserve()
    p_caches = prefill_caches()
    per_block = LAYOUT.layer_block_bytes()
    transport = GrpcTransport(secret=SECRET, max_chunk_bytes=2 * per_block + 100)  # 2 blocks per chunk
    try:
        summary = push_all(transport, reservation, p_caches)
        assert summary.num_chunks == 9 and entry.state is ReservationState.RECEIVED
        ack = transport.complete(reservation, record_for(reservation, summary), timeout=5)
        assert ack.ok and decode.completed == [entry] and decode.failed == []
        got = gather_blocks(decode.caches, 0, LAYOUT.num_layers, D_BLOCKS)
        want = gather_blocks(p_caches, 0, LAYOUT.num_layers, P_BLOCKS)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))   # bit-exact bf16
        others = [b for b in range(16) if b not in D_BLOCKS]
        assert not gather_blocks(decode.caches, 0, LAYOUT.num_layers, others).any()
        dup = transport.complete(reservation, record_for(reservation, summary), timeout=5)
        assert dup.code == kv_pb2.KV_STATUS_DUPLICATE and decode.completed == [entry]
    finally:
        transport.close()


@pytest.mark.parametrize("secret", [None, "wrong-secret"])
def test_missing_or_wrong_secret_is_unauthenticated(decode: Decode, secret: str | None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = decode.receiver.receive
    monkeypatch.setattr(decode.receiver, "receive", lambda h, p: calls.append(1) or real(h, p))
    entry, reservation = decode.reserve()
    transport = GrpcTransport(secret=secret)
    try:
        with pytest.raises(TransferError) as e:
            push_all(transport, reservation, prefill_caches())
        assert e.value.code == kv_pb2.KV_STATUS_UNAUTHENTICATED
        with pytest.raises(TransferError) as e:
            transport.complete(reservation, worker_pb2.CompletionRecord(
                request_id="req-1", attempt_id=2, reservation_id=reservation.reservation_id), timeout=5)
        assert e.value.code == kv_pb2.KV_STATUS_UNAUTHENTICATED
    finally:
        transport.close()
    assert calls == [] and not decode.snapshot().any()
    assert entry.state is ReservationState.OPEN and decode.failed == [] and decode.completed == []


def test_bit_flip_after_encoding_is_corrupt(decode: Decode, monkeypatch: pytest.MonkeyPatch) -> None:
    real = grpc_transport.encode_chunks
    flipped: list[int] = []

    def flip_second_send(*args: object, **kwargs: object) -> list[kv_pb2.KVChunk]:
        chunks = real(*args, **kwargs)  # type: ignore[arg-type]
        if args[1] == 1:                # layer 1: corrupt its first chunk on the "wire"
            p = bytearray(chunks[0].payload)
            p[len(p) // 2] ^= 0x10
            chunks[0].payload = bytes(p)
            flipped.append(chunks[0].header.chunk_index)
        return chunks

    monkeypatch.setattr(grpc_transport, "encode_chunks", flip_second_send)
    entry, reservation = decode.reserve()
    transport = GrpcTransport(secret=SECRET, max_chunk_bytes=2 * LAYOUT.layer_block_bytes())
    try:
        with pytest.raises(TransferError) as e:
            push_all(transport, reservation, prefill_caches())
    finally:
        transport.close()
    assert flipped == [3] and e.value.code == kv_pb2.KV_STATUS_CORRUPT
    assert [(f[0], f[1]) for f in decode.failed] == [(entry, kv_pb2.KV_STATUS_CORRUPT)]
    assert not torch.stack(decode.caches[1]).any()   # the corrupted layer never landed


def test_backpressure_keeps_the_client_queue_bounded(big_decode: Decode,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real = big_decode.receiver.receive
    delay = 0.01

    def slow_receive(header: kv_pb2.KVChunkHeader, payload: bytes) -> tuple[int, str]:
        time.sleep(delay)
        return real(header, payload)

    monkeypatch.setattr(big_decode.receiver, "receive", slow_receive)
    blocks = tuple(range(BIG_BLOCKS))
    entry, reservation = big_decode.reserve(blocks)
    p_kv = torch.randn(BIG.payload_shape(2, BIG_BLOCKS)).to(torch.bfloat16)
    transport = GrpcTransport(secret=SECRET, max_chunk_bytes=512 << 10, queue_chunks=2)  # 128 chunks
    handle = transport.open(reservation, "req-1", 2)
    assert isinstance(handle, GrpcSendHandle)
    depth: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            depth.append(handle.queued)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        start = time.monotonic()
        handle.send(0, 2, p_kv)
        send_s = time.monotonic() - start
        summary = handle.finish(30)
        total_s = time.monotonic() - start
    finally:
        stop.set()
        sampler.join()
        transport.close()
    assert summary.num_chunks == 128 and entry.chunks_received == 128
    assert max(depth) <= 2
    # at most ~64 chunks fit in gRPC's and the socket's buffers; the rest waited for D
    assert send_s >= 0.3, f"send() returned after {send_s:.2f}s of {total_s:.2f}s: no backpressure"
    assert torch.equal(gather_blocks(big_decode.caches, 0, 2, list(blocks)).view(torch.int16),
                       p_kv.view(torch.int16))


def test_stalled_decode_fails_the_send_instead_of_hanging(big_decode: Decode,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real = big_decode.receiver.receive
    monkeypatch.setattr(big_decode.receiver, "receive", lambda h, p: (release.wait(10), real(h, p))[1])
    _, reservation = big_decode.reserve(tuple(range(BIG_BLOCKS)))
    transport = GrpcTransport(secret=SECRET, max_chunk_bytes=512 << 10, queue_chunks=1, send_timeout_s=0.3)
    try:
        handle = transport.open(reservation, "req-1", 2)
        kv = torch.randn(BIG.payload_shape(2, BIG_BLOCKS)).to(torch.bfloat16)
        start = time.monotonic()
        handle.send(0, 2, kv)      # 64 MiB: more than the buffers hold, so send() blocks
        assert time.monotonic() - start < 3
        with pytest.raises(TransferError, match="stopped draining"):
            handle.finish(5)
    finally:
        release.set()
        transport.close()


def test_finish_timeout_cancels(decode: Decode, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real = decode.receiver.receive
    monkeypatch.setattr(decode.receiver, "receive", lambda h, p: (release.wait(10), real(h, p))[1])
    _, reservation = decode.reserve()
    transport = GrpcTransport(secret=SECRET)
    try:
        handle = transport.open(reservation, "req-1", 2)
        handle.send(0, 1, gather_blocks(prefill_caches(), 0, 1, P_BLOCKS))
        start = time.monotonic()
        with pytest.raises(TransferError, match="within"):
            handle.finish(0.3)
        assert time.monotonic() - start < 2
        handle.abort()
        handle.abort()   # idempotent
    finally:
        release.set()
        transport.close()


def test_released_reservation_refuses_late_push(decode: Decode) -> None:
    entry, reservation = decode.reserve()
    decode.table.pop(entry.reservation_id)
    transport = GrpcTransport(secret=SECRET)
    try:
        with pytest.raises(TransferError) as e:
            push_all(transport, reservation, prefill_caches())
    finally:
        transport.close()
    assert e.value.code == kv_pb2.KV_STATUS_UNKNOWN_RESERVATION and not decode.snapshot().any()


class Canary:
    """Unpickling this creates `path`: the proof that someone called pickle.loads."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.path),))  # type: ignore[return-value]


def test_pickle_payload_is_never_unpickled(decode: Decode, tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Canary(probe)))   # the canary is live: loads() would fire it
    assert probe.exists()
    canary = tmp_path / "canary"
    blob = pickle.dumps(Canary(canary))
    entry, reservation = decode.reserve()
    header = kv_pb2.KVChunkHeader(
        request_id="req-1", attempt_id=2, reservation_id=entry.reservation_id, compat_hash=HASH,
        layer_start=0, layer_end=1, block_ids=[D_BLOCKS[0]], dtype=kv_pb2.KV_DTYPE_BFLOAT16,
        shape=list(LAYOUT.payload_shape(1, 1)), chunk_index=0, payload_bytes=len(blob))
    channel = grpc.insecure_channel(reservation.endpoint)
    try:
        ack = kv_pb2_grpc.KVTransferStub(channel).Push(
            iter([kv_pb2.KVChunk(header=header, payload=blob)]),
            metadata=((SECRET_METADATA_KEY, SECRET),), timeout=5)
    finally:
        channel.close()
    assert ack.code == kv_pb2.KV_STATUS_INVALID and ack.accepted_chunks == 0 and ack.error
    assert not canary.exists() and not decode.snapshot().any()


def test_no_thread_growth_over_many_transfers(decode: Decode) -> None:
    transport = GrpcTransport(secret=SECRET)
    p_caches = prefill_caches()
    try:
        push_all(transport, decode.reserve()[1], p_caches)   # warm: channel and pollers
        time.sleep(0.3)
        baseline = threading.active_count()
        for _ in range(20):
            _, reservation = decode.reserve()
            push_all(transport, reservation, p_caches)
        time.sleep(0.5)   # request-consumer threads exit within their 0.1 s poll
        assert threading.active_count() <= baseline + 2
    finally:
        transport.close()

