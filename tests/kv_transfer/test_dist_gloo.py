"""The nccl transport's logic over gloo on CPU: real processes, a real process group.

Each test spawns ranks (torch.multiprocessing, gloo, tcp init on 127.0.0.1). P ranks own
a random source cache; the D rank owns a KVReceiver over its own zeroed cache and a
ReservationTable. The Reservation (D -> P) and the CompletionRecord / CompleteAck
(P -> D -> P) travel as serialized protos over a multiprocessing Pipe (send_bytes), in
place of the router and D's gRPC Complete. D checks its blocks against the source KV
gathered with P's block ids (identical on both sides: same seed).
"""
from __future__ import annotations

import multiprocessing.connection as mpc
import socket
import time
from typing import Callable

import pytest
import torch
import torch.multiprocessing as mp

from kv_transfer.base import TransferError
from kv_transfer.layout import KVLayout, gather_blocks
from pdserve.v1 import kv_pb2, worker_pb2

LAYOUT = KVLayout(num_layers=4, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32)
COMPAT = LAYOUT.compat_hash("test-model")
P_BLOCKS = 16                   # blocks in each P's cache
D_BLOCKS = 64                   # blocks in D's cache
SPLITS = [(0, 1), (1, 3), (3, 4)]   # layer ranges P sends, as a layer-wise prefill would
CHUNK_BYTES = 2 * 1024          # small: several chunks per send (one block-layer is 256 B)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _caches(num_blocks: int, seed: int | None,
            device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (LAYOUT.num_layers, 2, num_blocks, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    if seed is None:
        kv = torch.zeros(shape, dtype=LAYOUT.dtype)
    else:
        kv = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=LAYOUT.dtype)
    kv = kv.to(device)
    return [(kv[l, 0], kv[l, 1]) for l in range(LAYOUT.num_layers)]


def _p_blocks(request_id: str, n: int) -> list[int]:
    """P's block ids for a request (deterministic, so D can recompute the expectation)."""
    start = sum(map(ord, request_id)) % (P_BLOCKS - n)
    return list(range(start + n - 1, start - 1, -1))    # descending: order matters


