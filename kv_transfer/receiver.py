"""KVReceiver: D's side of every transport. It checks each chunk against the reservation
D holds, writes it straight into the reserved blocks, and verifies the completion record.

How one chunk is handled (kv.proto lists the checks; order matters only in that every
check runs before the first byte is written):

    entry = table[header.reservation_id]             missing        -> UNKNOWN_RESERVATION
    (request_id, attempt_id) == entry's              no             -> STALE_ATTEMPT
    with entry.lock:                                 (pop/fail wait for us)
        entry is live (OPEN/RECEIVED)                ended          -> STALE_ATTEMPT
        lease not expired                                           -> EXPIRED
        compat_hash == ours                                         -> INCOMPATIBLE
        layer range, dtype, shape, payload_bytes, block ids within
        the reservation's writable blocks, unique                   -> INVALID
        chunk_index == next expected (a repeat, gap or reorder)     -> CORRUPT
        blocks x layers not received before, num_chunks consistent  -> INVALID
        payload length == payload_bytes                             -> INVALID
        crc32c(payload) == header.crc32c                            -> CORRUPT
        scatter into the cache, update counters and coverage

The first failing check after the id match fails the attempt: the entry becomes FAILED
and on_failed(entry, code, message) runs once, outside the lock, so the owner can free
the blocks. UNKNOWN/STALE chunks never touch the live entry: a chunk that is not from
the live attempt must not be able to end it.

Peer-written reservations (the ipc transport): P copies the KV straight into D's blocks
through a CUDA IPC handle, so no chunk ever reaches receive(). D marks such a
reservation with expect_peer_writes(entry) when it creates it; complete() then checks
what D can still know (reservation id, request, attempt, lease, prompt token count) and
skips the chunk / byte / checksum / coverage checks, which would otherwise reject every
ipc record. P checks the lease and D's block ids itself before each copy (ipc.py). A
chunk addressed to a peer-written reservation is dropped without touching it: the two
modes never mix within one attempt.
"""
from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from kv_transfer.base import TransferError
from kv_transfer.layout import KVLayout, dtype_from_proto, scatter_blocks
from kv_transfer.reservations import (ReservationEntry, ReservationState, ReservationTable,
                                      mark_failed)
from kv_transfer.wire import Payload, check_shape, crc32c, crc32c_combine, decode_payload, tensor_bytes
from pdserve.v1 import kv_pb2, worker_pb2

logger = logging.getLogger(__name__)

OnComplete = Callable[[ReservationEntry, worker_pb2.CompletionRecord], kv_pb2.CompleteAck]
OnFailed = Callable[[ReservationEntry, int, str], None]

_OK = kv_pb2.KV_STATUS_OK


