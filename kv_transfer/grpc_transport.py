"""The `grpc` transport: KVTransfer.Push (a client stream of byte chunks) and
KVTransfer.Complete, between any two hosts.

D side: serve_kv() runs a threaded (sync API) gRPC server beside the decode worker's
asyncio loop; KVTransferServicer is a thin shell over KVReceiver.

P side, one attempt:

    send() ── encode (crc) ──▶ queue.Queue(maxsize=8) ──▶ gRPC's request-consumer thread
                               │ full: send() blocks     ──▶ Push stream ──▶ D
    finish(timeout) ── last chunk (num_chunks set), end marker, wait for the KVPushAck

The bounded queue is the backpressure: when D writes slowly, P's send() waits instead of
piling chunks up in memory (at most queue size x 4 MiB per attempt). A send blocked for
longer than send_timeout_s cancels the call, so a stalled D can never hang P.
"""
from __future__ import annotations

import hmac
import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import TypeVar

import grpc
from torch import Tensor

from kv_transfer.base import (MAX_CHUNK_BYTES, KVSendHandle, KVTransport, SendSummary, TransferError,
                              register)
from kv_transfer.malloc import use_heap_for_chunks
from kv_transfer.receiver import KVReceiver
from kv_transfer.wire import (OutChunk, SendLedger, WireChunk, encode_chunks, header_base, parse_chunk,
                             target_block_ids)
from pdserve.v1 import kv_pb2, kv_pb2_grpc, worker_pb2

logger = logging.getLogger(__name__)

T = TypeVar("T")

SECRET_METADATA_KEY = "x-pdserve-secret"
_HEADROOM = 64 * 1024


def channel_options(max_chunk_bytes: int = MAX_CHUNK_BYTES) -> list[tuple[str, int]]:
    """Both ends: a chunk is a payload of at most max_chunk_bytes plus a header (ids, block
    ids, shape: a few KiB at most). gRPC's default 4 MiB receive limit would refuse a full
    4 MiB chunk, so allow the chunk plus 64 KiB; no more, so that a peer cannot make the
    other side buffer an arbitrarily large message."""
    limit = max_chunk_bytes + _HEADROOM
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


# Server keepalive: a Push whose sender stalls (SIGSTOP, half-open TCP) would otherwise pin
# one of D's few server threads until the sender's deadline. A ping unanswered for 5 s
# closes the connection and ends the handler; 10 s between pings is negligible traffic.
_SERVER_KEEPALIVE = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000)]


def _code_of(e: grpc.RpcError) -> int:
    code = e.code() if hasattr(e, "code") else None
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return kv_pb2.KV_STATUS_UNAUTHENTICATED
    return kv_pb2.KV_STATUS_UNSPECIFIED


def _describe(e: grpc.RpcError) -> str:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    return f"{code.name if code else 'RPC error'}: {details}"


# --- D side ---------------------------------------------------------------------------