def _run_ranks(fn: Callable[..., None], nprocs: int, args: tuple, timeout: float = 90.0) -> None:
    """spawn with a deadline: a hung rank fails the test instead of hanging CI."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):     # raises ProcessRaisedException on a rank's error
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"ranks did not finish within {timeout}s")


# --- P side ---------------------------------------------------------------------------

class PipeControl:
    """P's control channel in these tests: the record goes to D's main thread."""

    def __init__(self, conn: mpc.Connection) -> None:
        self.conn = conn

    def complete(self, reservation: worker_pb2.Reservation, record: worker_pb2.CompletionRecord,
                 timeout: float) -> kv_pb2.CompleteAck:
        self.conn.send_bytes(record.SerializeToString())
        if not self.conn.poll(timeout):
            raise TransferError("no CompleteAck")
        return kv_pb2.CompleteAck.FromString(self.conn.recv_bytes())


def _transfer(transport, caches, reservations: list[worker_pb2.Reservation]
              ) -> list[kv_pb2.CompleteAck | TransferError]:
    """Push several attempts through one transport with their sends interleaved (they
    share the per-D sender), then finish and complete each in order; an attempt whose
    finish() fails yields its TransferError (and, as in P, no Complete)."""
    handles = []
    for res in reservations:
        handles.append(transport.open(res, _req(res), res.attempt_id))
    for layer_start, layer_end in SPLITS:
        for res, h in zip(reservations, handles):
            skip = res.num_cached_tokens // LAYOUT.block_size
            src = _p_blocks(_req(res), len(res.block_ids))[skip:]
            h.send(layer_start, layer_end, gather_blocks(caches, layer_start, layer_end, src))
    acks = []
    for res, h in zip(reservations, handles):
        try:
            s = h.finish(timeout=30.0)
        except TransferError as e:
            acks.append(e)
            continue
        record = worker_pb2.CompletionRecord(
            request_id=_req(res), attempt_id=res.attempt_id, reservation_id=res.reservation_id,
            first_token_id=7, num_prompt_tokens=res.num_tokens, kv_checksum=s.checksum,
            num_chunks=s.num_chunks, kv_bytes=s.num_bytes)
        assert s.num_chunks > len(SPLITS)       # CHUNK_BYTES really split the sends
        acks.append(transport.complete(res, record, timeout=30.0))
    return acks


def _req(res: worker_pb2.Reservation) -> str:
    return res.transport_params["request_id"]   # test plumbing: D names the request


def _recv_reservations(conn: mpc.Connection, n: int) -> list[worker_pb2.Reservation]:
    return [worker_pb2.Reservation.FromString(conn.recv_bytes()) for _ in range(n)]


# --- D side ---------------------------------------------------------------------------

class DSide:
    """D's receiver, table, cache and listener, plus the reservation plumbing."""

    def __init__(self, p_ranks: list[int], device: str = "cpu") -> None:
        from kv_transfer.dist import DistKVListener
        from kv_transfer.receiver import KVReceiver
        from kv_transfer.reservations import ReservationTable
        self.caches = _caches(D_BLOCKS, seed=None, device=device)
        self.table = ReservationTable()
        self.failed: dict[str, int] = {}            # reservation_id -> KVStatus
        self.receiver = KVReceiver(self.caches, LAYOUT, COMPAT, self.table,
                                   on_complete=lambda e, r: kv_pb2.CompleteAck(ok=True, code=kv_pb2.KV_STATUS_OK),
                                   on_failed=lambda e, code, msg: self.failed.__setitem__(e.reservation_id, code))
        self.listener = DistKVListener(self.receiver, p_ranks, device=device)
        self.rank = torch.distributed.get_rank()
        # D's free blocks in a scrambled order: ids unlike P's, never shared by two
        # reservations (as D's block pool guarantees)
        self._free = torch.randperm(D_BLOCKS, generator=torch.Generator().manual_seed(1)).tolist()

    def reserve(self, request_id: str, attempt_id: int, num_blocks: int,
                cached_blocks: int = 0) -> worker_pb2.Reservation:
        ids, self._free = self._free[:num_blocks], self._free[num_blocks:]
        entry = self.table.create(request_id, attempt_id, ids, num_blocks * LAYOUT.block_size,
                                  lease_s=60.0, num_cached_blocks=cached_blocks)
        return worker_pb2.Reservation(
            reservation_id=entry.reservation_id, block_ids=ids, num_tokens=entry.num_tokens,
            compat_hash=COMPAT, attempt_id=attempt_id, transport="nccl",
            block_size=LAYOUT.block_size, num_cached_tokens=cached_blocks * LAYOUT.block_size,
            transport_params={"rank": str(self.rank), "request_id": request_id})

    def serve_completes(self, conns: list[mpc.Connection], n: int) -> None:
        done = 0
        while done < n:
            ready = mpc.wait(conns, timeout=60.0)
            assert ready, "no CompletionRecord within 60s"
            for conn in ready:
                record = worker_pb2.CompletionRecord.FromString(conn.recv_bytes())
                conn.send_bytes(self.receiver.complete(record).SerializeToString())
                done += 1

    def check_blocks(self, res: worker_pb2.Reservation, source_seed: int) -> None:
        src = _caches(P_BLOCKS, seed=source_seed)
        skip = res.num_cached_tokens // LAYOUT.block_size
        p_ids = _p_blocks(_req(res), len(res.block_ids))[skip:]
        want = gather_blocks(src, 0, LAYOUT.num_layers, p_ids)
        got = gather_blocks(self.caches, 0, LAYOUT.num_layers, list(res.block_ids)[skip:])
        assert torch.equal(got.cpu(), want), f"D's blocks differ from P's KV for {_req(res)}"