class KVReceiver:
    """Owned by the decode worker; shared by its transports' server threads.

    Callbacks run on the calling transport thread, outside every lock, at most once per
    attempt between them: on_complete(entry, record) -> CompleteAck when the record
    verifies (the worker adds the sequence to its batch), on_failed(entry, code, message)
    when a check fails here (the worker frees the blocks and pops the entry). Failures
    the worker causes itself (table.fail / table.pop) do not call back."""

    def __init__(self, kv_caches: Sequence[tuple[Tensor, Tensor]], layout: KVLayout, compat_hash: int,
                 table: ReservationTable, on_complete: OnComplete, on_failed: OnFailed,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        if KVLayout.from_caches(kv_caches) != layout:
            raise ValueError(f"layout {layout} does not describe the caches "
                             f"({KVLayout.from_caches(kv_caches)})")
        self.kv_caches = list(kv_caches)
        self.layout = layout
        self.compat_hash = compat_hash
        self.table = table
        self._on_complete = on_complete
        self._on_failed = on_failed
        self._clock = clock
        self._device = kv_caches[0][0].device
        # Reservations P writes directly (ipc). Weak: the table owns the entries, and a
        # popped entry leaves this set with it, so nothing here needs cleaning up.
        self._peer_written: weakref.WeakSet[ReservationEntry] = weakref.WeakSet()

    def expect_peer_writes(self, entry: ReservationEntry) -> None:
        """Mark `entry` as written by the peer straight into D's blocks (ipc transport):
        its Complete is verified without chunk accounting (module docstring)."""
        self._peer_written.add(entry)

    def is_peer_written(self, entry: ReservationEntry) -> bool:
        return entry in self._peer_written

    # --- chunks -------------------------------------------------------------------------

    def receive(self, header: kv_pb2.KVChunkHeader, payload: Payload | Tensor) -> tuple[int, str]:
        """Check and write one chunk; returns (KVStatus, message), message empty on OK.
        A Tensor payload (local/nccl/ipc) is already in payload layout; its crc is checked
        when header.crc32c != 0."""
        entry = self.table.get(header.reservation_id)
        if entry is None:
            return self._reject(header, kv_pb2.KV_STATUS_UNKNOWN_RESERVATION,
                                f"unknown reservation {header.reservation_id!r}")
        if (entry.request_id, entry.attempt_id) != (header.request_id, header.attempt_id):
            return self._reject(header, kv_pb2.KV_STATUS_STALE_ATTEMPT,
                                f"reservation {entry.reservation_id} is held for request "
                                f"{entry.request_id} attempt {entry.attempt_id}")
        if entry in self._peer_written:
            return self._reject(header, kv_pb2.KV_STATUS_INVALID,
                                f"reservation {entry.reservation_id} is written by the peer "
                                "(ipc); chunks are not accepted for it")
        with entry.lock:
            if not entry.live:
                return self._reject(header, kv_pb2.KV_STATUS_STALE_ATTEMPT,
                                    f"attempt already {entry.state.value}")
            try:
                self._accept(entry, header, payload)
                return _OK, ""
            except TransferError as e:
                code, message = e.code, str(e)
            except Exception as e:  # a device or allocator error while writing
                logger.exception("writing KV chunk %d of %s failed", header.chunk_index,
                                 entry.reservation_id)
                code, message = kv_pb2.KV_STATUS_UNSPECIFIED, f"write failed: {e}"
            notify = mark_failed(entry, code, message)
        if notify:
            self._notify_failed(entry, code, message)
        return code, message

    def _accept(self, entry: ReservationEntry, header: kv_pb2.KVChunkHeader,
                payload: Payload | Tensor) -> None:
        """All checks, then the write. Caller holds entry.lock; raises TransferError."""
        if self._clock() >= entry.expiry:
            raise TransferError("reservation lease expired", kv_pb2.KV_STATUS_EXPIRED)
        if header.compat_hash != self.compat_hash:
            raise TransferError(f"compat_hash {header.compat_hash:#018x} != {self.compat_hash:#018x} "
                                "(model/dtype/block size/layout/wire version differ)",
                                kv_pb2.KV_STATUS_INCOMPATIBLE)
        shape = check_shape(header, self.layout)
        mask = self._block_mask(entry, header.block_ids)
        if header.chunk_index != entry.next_chunk_index:
            # the running checksum is order-dependent: a repeated, skipped or reordered
            # chunk can never verify, so fail now rather than at Complete
            raise TransferError(f"chunk_index {header.chunk_index}, expected {entry.next_chunk_index}",
                                kv_pb2.KV_STATUS_CORRUPT)
        layers = range(header.layer_start, header.layer_end)
        for layer in layers:
            if entry.coverage.get(layer, 0) & mask:
                raise TransferError(f"chunk {header.chunk_index} repeats KV already received "
                                    f"(layer {layer})", kv_pb2.KV_STATUS_INVALID)
        declared = header.num_chunks or entry.declared_num_chunks
        if header.num_chunks and entry.declared_num_chunks not in (0, header.num_chunks):
            raise TransferError(f"num_chunks changed from {entry.declared_num_chunks} to "
                                f"{header.num_chunks}", kv_pb2.KV_STATUS_INVALID)
        if declared and header.chunk_index >= declared:
            raise TransferError(f"chunk_index {header.chunk_index} beyond num_chunks {declared}",
                                kv_pb2.KV_STATUS_INVALID)

        if isinstance(payload, Tensor):
            tensor, crc = self._check_tensor(header, payload, shape)
        else:
            tensor, crc = decode_payload(header, payload, self.layout), header.crc32c

        scatter_blocks(self.kv_caches, header.layer_start, header.layer_end, header.block_ids, tensor)

        entry.chunks_received += 1
        entry.bytes_received += header.payload_bytes
        if crc is None:
            entry.checksum_skipped = True
        else:
            entry.checksum = crc32c_combine(entry.checksum, crc, header.payload_bytes)
        entry.next_chunk_index += 1
        for layer in layers:
            entry.coverage[layer] = entry.coverage.get(layer, 0) | mask
        if header.num_chunks:
            entry.declared_num_chunks = header.num_chunks
            if header.chunk_index == header.num_chunks - 1:
                entry.state = ReservationState.RECEIVED

    @staticmethod
    def _block_mask(entry: ReservationEntry, block_ids: Sequence[int]) -> int:
        mask = 0
        for b in block_ids:
            pos = entry.block_pos.get(b)
            if pos is None:
                raise TransferError(f"block {b} is not in the reservation", kv_pb2.KV_STATUS_INVALID)
            if pos < entry.num_cached_blocks:
                raise TransferError(f"block {b} holds D's cached prefix; it is never written",
                                    kv_pb2.KV_STATUS_INVALID)
            if mask >> pos & 1:
                raise TransferError(f"block {b} named twice", kv_pb2.KV_STATUS_INVALID)
            mask |= 1 << pos
        return mask

    def _check_tensor(self, header: kv_pb2.KVChunkHeader, payload: Tensor,
                      shape: tuple[int, ...]) -> tuple[Tensor, int | None]:
        if payload.dtype != dtype_from_proto(header.dtype) or tuple(payload.shape) != shape:
            raise TransferError(f"tensor {tuple(payload.shape)} {payload.dtype} does not match its "
                                f"header {shape}", kv_pb2.KV_STATUS_INVALID)
        if header.crc32c == 0:
            # a device-to-device transport opted out of crc (it would cost a copy to host);
            # the attempt's kv_checksum is then not verified either
            return payload, None
        crc = crc32c(tensor_bytes(payload))
        if crc != header.crc32c:
            raise TransferError(f"crc32c mismatch on chunk {header.chunk_index}: got {crc:#010x}, "
                                f"header {header.crc32c:#010x}", kv_pb2.KV_STATUS_CORRUPT)
        return payload, crc

    # --- completion ---------------------------------------------------------------------

    def complete(self, record: worker_pb2.CompletionRecord) -> kv_pb2.CompleteAck:
        """Verify the record against what arrived; on success the sequence is handed to
        on_complete (once per attempt) and its ack returned."""
        entry = self.table.get(record.reservation_id)
        ids = (record.request_id, record.attempt_id)
        if entry is None:
            done = self.table.completed_attempt(record.reservation_id)
            if done is not None:
                code = kv_pb2.KV_STATUS_DUPLICATE if done == ids else kv_pb2.KV_STATUS_STALE_ATTEMPT
                return _ack(code, "reservation already completed")
            return _ack(kv_pb2.KV_STATUS_UNKNOWN_RESERVATION,
                        f"unknown reservation {record.reservation_id!r}")
        if (entry.request_id, entry.attempt_id) != ids:
            return _ack(kv_pb2.KV_STATUS_STALE_ATTEMPT, f"reservation {entry.reservation_id} is held "
                        f"for request {entry.request_id} attempt {entry.attempt_id}")
        with entry.lock:
            if entry.state is ReservationState.COMPLETED:
                return _ack(kv_pb2.KV_STATUS_DUPLICATE, "attempt already completed")
            if entry.state is ReservationState.FAILED:
                reason = entry.failure[1] if entry.failure else ""
                return _ack(kv_pb2.KV_STATUS_STALE_ATTEMPT, f"attempt already failed: {reason}")
            try:
                self._verify(entry, record)
            except TransferError as e:
                notify = mark_failed(entry, e.code, str(e))
                failed: TransferError | None = e
            else:
                entry.state = ReservationState.COMPLETED
                failed, notify = None, False
        if failed is not None:
            if notify:
                self._notify_failed(entry, failed.code, str(failed))
            return _ack(failed.code, str(failed))

        if self._device.type == "cuda":
            # chunk writes were queued by other threads; the batch must see them done
            torch.cuda.synchronize(self._device)
        try:
            return self._on_complete(entry, record)
        except Exception as e:
            logger.exception("on_complete for %s raised", entry.reservation_id)
            with entry.lock:  # the sequence did not join the batch: hand the blocks back
                entry.state = ReservationState.FAILED
                entry.failure = (kv_pb2.KV_STATUS_UNSPECIFIED, f"on_complete raised: {e}")
            self._notify_failed(entry, kv_pb2.KV_STATUS_UNSPECIFIED, f"on_complete raised: {e}")
            return _ack(kv_pb2.KV_STATUS_UNSPECIFIED, "decode worker could not start the sequence")

    def _verify(self, entry: ReservationEntry, record: worker_pb2.CompletionRecord) -> None:
        # Reservation id, request and attempt were matched by the caller.
        if self._clock() >= entry.expiry:
            raise TransferError("reservation lease expired", kv_pb2.KV_STATUS_EXPIRED)
        if entry in self._peer_written:
            # ipc: nothing was counted here; only the token count can still be checked
            self._check_tokens(entry, record)
            return
        if record.num_chunks != entry.chunks_received:
            raise TransferError(f"record says {record.num_chunks} chunks, received "
                                f"{entry.chunks_received}", kv_pb2.KV_STATUS_CORRUPT)
        if record.kv_bytes != entry.bytes_received:
            raise TransferError(f"record says {record.kv_bytes} bytes, received "
                                f"{entry.bytes_received}", kv_pb2.KV_STATUS_CORRUPT)
        if not entry.checksum_skipped and record.kv_checksum != entry.checksum:
            raise TransferError(f"kv_checksum {record.kv_checksum:#010x} != received "
                                f"{entry.checksum:#010x}", kv_pb2.KV_STATUS_CORRUPT)
        self._check_tokens(entry, record)
        want = entry.writable_mask
        missing = [l for l in range(self.layout.num_layers) if entry.coverage.get(l, 0) & want != want]
        if missing:
            raise TransferError(f"no KV received for some blocks of layers {missing[:8]}"
                                f"{'...' if len(missing) > 8 else ''}", kv_pb2.KV_STATUS_INVALID)

    @staticmethod
    def _check_tokens(entry: ReservationEntry, record: worker_pb2.CompletionRecord) -> None:
        if record.num_prompt_tokens != entry.num_tokens:
            raise TransferError(f"record has {record.num_prompt_tokens} prompt tokens, reservation "
                                f"{entry.num_tokens}", kv_pb2.KV_STATUS_INVALID)

    # --- failure ------------------------------------------------------------------------

    def fail(self, reservation_id: str, code: int, reason: str) -> bool:
        """For transports that detect a failure outside receive() (a recv timeout, a
        broken process group): fail the attempt and notify on_failed once."""
        entry = self.table.get(reservation_id)
        if entry is None:
            return False
        with entry.lock:
            notify = mark_failed(entry, code, reason)
        if notify:
            self._notify_failed(entry, code, reason)
        return notify

    def _notify_failed(self, entry: ReservationEntry, code: int, message: str) -> None:
        logger.warning("KV attempt failed: request %s attempt %d reservation %s: %s (%s)",
                       entry.request_id, entry.attempt_id, entry.reservation_id, message,
                       kv_pb2.KVStatus.Name(code))
        try:
            self._on_failed(entry, code, message)
        except Exception:
            logger.exception("on_failed for %s raised", entry.reservation_id)

    @staticmethod
    def _reject(header: kv_pb2.KVChunkHeader, code: int, message: str) -> tuple[int, str]:
        logger.info("dropped KV chunk %d of request %s attempt %d: %s", header.chunk_index,
                    header.request_id, header.attempt_id, message)
        return code, message


def _ack(code: int, error: str) -> kv_pb2.CompleteAck:
    return kv_pb2.CompleteAck(ok=False, code=code, error=error)