class KVTransferServicer(kv_pb2_grpc.KVTransferServicer):
    def __init__(self, receiver: KVReceiver, secret: str | None) -> None:
        self._receiver = receiver
        self._secret = secret.encode() if secret else None

    def _authenticate(self, context: grpc.ServicerContext) -> None:
        """Abort with UNAUTHENTICATED (raises) unless the call carries the secret."""
        if self._secret is None:
            return
        given = b""
        for key, value in context.invocation_metadata():
            if key == SECRET_METADATA_KEY:
                given = value if isinstance(value, bytes) else value.encode()
        if not hmac.compare_digest(given, self._secret):  # constant time: no timing oracle
            logger.warning("KV call from %s without a valid shared secret", context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong x-pdserve-secret")

    def Push(self, request_iterator: Iterator[kv_pb2.KVChunk | WireChunk],
             context: grpc.ServicerContext) -> kv_pb2.KVPushAck:
        self._authenticate(context)  # before reading any chunk
        accepted, nbytes = 0, 0
        for chunk in read_ahead(request_iterator, _READ_AHEAD):
            payload = chunk.payload  # once: on a protobuf KVChunk each access copies
            code, message = self._receiver.receive(chunk.header, payload)
            if code != kv_pb2.KV_STATUS_OK:
                # stop reading: the attempt has failed; returning ends the stream
                return kv_pb2.KVPushAck(accepted_chunks=accepted, accepted_bytes=nbytes,
                                        error=message, code=code)
            accepted += 1
            nbytes += len(payload)
        return kv_pb2.KVPushAck(accepted_chunks=accepted, accepted_bytes=nbytes, code=kv_pb2.KV_STATUS_OK)

    def Complete(self, request: worker_pb2.CompletionRecord,
                 context: grpc.ServicerContext) -> kv_pb2.CompleteAck:
        self._authenticate(context)
        return self._receiver.complete(request)


_READ_AHEAD = 2
_STOP = object()


def read_ahead(iterator: Iterator[T], depth: int) -> Iterator[T]:
    """Iterate `iterator` on a helper thread, up to `depth` items ahead of the consumer.
    D's Push handler uses it so that gRPC delivers the next chunk while this thread
    checks and writes the current one (crc32c and the cache copy release the GIL).
    Exceptions from the iterator are re-raised here, in order. When the consumer stops
    early (a refused chunk ends the call), the helper stops at its next item: gRPC
    ends the request iterator when the handler returns."""
    items: queue.Queue[object] = queue.Queue(maxsize=depth)
    stopped = threading.Event()

    def offer(item: object) -> bool:
        while not stopped.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the consumer has gone

    def pump() -> None:
        try:
            for item in iterator:
                if not offer(item):
                    return
            offer(_STOP)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            offer(e)

    threading.Thread(target=pump, name="pdserve-kv-read", daemon=True).start()
    try:
        while True:
            item = items.get()
            if item is _STOP:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stopped.set()


def _handlers(servicer: KVTransferServicer) -> grpc.GenericRpcHandler:
    """The generated registration, except that Push parses chunks with parse_chunk
    (payload as a zero-copy view) instead of KVChunk.FromString."""
    return grpc.method_handlers_generic_handler("pdserve.v1.KVTransfer", {
        "Push": grpc.stream_unary_rpc_method_handler(
            servicer.Push, request_deserializer=parse_chunk,
            response_serializer=kv_pb2.KVPushAck.SerializeToString),
        "Complete": grpc.unary_unary_rpc_method_handler(
            servicer.Complete, request_deserializer=worker_pb2.CompletionRecord.FromString,
            response_serializer=kv_pb2.CompleteAck.SerializeToString),
    })


def serve_kv(receiver: KVReceiver, host: str, port: int = 0, secret: str | None = None,
             max_workers: int = 64, max_chunk_bytes: int = MAX_CHUNK_BYTES) -> tuple[grpc.Server, int]:
    """Start D's KV listener on host:port (port 0: any free one); returns the started
    server and the bound port. `host` is the node's internal address: binding all
    interfaces happens only when a caller passes 0.0.0.0 / :: itself. Each open Push
    holds one of the max_workers threads for its duration."""
    if host in ("0.0.0.0", "::", "[::]"):
        logger.warning("KV listener bound to all interfaces (%s) as configured", host)
    if not secret:
        logger.warning("KV listener on %s has no shared secret: any peer may push KV", host)
    use_heap_for_chunks()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers, thread_name_prefix="pdserve-kv"),
                         options=channel_options(max_chunk_bytes) + _SERVER_KEEPALIVE)
    server.add_generic_rpc_handlers((_handlers(KVTransferServicer(receiver, secret)),))
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise RuntimeError(f"cannot bind the KV listener to {address}: {e}") from e
    if bound == 0:
        raise RuntimeError(f"cannot bind the KV listener to {address}")
    server.start()
    logger.info("KV listener on %s (port %d)", host, bound)
    return server, bound


# --- P side ---------------------------------------------------------------------------

@register("grpc")
class GrpcTransport(KVTransport):
    """One channel per D endpoint, shared by all attempts to it (HTTP/2 multiplexes the
    streams over one connection)."""
    name = "grpc"

    def __init__(self, secret: str | None = None, max_chunk_bytes: int = MAX_CHUNK_BYTES,
                 queue_chunks: int = 8, stream_timeout_s: float = 60.0,
                 send_timeout_s: float = 30.0) -> None:
        if max_chunk_bytes < 1 or queue_chunks < 1:
            raise ValueError("max_chunk_bytes and queue_chunks must be >= 1")
        self.secret = secret
        self.max_chunk_bytes = max_chunk_bytes
        self.queue_chunks = queue_chunks
        self.stream_timeout_s = stream_timeout_s   # gRPC deadline of one Push: D's handler
                                                   # ends by then even if P vanishes
        self.send_timeout_s = send_timeout_s       # longest a send() waits on a full queue
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        use_heap_for_chunks()

    def _stub(self, endpoint: str) -> kv_pb2_grpc.KVTransferStub:
        if not endpoint:
            raise TransferError("reservation has no endpoint")
        with self._lock:
            channel = self._channels.get(endpoint)
            if channel is None:
                channel = grpc.insecure_channel(endpoint, options=channel_options(self.max_chunk_bytes))
                self._channels[endpoint] = channel
        stub = kv_pb2_grpc.KVTransferStub(channel)
        # Push sends OutChunks: their own serializer writes the payload views with one copy.
        stub.Push = channel.stream_unary(
            "/pdserve.v1.KVTransfer/Push", request_serializer=OutChunk.SerializeToString,
            response_deserializer=kv_pb2.KVPushAck.FromString)
        return stub

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((SECRET_METADATA_KEY, self.secret),) if self.secret else ()

    def open(self, reservation: worker_pb2.Reservation, request_id: str,
             attempt_id: int) -> KVSendHandle:
        return GrpcSendHandle(self, self._stub(reservation.endpoint), reservation, request_id, attempt_id)

    def complete(self, reservation: worker_pb2.Reservation, record: worker_pb2.CompletionRecord,
                 timeout: float) -> kv_pb2.CompleteAck:
        stub = self._stub(reservation.endpoint)
        try:
            return stub.Complete(record, metadata=self.metadata(), timeout=timeout)
        except grpc.RpcError as e:
            raise TransferError(f"Complete to {reservation.endpoint}: {_describe(e)}", _code_of(e)) from e

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()