def _init(rank: int, world: int, port: int, backend: str = "gloo") -> str:
    """Join the group; returns this rank's KV device (NCCL: one GPU per rank)."""
    from kv_transfer.dist import init_kv_group
    torch.set_num_threads(1)
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    init_kv_group(backend, f"tcp://127.0.0.1:{port}", world, rank, timeout_s=60.0)  # type: ignore[arg-type]
    return device


def _pair_worker(rank: int, port: int, conn_p: mpc.Connection, conn_d: mpc.Connection,
                 backend: str) -> None:
    import torch.distributed as dist
    from kv_transfer.dist import DistTransport
    device = _init(rank, 2, port, backend)
    if rank == 0:                                       # P
        caches = _caches(P_BLOCKS, seed=100, device=device)
        transport = DistTransport(control=PipeControl(conn_p), device=device,
                                  max_chunk_bytes=CHUNK_BYTES)
        # two attempts in flight at once, one with D's prefix cache covering a block
        acks = _transfer(transport, caches, _recv_reservations(conn_p, 2))
        assert all(isinstance(a, kv_pb2.CompleteAck) and a.ok for a in acks), acks
        if backend == "nccl":       # no crc on the device path (dist.py, CRC trade-off)
            transport.close()
            dist.destroy_process_group()
            return
        # a corrupted chunk: flip one byte of the second chunk after its crc was taken
        tampered = []

        def flip(header: kv_pb2.KVChunkHeader, payload: torch.Tensor) -> torch.Tensor:
            if header.request_id == "bad" and header.chunk_index == 1:
                payload = payload.clone()
                payload.view(torch.uint8).view(-1)[5] ^= 0x10
                tampered.append(header.chunk_index)
            return payload
        transport.tamper = flip
        [bad] = _transfer(transport, caches, _recv_reservations(conn_p, 1))
        assert tampered == [1], tampered
        assert isinstance(bad, TransferError) and bad.code == kv_pb2.KV_STATUS_CORRUPT, bad
        transport.tamper = lambda h, p: p
        # the retry on the same stream still works: the bad chunk was drained
        [good] = _transfer(transport, caches, _recv_reservations(conn_p, 1))
        assert isinstance(good, kv_pb2.CompleteAck) and good.ok, good
        transport.close()
    else:                                               # D
        d = DSide(p_ranks=[0], device=device)
        first = [d.reserve("r1", 1, 5), d.reserve("r2", 1, 6, cached_blocks=1)]
        for res in first:
            conn_d.send_bytes(res.SerializeToString())
        d.serve_completes([conn_d], 2)
        for res in first:
            d.check_blocks(res, source_seed=100)
        if backend == "nccl":
            d.listener.close(timeout=10.0)
            assert not any(t.is_alive() for t in d.listener._threads)
            dist.destroy_process_group()
            return
        bad, retry = d.reserve("bad", 1, 4), d.reserve("bad", 2, 4)
        conn_d.send_bytes(bad.SerializeToString())      # P's finish() fails: no Complete
        conn_d.send_bytes(retry.SerializeToString())
        d.serve_completes([conn_d], 1)
        d.check_blocks(retry, source_seed=100)
        assert d.failed == {bad.reservation_id: kv_pb2.KV_STATUS_CORRUPT}
        d.listener.close(timeout=10.0)                  # exits on P's BYE
        assert not any(t.is_alive() for t in d.listener._threads)
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_p_to_d_over_gloo_with_corrupt_chunk() -> None:
    ctx = mp.get_context("spawn")
    p_end, d_end = ctx.Pipe()
    _run_ranks(_pair_worker, 2, (_free_port(), p_end, d_end, "gloo"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="NCCL needs two GPUs (it refuses two ranks on one)")
@pytest.mark.timeout(120)
def test_p_to_d_over_nccl() -> None:
    ctx = mp.get_context("spawn")
    p_end, d_end = ctx.Pipe()
    _run_ranks(_pair_worker, 2, (_free_port(), p_end, d_end, "nccl"))


def _fan_in_worker(rank: int, port: int, conns: list[mpc.Connection]) -> None:
    import torch.distributed as dist
    from kv_transfer.dist import DistTransport
    _init(rank, 3, port)
    attempts = 3
    if rank < 2:                                        # two P ranks, each its own seed
        caches = _caches(P_BLOCKS, seed=200 + rank)
        transport = DistTransport(control=PipeControl(conns[rank]), max_chunk_bytes=CHUNK_BYTES,
                                  peer_ranks=(2,))      # connects (PING) before any request
        reservations = _recv_reservations(conns[rank], attempts)
        for res in reservations:                        # one at a time per P, both P at once
            [ack] = _transfer(transport, caches, [res])
            assert isinstance(ack, kv_pb2.CompleteAck) and ack.ok, ack
        transport.close()
    else:                                               # D
        d = DSide(p_ranks=[0, 1])
        mine = {p: [d.reserve(f"p{p}-r{i}", 1, 3 + i) for i in range(attempts)] for p in (0, 1)}
        for p, reservations in mine.items():
            for res in reservations:
                conns[2 + p].send_bytes(res.SerializeToString())
        d.serve_completes([conns[2], conns[3]], 2 * attempts)
        for p, reservations in mine.items():
            for res in reservations:
                d.check_blocks(res, source_seed=200 + p)
        assert not d.failed, d.failed
        assert d.listener.chunks > 2 * attempts * len(SPLITS)
        d.listener.close(timeout=10.0)
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_p_ranks_into_one_d_stay_framed() -> None:
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(2)]
    conns = [pipes[0][0], pipes[1][0], pipes[0][1], pipes[1][1]]  # P0, P1, D's end for P0, P1
    _run_ranks(_fan_in_worker, 3, (_free_port(), conns))


