"""The ipc transport: CUDA IPC of D's cache into P's process (two processes, one GPU),
and its clear refusal on a machine without CUDA."""
from __future__ import annotations

import multiprocessing.connection as mpc
import time

import pytest
import torch
import torch.multiprocessing as mp

from pdserve.v1 import worker_pb2

L, BS, H, D, N_D, N_P = 4, 16, 2, 64, 40, 24
DTYPE = torch.bfloat16
D_IDS = [31, 2, 17, 8, 39, 0, 23, 11]      # D's 8 reserved blocks (unlike P's)
P_IDS = [5, 6, 7, 0, 1, 2, 3, 4]
SPLITS = [(0, 1), (1, 4)]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _source(device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    kv = torch.randn(L, 2, N_P, BS, H, D, generator=g).to(DTYPE).to(device)
    return [(kv[l, 0], kv[l, 1]) for l in range(L)]


CACHE_KINDS = ("token", "head", "separate")


def _d_caches(kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if kind == "token":     # as pdserve.model.llama.allocate_kv_caches lays it out
        kv = torch.zeros(L, 2, N_D, BS, H, D, dtype=DTYPE, device="cuda")
        return [(kv[l, 0], kv[l, 1]) for l in range(L)]
    if kind == "head":      # allocate_kv_caches(layout="head"): [.., Hkv, BS, D] memory order
        kv = torch.zeros(L, 2, N_D, H, BS, D, dtype=DTYPE, device="cuda").transpose(3, 4)
        return [(kv[l, 0], kv[l, 1]) for l in range(L)]
    return [(torch.zeros(N_D, BS, H, D, dtype=DTYPE, device="cuda"),
             torch.zeros(N_D, BS, H, D, dtype=DTYPE, device="cuda")) for _ in range(L)]


def _reservation(**extra) -> worker_pb2.Reservation:
    return worker_pb2.Reservation(reservation_id="res", decode_worker_id="decode-0",
                                  block_ids=D_IDS, num_tokens=len(D_IDS) * BS, attempt_id=1,
                                  block_size=BS, transport="ipc",
                                  lease_expiry_unix_ms=int(time.time() * 1000) + 60_000, **extra)


def _worker(rank: int, conn_p: mpc.Connection, conn_d: mpc.Connection) -> None:
    from kv_transfer.ipc import IpcTransport, export_cache_handles
    from kv_transfer.layout import gather_blocks
    if rank == 1:                                           # D: export, wait, compare
        for kind in CACHE_KINDS:
            caches = _d_caches(kind)
            blob = export_cache_handles(caches)
            assert (b'"single_buffer": true' in blob) == (kind != "separate")
            conn_d.send_bytes(blob)
            assert conn_d.recv_bytes() == b"copied"
            want = gather_blocks(_source("cuda"), 0, L, P_IDS)
            got = gather_blocks(caches, 0, L, D_IDS)
            assert torch.equal(got, want), f"{kind} cache: D's blocks differ"
            untouched = [b for b in range(N_D) if b not in D_IDS]
            assert not gather_blocks(caches, 0, L, untouched).any(), "wrote outside the reservation"
            conn_d.send_bytes(b"checked")
        return
    src = _source("cuda")                                   # P
    for _kind in CACHE_KINDS:
        transport = IpcTransport()
        transport.attach("decode-0", conn_p.recv_bytes())
        handle = transport.open(_reservation(), "req", 1)
        for ls, le in SPLITS:
            handle.send(ls, le, gather_blocks(src, ls, le, P_IDS))
        summary = handle.finish(timeout=10.0)
        assert summary.num_bytes == L * 2 * len(D_IDS) * BS * H * D * 2
        _p_done(conn_p, transport)


def _p_done(conn_p: mpc.Connection, transport) -> None:   # type: ignore[no-untyped-def]
    """P's end of a round: tell D the copy is done, wait for D's check, close."""
    conn_p.send_bytes(b"copied")
    assert conn_p.recv_bytes() == b"checked"
    transport.close()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.timeout(120)
def test_two_processes_one_gpu_copy_into_d_blocks() -> None:
    _run_pair(_worker)


def _run_pair(worker) -> None:   # type: ignore[no-untyped-def]
    """worker(rank, p's end, d's end) in two spawned processes: rank 0 is P, rank 1 D."""
    p_end, d_end = mp.get_context("spawn").Pipe()
    mp.start_processes(worker, args=(p_end, d_end), nprocs=2, start_method="spawn")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_constructor_refuses_without_cuda() -> None:
    from kv_transfer.ipc import IpcTransport
    with pytest.raises(RuntimeError, match="ipc transport needs CUDA"):
        IpcTransport()


def test_export_format_is_validated() -> None:
    from kv_transfer.ipc import decode_handles
    for junk in (b"\x80\x04pickle", b"{}", b'{"format": "pdserve-ipc-v1", "tensors": []}',
                 b'{"format": "pdserve-ipc-v1", "num_layers": 1, "single_buffer": true,'
                 b' "tensors": [{"dtype": "int64", "storage_cls": "TypedStorage"}]}'):
        with pytest.raises(ValueError):
            decode_handles(junk)


def _restart_worker(rank: int, conn_p: mpc.Connection, conn_d: mpc.Connection) -> None:
    """D exports its cache as "first", then a second cache as "second" (what a restarted
    D would export); P holds the first open when a reservation names the second."""
    from kv_transfer.ipc import CACHE_ID_PARAM, IpcTransport, export_cache_handles
    from kv_transfer.layout import gather_blocks
    if rank == 1:
        first, second = _d_caches("head"), _d_caches("head")
        conn_d.send_bytes(export_cache_handles(first, "first"))
        conn_d.send_bytes(export_cache_handles(second, "second"))
        assert conn_d.recv_bytes() == b"copied"
        assert torch.equal(gather_blocks(second, 0, L, D_IDS), gather_blocks(_source("cuda"), 0, L, P_IDS))
        assert not gather_blocks(first, 0, L, list(range(N_D))).any(), "wrote into the stale cache"
        conn_d.send_bytes(b"checked")
        return
    src = _source("cuda")
    first_blob, second_blob = conn_p.recv_bytes(), conn_p.recv_bytes()
    transport = IpcTransport(fetch_handles=lambda res: second_blob)
    transport.attach("decode-0", first_blob)
    assert transport.cache_id("decode-0") == "first"
    handle = transport.open(_reservation(transport_params={CACHE_ID_PARAM: "second"}), "req", 1)
    assert transport.cache_id("decode-0") == "second"
    handle.send(0, L, gather_blocks(src, 0, L, P_IDS))
    handle.finish(timeout=10.0)
    _p_done(conn_p, transport)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.timeout(120)
def test_a_reservation_naming_a_new_cache_never_writes_into_the_old_one() -> None:
    _run_pair(_restart_worker)


def test_a_restarted_decode_worker_is_never_written_through_stale_handles() -> None:
    """P's table of opened caches (CPU stand-ins for D's tensors): a reservation naming
    another cache id than the open one (D restarted under the same name) gets D's export
    fetched again; with no way to fetch, or when D has moved on again, it is refused."""
    from kv_transfer.base import TransferError
    from kv_transfer.ipc import CACHE_ID_PARAM, RemoteCache, RemoteCaches

    def cache(cache_id: str) -> RemoteCache:
        return RemoteCache(None, [(torch.zeros(2, 4), torch.zeros(2, 4))], cache_id)

    def res(cache_id: str) -> worker_pb2.Reservation:
        return worker_pb2.Reservation(reservation_id=cache_id, decode_worker_id="decode-0",
                                      transport_params={CACHE_ID_PARAM: cache_id})
    old, new = cache("old"), cache("new")
    fetched: list[str] = []

    def fetch(r: worker_pb2.Reservation) -> RemoteCache:
        fetched.append(r.reservation_id)
        return new
    caches = RemoteCaches(fetch)
    caches.attach("decode-0", old)
    assert caches.get(res("old")) is old and fetched == []
    assert caches.get(res("new")) is new and fetched == ["new"]
    assert caches.cache_id("decode-0") == "new" and caches.get(res("new")) is new
    with pytest.raises(TransferError, match="restarted"):
        caches.get(res("newer"))          # the export fetched is not the one named
    assert caches.cache_id("decode-0") == "new"
    bare = RemoteCaches()
    bare.attach("decode-0", old)
    with pytest.raises(TransferError, match="restarted"):
        bare.get(res("new"))
    assert bare.cache_id("unknown") is None
