"""The `ipc` KV transport: P copies KV straight into D's cache through a CUDA IPC handle
(same GPU, or GPUs of one host with peer access). CUDA only.

How this works
--------------
1. D exports its cache once per consumer: `export_cache_handles(kv_caches) -> bytes`, a
   small JSON document (never pickle) that a Ray call carries to P (P looks D up by its
   actor name when it first sees one of D's reservations and calls
   DecodeWorker.cache_handles; see PrefillWorker._attach_ipc). It holds the fields
   of `torch.multiprocessing.reductions.reduce_tensor`'s answer for each exported tensor:
   geometry, dtype, and the CUDA IPC memory / ref-counter / event handles (base64).
   D's cache is normally one buffer [layers, 2, blocks, bs, Hkv, D] whose per-layer
   (k, v) are views (pdserve.model.llama.allocate_kv_caches); then only that buffer is
   exported and P writes a whole layer range with one index_copy_.
2. P rebuilds the tensors with `rebuild_cuda_tensor` (the rebuild function reduce_tensor
   names; never a function named by the blob) on its own index of D's GPU, found by
   UUID: Ray gives each actor its own CUDA_VISIBLE_DEVICES, so indices differ per process.
3. send(layer_start, layer_end, kv) validates the payload and D's block ids, then
   index_copy_s it into D's blocks on P's current stream, after the kernels that
   produced kv. finish() waits for the last copy: when it returns, the KV is in D's memory.
4. complete() sends the CompletionRecord over the control transport (gRPC Complete).

A restarted D (Ray restarts a dead actor under the same name) has a new cache in a new
process; handles P opened on the old one point at memory no D reads any more. Every
export therefore carries the id of D's cache (a random id D draws when it starts), and
each of D's ipc reservations names it (transport_params[CACHE_ID_PARAM]). P copies only
into a cache whose id the reservation names: on a mismatch it fetches D's export again
(PrefillWorker._attach_ipc) or refuses the transfer, never writing into a stale cache.

What D cannot check here: no chunk passes through D's KVReceiver, so its per-chunk
checks (attempt id, lease, block ownership) run on P instead (lease and block ids from
the reservation), and the record carries num_chunks = 0 and kv_checksum = 0. D marks
ipc reservations as written by the peer (KVReceiver.expect_peer_writes), so its Complete
checks identity, lease and token count only. P's lease check uses the expiry in its copy
of the reservation, which D may since have renewed: P is conservative, never late.
D must not hand a released ipc reservation's blocks to another request before its lease
has expired: a P that has not yet seen the release could still be copying into them.
"""
from __future__ import annotations

import base64
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor

from kv_transfer.base import KVSendHandle, KVTransport, SendSummary, TransferError, register
from kv_transfer.layout import single_buffer
from pdserve.host_copy import to_device
from pdserve.v1 import kv_pb2, worker_pb2

if TYPE_CHECKING:
    from kv_transfer.dist import ControlChannel

logger = logging.getLogger(__name__)

IPC_FORMAT = "pdserve-ipc-v1"
CACHE_ID_PARAM = "ipc_cache_id"     # Reservation.transport_params key: the cache D exported
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_BYTES_FIELDS = ("handle", "ref_counter_handle", "event_handle")
_FIELDS = frozenset(("size", "stride", "offset", "storage_cls", "dtype", "device",
                     "storage_size_bytes", "storage_offset_bytes", "ref_counter_offset",
                     "event_sync_required", *_BYTES_FIELDS))


def _b64(b: bytes | None) -> str | None:
    return None if b is None else base64.b64encode(b).decode()


def _unb64(s: str | None) -> bytes | None:
    return None if s is None else base64.b64decode(s)


def _gpu_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _describe(t: Tensor) -> dict[str, Any]:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor
    fn, args = reduce_tensor(t)
    if fn is not rebuild_cuda_tensor:
        raise ValueError(f"not a CUDA tensor (device {t.device}); the ipc transport exports CUDA caches")
    (_cls, size, stride, offset, storage_cls, dtype, device, handle, storage_bytes, storage_offset,
     _grad, ref_handle, ref_offset, event_handle, event_sync) = args
    return {"size": list(size), "stride": list(stride), "offset": offset,
            "storage_cls": storage_cls.__name__, "dtype": str(dtype).removeprefix("torch."),
            "device": device, "handle": _b64(handle), "storage_size_bytes": storage_bytes,
            "storage_offset_bytes": storage_offset, "ref_counter_handle": _b64(ref_handle),
            "ref_counter_offset": ref_offset, "event_handle": _b64(event_handle),
            "event_sync_required": bool(event_sync)}