def test_frames_round_trip_and_misframing_fails_loudly() -> None:
    from kv_transfer.dist import FRAME_BYTES, MAX_BLOCKS_PER_CHUNK, FrameKind, pack_frame, unpack_frame
    # the largest header P builds: MAX_BLOCKS_PER_CHUNK of the largest ids, long ids
    header = kv_pb2.KVChunkHeader(
        request_id="r" * 64, attempt_id=2**63, reservation_id="f" * 32, layer_start=0,
        layer_end=80, block_ids=[2**32 - 1] * MAX_BLOCKS_PER_CHUNK, dtype=kv_pb2.KV_DTYPE_BFLOAT16,
        shape=[80, 2, MAX_BLOCKS_PER_CHUNK, 16, 8, 128], chunk_index=2**31, num_chunks=2**31,
        payload_bytes=2**40, crc32c=2**32 - 1, compat_hash=2**64 - 1)
    frame = pack_frame(FrameKind.CHUNK, header)
    assert frame.dtype == torch.uint8 and frame.numel() == FRAME_BYTES
    assert unpack_frame(frame) == (FrameKind.CHUNK, header)
    assert unpack_frame(pack_frame(FrameKind.BYE)) == (FrameKind.BYE, kv_pb2.KVChunkHeader())
    with pytest.raises(ValueError, match="not a KV frame"):     # a payload read as a frame
        unpack_frame(torch.randn(FRAME_BYTES // 4).view(torch.uint8))
    with pytest.raises(TransferError, match="does not fit"):
        pack_frame(FrameKind.CHUNK, kv_pb2.KVChunkHeader(block_ids=[2**32 - 1] * 1000))


def test_transport_needs_the_group() -> None:
    import torch.distributed as dist
    from kv_transfer.dist import DistTransport
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_kv_group"):
        DistTransport(control=None)
