"""The `local` transport: P and D in one process (tests, the colocated role). Chunks go
through the same planning, numbering and crc as on the wire, but the payload stays a
tensor and receive() runs synchronously in send()."""
from __future__ import annotations

import logging
import threading

from torch import Tensor

from kv_transfer.base import (MAX_CHUNK_BYTES, KVSendHandle, KVTransport, SendSummary, TransferError,
                              register)
from kv_transfer.receiver import KVReceiver
from kv_transfer.wire import SendLedger, header_base, plan_chunks, target_block_ids
from pdserve.v1 import kv_pb2, worker_pb2

logger = logging.getLogger(__name__)

_Chunk = tuple[kv_pb2.KVChunkHeader, Tensor]


@register("local")
class LocalTransport(KVTransport):
    """Endpoints are names bound to in-process receivers (no global registry: whoever
    builds the pair binds D's receiver into P's transport)."""
    name = "local"

    def __init__(self, max_chunk_bytes: int = MAX_CHUNK_BYTES, checksum: bool = True) -> None:
        if max_chunk_bytes < 1:
            raise ValueError(f"max_chunk_bytes must be >= 1, got {max_chunk_bytes}")
        self.max_chunk_bytes = max_chunk_bytes
        # crc costs a host pass over the KV; on a GPU colocated pair the copy is all the
        # integrity there is to check, so a caller may turn it off
        self.checksum = checksum
        self._lock = threading.Lock()
        self._receivers: dict[str, KVReceiver] = {}

    def bind(self, endpoint: str, receiver: KVReceiver) -> None:
        with self._lock:
            self._receivers[endpoint] = receiver

    def unbind(self, endpoint: str) -> None:
        with self._lock:
            self._receivers.pop(endpoint, None)

    def _receiver(self, endpoint: str) -> KVReceiver:
        with self._lock:
            receiver = self._receivers.get(endpoint)
        if receiver is None:
            raise TransferError(f"no local receiver bound at {endpoint!r}")
        return receiver

    def open(self, reservation: worker_pb2.Reservation, request_id: str,
             attempt_id: int) -> KVSendHandle:
        return _LocalSendHandle(self, self._receiver(reservation.endpoint), reservation,
                                request_id, attempt_id)

    def complete(self, reservation: worker_pb2.Reservation, record: worker_pb2.CompletionRecord,
                 timeout: float) -> kv_pb2.CompleteAck:
        return self._receiver(reservation.endpoint).complete(record)

    def close(self) -> None:
        with self._lock:
            self._receivers.clear()


class _LocalSendHandle(KVSendHandle):
    def __init__(self, transport: LocalTransport, receiver: KVReceiver,
                 reservation: worker_pb2.Reservation, request_id: str, attempt_id: int) -> None:
        self._t = transport
        self._receiver = receiver
        self._base = header_base(reservation, request_id, attempt_id)
        self._block_ids = target_block_ids(reservation)
        self._ledger: SendLedger[_Chunk] = SendLedger(lambda c: c[0])
        self._error: TransferError | None = None
        self._aborted = False
        self._summary: SendSummary | None = None

    def send(self, layer_start: int, layer_end: int, kv: Tensor) -> None:
        if self._summary is not None:
            raise RuntimeError("send() after finish()")
        if self._aborted or self._error is not None:
            return  # finish() reports it
        chunks = plan_chunks(self._base, layer_start, layer_end, self._block_ids, kv,
                             self._ledger.next_index, self._t.max_chunk_bytes, self._t.checksum)
        self._deliver(self._ledger.push(chunks))

    def _deliver(self, chunks: list[_Chunk]) -> None:
        for header, payload in chunks:
            if self._error is not None:
                return
            code, message = self._receiver.receive(header, payload)
            if code != kv_pb2.KV_STATUS_OK:
                self._error = TransferError(message, code)

    def finish(self, timeout: float) -> SendSummary:
        if self._summary is not None:
            return self._summary
        if self._aborted:
            raise TransferError("transfer aborted")
        held = self._ledger.finish()
        if held is not None:
            self._deliver([held])
        if self._error is not None:
            raise self._error
        self._summary = self._ledger.summary()
        return self._summary

    def abort(self) -> None:
        self._aborted = True