def export_cache_handles(kv_caches: Sequence[tuple[Tensor, Tensor]], cache_id: str = "") -> bytes:
    """D side: describe its CUDA KV caches for one consumer (each call takes a fresh IPC
    ref count, so call it once per P). D keeps the caches alive while P uses them.
    cache_id: this cache's id (see the module note), repeated in D's reservations."""
    if not kv_caches:
        raise ValueError("no KV caches to export")
    base = single_buffer(kv_caches)
    tensors = [base] if base is not None else [t for kv in kv_caches for t in kv]
    doc = {"format": IPC_FORMAT, "gpu_uuid": _gpu_uuid(tensors[0].device.index or 0),
           "num_layers": len(kv_caches), "single_buffer": base is not None,
           "cache_id": cache_id, "tensors": [_describe(t) for t in tensors]}
    return json.dumps(doc).encode()


def decode_handles(blob: bytes) -> dict[str, Any]:
    """Parse and validate an export (no CUDA needed); ValueError if malformed."""
    try:
        doc = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not a pdserve IPC export: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != IPC_FORMAT:
        raise ValueError(f"not a {IPC_FORMAT} export")
    tensors = doc.get("tensors")
    want = 1 if doc.get("single_buffer") else 2 * int(doc.get("num_layers", 0))
    if not isinstance(tensors, list) or not tensors or len(tensors) != want:
        raise ValueError(f"export lists {len(tensors or [])} tensors, expected {want}")
    if not isinstance(doc.get("cache_id", ""), str):
        raise ValueError("cache_id must be a string")
    for t in tensors:
        if not isinstance(t, dict) or not all(k in t for k in _FIELDS):
            raise ValueError(f"tensor entry lacks fields {sorted(_FIELDS)}")
        if t.get("dtype") not in _DTYPES or t.get("storage_cls") not in ("TypedStorage", "UntypedStorage"):
            raise ValueError(f"unsupported tensor entry: dtype {t.get('dtype')}, "
                             f"storage {t.get('storage_cls')}")
    return doc


def _local_index(uuid: str) -> int:
    for i in range(torch.cuda.device_count()):
        if _gpu_uuid(i) == uuid:
            return i
    raise TransferError(f"D's GPU {uuid} is not visible to this process (CUDA_VISIBLE_DEVICES); "
                        "the ipc transport needs P and D on one host", kv_pb2.KV_STATUS_INCOMPATIBLE)


def _rebuild(entry: dict[str, Any], device: int) -> Tensor:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor
    storage_cls = getattr(torch.storage, entry["storage_cls"])   # allow-listed in decode_handles
    b = {k: _unb64(entry[k]) for k in _BYTES_FIELDS}
    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size(entry["size"]), tuple(entry["stride"]), entry["offset"],
        storage_cls, _DTYPES[entry["dtype"]], device, b["handle"], entry["storage_size_bytes"],
        entry["storage_offset_bytes"], False, b["ref_counter_handle"], entry["ref_counter_offset"],
        b["event_handle"], entry["event_sync_required"])


@dataclass
class RemoteCache:
    """D's cache as seen from P. `base` [L, 2, N, bs, Hkv, D] when D exported one buffer."""
    base: Tensor | None
    layers: list[tuple[Tensor, Tensor]]
    cache_id: str = ""

    @property
    def device(self) -> torch.device:
        return self.layers[0][0].device

    def copy_in(self, layer_start: int, layer_end: int, ids: Tensor, kv: Tensor) -> None:
        # kv: [layer_end - layer_start, 2, len(ids), bs, Hkv, D] on self.device; ids: int64
        if self.base is not None:
            self.base[layer_start:layer_end].index_copy_(2, ids, kv)
            return
        for i, layer in enumerate(range(layer_start, layer_end)):
            k, v = self.layers[layer]
            k.index_copy_(0, ids, kv[i, 0])
            v.index_copy_(0, ids, kv[i, 1])