_END = object()  # queue marker: no more chunks


class GrpcSendHandle(KVSendHandle):
    def __init__(self, transport: GrpcTransport, stub: kv_pb2_grpc.KVTransferStub,
                 reservation: worker_pb2.Reservation, request_id: str, attempt_id: int) -> None:
        self._t = transport
        self._base = header_base(reservation, request_id, attempt_id)
        self._block_ids = target_block_ids(reservation)
        self._ledger: SendLedger[OutChunk] = SendLedger(lambda c: c.header)
        self._queue: queue.Queue[object] = queue.Queue(maxsize=transport.queue_chunks)
        self._done = threading.Event()      # the call has ended (ack, error or cancel)
        self._aborted = False
        self._stalled = False
        self._error: TransferError | None = None
        self._summary: SendSummary | None = None
        # The Push call starts at the first chunk, not at open(): a prompt may wait in
        # P's queue for a long time, and an idle stream would hold one of D's server
        # threads and run down its own deadline meanwhile.
        self._stub = stub
        self._call: grpc.Future | None = None

    def _start(self) -> grpc.Future:
        if self._call is None:
            self._call = self._stub.Push.future(self._requests(), metadata=self._t.metadata(),
                                                timeout=self._t.stream_timeout_s)
            self._call.add_done_callback(lambda _f: self._done.set())
        return self._call

    def _requests(self) -> Iterator[OutChunk]:
        """Runs on gRPC's request-consumer thread. Polls so that it returns soon after
        the call ends early (D refused a chunk, cancel), instead of blocking forever."""
        while True:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._done.is_set():
                    return
                continue
            if item is _END:
                return
            yield item  # type: ignore[misc]

    def _put(self, item: object, deadline: float) -> bool:
        """Enqueue, blocking while the queue is full (backpressure); False if the call
        has ended or the deadline passed (then the call is cancelled)."""
        call = self._start()
        while not self._done.is_set():
            try:
                self._queue.put(item, timeout=min(0.05, max(0.0, deadline - time.monotonic())))
                return True
            except queue.Full:
                if time.monotonic() >= deadline:
                    self._stalled = True
                    call.cancel()
                    return False
        return False

    @property
    def queued(self) -> int:
        """Chunks waiting for the wire (for metrics and tests)."""
        return self._queue.qsize()

    def send(self, layer_start: int, layer_end: int, kv: Tensor) -> None:
        if self._summary is not None:
            raise RuntimeError("send() after finish()")
        if self._aborted or self._done.is_set():
            return  # the call already ended; finish() reports why
        # No lease check here: the router renews D's lease while the prefill runs, so
        # the expiry in P's copy of the reservation is stale; D alone judges expiry.
        chunks = encode_chunks(self._base, layer_start, layer_end, self._block_ids, kv,
                               self._ledger.next_index, self._t.max_chunk_bytes)
        deadline = time.monotonic() + self._t.send_timeout_s
        for chunk in self._ledger.push(chunks):
            if not self._put(chunk, deadline):
                return

    def finish(self, timeout: float) -> SendSummary:
        if self._summary is not None:
            return self._summary
        if self._aborted:
            raise TransferError("transfer aborted")
        if self._error is not None:
            raise self._error
        deadline = time.monotonic() + timeout
        held = self._ledger.finish()
        if held is None or self._put(held, deadline):
            self._put(_END, deadline)
        call = self._start()
        try:
            ack = call.result(timeout=max(0.0, deadline - time.monotonic()))
        except grpc.FutureTimeoutError:
            call.cancel()
            raise TransferError(f"no KVPushAck within {timeout:.1f}s") from None
        except grpc.FutureCancelledError:
            why = "D stopped draining chunks (queue full past the deadline)" if self._stalled else "cancelled"
            raise TransferError(f"Push: {why}") from None
        except grpc.RpcError as e:
            raise TransferError(f"Push: {_describe(e)}", _code_of(e)) from e
        if ack.code != kv_pb2.KV_STATUS_OK:
            raise TransferError(f"D refused chunk {ack.accepted_chunks}: {ack.error}", ack.code)
        if ack.accepted_chunks != self._ledger.next_index:
            raise TransferError(f"D acknowledged {ack.accepted_chunks} of {self._ledger.next_index} "
                                "chunks", kv_pb2.KV_STATUS_CORRUPT)
        self._summary = self._ledger.summary()
        return self._summary

    def abort(self) -> None:
        if not self._aborted:
            self._aborted = True
            self._done.set()
            if self._call is not None:
                self._call.cancel()