def import_cache_handles(blob: bytes) -> RemoteCache:
    """P side: open D's exported caches in this process."""
    doc = decode_handles(blob)
    if not torch.cuda.is_available():
        raise RuntimeError("ipc transport needs CUDA")
    device = _local_index(doc["gpu_uuid"])
    tensors = [_rebuild(e, device) for e in doc["tensors"]]
    cache_id = doc.get("cache_id", "")
    if doc["single_buffer"]:
        base = tensors[0]
        return RemoteCache(base, [(base[l, 0], base[l, 1]) for l in range(base.shape[0])], cache_id)
    return RemoteCache(None, [(tensors[2 * l], tensors[2 * l + 1]) for l in range(doc["num_layers"])],
                       cache_id)


class RemoteCaches:
    """The decode workers' caches this P has opened: one per decode worker id, the latest
    export. get(reservation) returns the cache the reservation names, fetching D's export
    again (`fetch`) when the open one has another cache id (D restarted)."""

    def __init__(self, fetch: Callable[[worker_pb2.Reservation], RemoteCache] | None = None) -> None:
        self._fetch = fetch
        self._caches: dict[str, RemoteCache] = {}
        self._lock = threading.Lock()

    def attach(self, decode_worker_id: str, cache: RemoteCache) -> None:
        """Replaces an earlier cache of that worker (its handles close once unused)."""
        with self._lock:
            self._caches[decode_worker_id] = cache

    def cache_id(self, decode_worker_id: str) -> str | None:
        """The id of the cache open for that worker; None if none is."""
        with self._lock:
            cache = self._caches.get(decode_worker_id)
        return None if cache is None else cache.cache_id

    def get(self, reservation: worker_pb2.Reservation) -> RemoteCache:
        wid = reservation.decode_worker_id
        want = reservation.transport_params.get(CACHE_ID_PARAM, "")
        with self._lock:
            cache = self._caches.get(wid)
        if cache is not None and cache.cache_id == want:
            return cache
        if self._fetch is None:
            raise TransferError(
                f"no IPC handles for {wid!r}'s cache {want!r}"
                + (f" (the open one is {cache.cache_id!r}: {wid} restarted?)" if cache else "")
                + "; attach its export first", kv_pb2.KV_STATUS_UNKNOWN_RESERVATION)
        fresh = self._fetch(reservation)
        if fresh.cache_id != want:
            raise TransferError(f"{wid!r} exported cache {fresh.cache_id!r}, but the reservation "
                                f"names {want!r} (it restarted since)", kv_pb2.KV_STATUS_UNKNOWN_RESERVATION)
        self.attach(wid, fresh)
        return fresh

    def clear(self) -> None:
        with self._lock:
            self._caches.clear()


class IpcSendHandle(KVSendHandle):
    """One attempt: copies each send() into D's blocks on the caller's current stream."""

    def __init__(self, cache: RemoteCache, reservation: worker_pb2.Reservation) -> None:
        from kv_transfer.wire import target_block_ids
        self._cache = cache
        ids = target_block_ids(reservation)
        num_blocks = cache.layers[0][0].shape[0]
        if len(set(ids)) != len(ids) or any(not 0 <= b < num_blocks for b in ids):
            # index_copy_ with repeated or out-of-range ids would corrupt or fault
            raise TransferError(f"reservation block ids {ids[:8]}... are not unique ids below "
                                f"{num_blocks}", kv_pb2.KV_STATUS_INVALID)
        # non_blocking: no stream sync on the caller's (asyncio) thread, see layout.block_index
        self._ids = to_device(ids, torch.long, cache.device)
        self._lease_ms = reservation.lease_expiry_unix_ms
        self._event: torch.cuda.Event | None = None
        self._bytes = 0
        self._error: TransferError | None = None
        self._aborted = self._finished = False

    def send(self, layer_start: int, layer_end: int, kv: Tensor) -> None:
        if self._finished:
            raise RuntimeError("send() after finish()")
        if self._aborted or self._error is not None or self._ids.numel() == 0:
            return
        if self._lease_ms and time.time() * 1000 > self._lease_ms:
            # D may already have given the blocks to someone else: never write then
            self._error = TransferError("reservation lease expired before the KV was copied",
                                        kv_pb2.KV_STATUS_EXPIRED)
            return
        k0 = self._cache.layers[0][0]
        want = (layer_end - layer_start, 2, self._ids.numel(), *k0.shape[1:])
        if not 0 <= layer_start < layer_end <= len(self._cache.layers):
            raise ValueError(f"bad layer range [{layer_start}, {layer_end})")
        if tuple(kv.shape) != want or kv.dtype != k0.dtype:
            raise ValueError(f"kv {tuple(kv.shape)} {kv.dtype} does not match D's cache: "
                             f"{want} {k0.dtype}")
        self._cache.copy_in(layer_start, layer_end, self._ids, kv.to(self._cache.device))
        self._event = torch.cuda.Event()
        self._event.record(torch.cuda.current_stream(self._cache.device))  # where the copy ran
        self._bytes += kv.numel() * kv.element_size()

    def finish(self, timeout: float) -> SendSummary:
        # A device copy has no timeout of its own: a few ms for any prompt's KV.
        if self._event is not None:
            self._event.synchronize()   # every copy before it, on the sending stream, is done
        self._finished = True
        if self._error is not None:
            raise self._error
        if self._aborted:
            raise TransferError("transfer aborted")
        return SendSummary(num_chunks=0, checksum=0, num_bytes=self._bytes)

    def abort(self) -> None:
        self._aborted = True


@register("ipc")
class IpcTransport(KVTransport):
    """P side of the ipc transport. D's export comes from attach() (after P fetched it
    with a Ray call) or, lazily, from `fetch_handles(reservation)`; the cache is opened
    once per decode worker and cache id, and kept until D's next export or close()."""
    name = "ipc"
    # A device copy of a whole prompt's KV takes microseconds: P sends it once, after
    # the forward pass, rather than one chunk per layer (16-32 gathers and copies whose
    # host launches would lengthen the prefill step itself).
    layerwise = False

    def __init__(self, control: ControlChannel | None = None, *,
                 fetch_handles: Callable[[worker_pb2.Reservation], bytes] | None = None) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("ipc transport needs CUDA: torch.cuda.is_available() is False in "
                               "this process; use the nccl (gloo on CPU) or grpc transport")
        self._control = control
        self._caches = RemoteCaches(
            None if fetch_handles is None
            else lambda res: self._open(res.decode_worker_id, fetch_handles(res)))

    @staticmethod
    def _open(decode_worker_id: str, handles: bytes) -> RemoteCache:
        cache = import_cache_handles(handles)
        logger.info("opened KV cache %s of %s over CUDA IPC (%d layers, %s)", cache.cache_id,
                    decode_worker_id, len(cache.layers), cache.device)
        return cache

    def attach(self, decode_worker_id: str, handles: bytes) -> None:
        self._caches.attach(decode_worker_id, self._open(decode_worker_id, handles))

    def cache_id(self, decode_worker_id: str) -> str | None:
        """The id of the cache open for that decode worker (None: none is)."""
        return self._caches.cache_id(decode_worker_id)

    def open(self, reservation: worker_pb2.Reservation, request_id: str,
             attempt_id: int) -> KVSendHandle:
        if reservation.attempt_id and reservation.attempt_id != attempt_id:
            raise TransferError(f"reservation serves attempt {reservation.attempt_id}, not {attempt_id}",
                                kv_pb2.KV_STATUS_STALE_ATTEMPT)
        return IpcSendHandle(self._caches.get(reservation), reservation)

    def complete(self, reservation: worker_pb2.Reservation, record: worker_pb2.CompletionRecord,
                 timeout: float) -> kv_pb2.CompleteAck:
        if self._control is None:
            raise TransferError("ipc transport has no control channel for Complete")
        return self._control.complete(reservation, record, timeout)

    def close(self) -> None:
        self._caches.clear()
        torch.cuda.ipc_collect()    # release the IPC ref counts D waits on
