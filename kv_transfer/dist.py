"""The `nccl` KV transport: torch.distributed send/recv between a prefill rank (P) and a
decode rank (D). The same code runs with the gloo backend on CPU, which is how CI tests it.

How this works
--------------
One cluster-wide process group (`init_kv_group`): every P and D worker joins it once at
start-up with a launcher-assigned rank. After init only point-to-point send/recv runs,
never a collective. Why the single default group: torch.distributed p2p works between any
two ranks of a group (NCCL creates a 2-rank communicator per pair lazily, on the pair's
first send/recv), and `new_group` would need every rank of the default group to call it
anyway, so per-pair groups buy nothing but start-up coordination.

Each P→D pair is one ordered stream of frames. A frame is a fixed-size uint8 header
tensor, followed by a payload tensor for CHUNK frames:

    header [FRAME_BYTES] uint8:
      0   4s  magic b"PDKV"   (a misframed stream fails loudly, it is never parsed as KV)
      4   u8  version
      5   u8  kind            CHUNK | END (attempt fence) | BYE (sender closes)
      6   u16 reserved
      8   u32 proto length    little-endian
      12  ... serialized kv_pb2.KVChunkHeader, zero padding up to FRAME_BYTES
    payload: tensor of header.dtype / header.shape (KV_PAYLOAD_LAYOUT), CHUNK frames only

Framing invariant: a header and its payload are adjacent on the pair's stream. So P has
one sender thread per destination rank (shared by all attempts to that D), never one per
attempt, and D has one receiving thread per source rank. NCCL ignores tags, so order
alone frames the stream; gloo matches tags too (header vs payload), which turns a framing
bug into a timeout instead of garbage.

CRC trade-off: with gloo the payload is on CPU and each chunk carries its crc32c. With
NCCL the payload stays on the GPU; computing crc32c there would need a copy to the host
and erase the point of NCCL, so crc32c = 0 and SendSummary.checksum = 0, and D relies on
the completion checks (attempt ids, num_chunks, kv_bytes). NCCL links carry their own
link-level integrity checks; host-memory bit flips are what crc catches on the gloo path.

Completion fence: P's finish() queues an END frame after the attempt's chunks. D marks
the attempt drained when its thread reaches END (after its CUDA stream is synchronized),
and `DistKVListener.complete()` waits for that mark before `KVReceiver.complete()`: the
gRPC Complete call could otherwise overtake chunks that were sent but not yet processed.

Shutdown: D cannot wake its own thread blocked in recv from a remote rank (no poison pill
from the local process). The P side sends a BYE frame to every D it talks to (and to any
`bye_ranks`) at close(); D threads are daemons, so a D process still exits if a P died
without BYE. close() on D joins for a bounded time and logs threads still blocked.

Timeouts: the group's timeout bounds every pending op, including D's idle header recv.
gloo closes the pair when it expires and NCCL's watchdog tears the process down, so the
group timeout must exceed the longest idle gap of any pair (default 7 days). Request
latency is bounded by finish(timeout) and reservation leases instead.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import struct
import threading
import time
from collections import OrderedDict
from datetime import timedelta
from enum import IntEnum
from typing import Callable, Literal, Mapping, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from kv_transfer.base import KVSendHandle, KVTransport, SendSummary, TransferError, register
from pdserve.v1 import kv_pb2, worker_pb2

logger = logging.getLogger(__name__)

Backend = Literal["nccl", "gloo"]

FRAME_BYTES = 4096
# The largest header is a chunk naming many D block ids (<= 5 bytes each as varints):
# 512 ids keep it well inside FRAME_BYTES next to ids and shape (checked when packing).
MAX_BLOCKS_PER_CHUNK = 512
# Chunks only exist to bound the header here (NCCL and gloo move any size); 256 MiB
# keeps a single payload allocation on D modest.
MAX_CHUNK_BYTES = 256 << 20
DEFAULT_GROUP_TIMEOUT_S = 7 * 24 * 3600.0   # > any idle gap of a pair (module docstring)

_MAGIC = b"PDKV"
_FRAME_VERSION = 1
_PREFIX = struct.Struct("<4sBBHI")          # magic, version, kind, reserved, proto length
_TAG_HEADER, _TAG_PAYLOAD = 1, 2            # gloo matches them; NCCL ignores tags


class FrameKind(IntEnum):
    CHUNK = 1       # header + payload
    END = 2         # all chunks of (request_id, attempt_id) are before this frame
    BYE = 3         # the sender closes: the receiving thread exits


def init_kv_group(backend: Backend, init_method: str, world_size: int, rank: int,
                  timeout_s: float = DEFAULT_GROUP_TIMEOUT_S) -> None:
    """Join the cluster-wide KV process group (the default group) once at start-up.

    Blocks until all `world_size` ranks have joined: every P and D worker must call it
    concurrently with its launcher-assigned rank; rank 0 hosts the TCP store at
    `init_method` (tcp://host:port). With NCCL, call torch.cuda.set_device() first.
    `device_id` is deliberately not passed: an eagerly bound default communicator would
    be shared by all pairs (NCCL comms are not safe for concurrent use from several
    threads), while lazy init gives each pair its own 2-rank communicator.
    """
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of {world_size}")
    if dist.is_initialized():
        if dist.get_rank() != rank or dist.get_world_size() != world_size:
            raise RuntimeError(f"a process group already exists as rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}; cannot join as {rank} of {world_size}")
        return
    logger.info("joining KV group %s as rank %d/%d (%s)", init_method, rank, world_size, backend)
    dist.init_process_group(backend=backend, init_method=init_method, world_size=world_size,
                            rank=rank, timeout=timedelta(seconds=timeout_s))


def pack_frame(kind: FrameKind, header: kv_pb2.KVChunkHeader | None = None) -> Tensor:
    """The fixed-size frame header as a CPU uint8 tensor (layout in the module docstring)."""
    body = b"" if header is None else header.SerializeToString()
    if _PREFIX.size + len(body) > FRAME_BYTES:
        raise TransferError(f"chunk header of {len(body)} bytes does not fit a {FRAME_BYTES}-byte "
                            f"frame", kv_pb2.KV_STATUS_INVALID)
    buf = bytearray(FRAME_BYTES)
    _PREFIX.pack_into(buf, 0, _MAGIC, _FRAME_VERSION, int(kind), 0, len(body))
    buf[_PREFIX.size:_PREFIX.size + len(body)] = body
    return torch.frombuffer(buf, dtype=torch.uint8)


def unpack_frame(frame: Tensor) -> tuple[FrameKind, kv_pb2.KVChunkHeader]:
    """Parse a received frame (CPU uint8 [FRAME_BYTES]); ValueError if it is not one:
    the stream is then misframed and cannot be trusted any more."""
    raw = frame.numpy().tobytes()
    magic, version, kind, _, n = _PREFIX.unpack_from(raw, 0)
    if magic != _MAGIC or version != _FRAME_VERSION or n > FRAME_BYTES - _PREFIX.size:
        raise ValueError(f"not a KV frame (magic {magic!r}, version {version}, length {n})")
    header = kv_pb2.KVChunkHeader()
    header.ParseFromString(raw[_PREFIX.size:_PREFIX.size + n])
    return FrameKind(kind), header


def _wire_device(device: torch.device | str | None) -> torch.device:
    """Where tensors must be for the group's backend: gloo moves CPU tensors here (a CUDA
    cache still works, through host copies); NCCL moves device tensors only."""
    if dist.get_backend() == "nccl":
        dev = torch.device(device if device is not None else "cuda")
        if dev.type != "cuda":
            raise ValueError(f"the NCCL backend needs a CUDA device, got {dev}")
        return dev
    return torch.device("cpu")


# --- P side ---------------------------------------------------------------------------

class CompletionSink(Protocol):
    """Anything that verifies a CompletionRecord locally (KVReceiver, DistKVListener)."""
    def complete(self, record: worker_pb2.CompletionRecord) -> kv_pb2.CompleteAck: ...


class ControlChannel(Protocol):
    """Carries the CompletionRecord to D (GrpcTransport: D's KVTransfer.Complete)."""
    def complete(self, reservation: worker_pb2.Reservation, record: worker_pb2.CompletionRecord,
                 timeout: float) -> kv_pb2.CompleteAck: ...


_Item = tuple["DistSendHandle | None", FrameKind, kv_pb2.KVChunkHeader | None, "Tensor | None",
              "torch.cuda.Event | None"]


class _PeerSender:
    """The one thread that writes frames to one destination rank (framing invariant).
    A bounded queue gives the engine backpressure instead of unbounded buffered KV."""

    def __init__(self, dst: int, device: torch.device, queue_frames: int) -> None:
        self.dst, self.device = dst, device
        self.queue: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_frames)
        self.error: BaseException | None = None       # set once the stream is broken
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, name=f"kv-send-{dst}", daemon=True)
        self._thread.start()

    def put(self, item: _Item | None, timeout: float) -> None:
        self.queue.put(item, timeout=timeout)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:            # close(): say BYE so D's thread for us exits
                if self.error is None:
                    self._try(lambda: self._send(FrameKind.BYE, None, None, None))
                return
            handle, kind, header, payload, event = item
            assert handle is not None
            if self.error is not None:
                handle._done(self.error)
            elif handle.aborted:
                handle._done(None)      # not started, so skipping keeps the stream framed
            else:
                handle._done(self._try(lambda: self._send(kind, header, payload, event)))

    def _try(self, fn: Callable[[], None]) -> BaseException | None:
        try:
            fn()
            return None
        except Exception as e:          # pair closed, peer gone: the stream is unusable
            logger.error("KV stream to rank %d broken: %s", self.dst, e)
            self.error = TransferError(f"KV stream to rank {self.dst} broken: {e}")
            return self.error

    def _send(self, kind: FrameKind, header: kv_pb2.KVChunkHeader | None, payload: Tensor | None,
              event: torch.cuda.Event | None) -> None:
        frame = pack_frame(kind, header)
        if self._stream is None:
            dist.send(frame, self.dst, tag=_TAG_HEADER)
            if payload is not None:
                dist.send(payload, self.dst, tag=_TAG_PAYLOAD)
            return
        # Own stream: a send waiting for D must not stall the engine's default stream.
        with torch.cuda.stream(self._stream):
            if event is not None:
                self._stream.wait_event(event)      # the payload was written on the engine's stream
            dist.send(frame.to(self.device), self.dst, tag=_TAG_HEADER)
            if payload is not None:
                dist.send(payload, self.dst, tag=_TAG_PAYLOAD)
            self._stream.synchronize()              # the bytes left: finish() may count them


class DistSendHandle(KVSendHandle):
    """One attempt's sends to one D rank; frames go through that rank's _PeerSender."""

    def __init__(self, transport: DistTransport, sender: _PeerSender,
                 reservation: worker_pb2.Reservation, request_id: str, attempt_id: int) -> None:
        from kv_transfer import wire
        self._t, self._sender, self._wire = transport, sender, wire
        self._base = wire.header_base(reservation, request_id, attempt_id)
        self._block_ids = wire.target_block_ids(reservation)
        self._lease_ms = reservation.lease_expiry_unix_ms
        self._cond = threading.Condition()
        self._pending = 0
        self._error: BaseException | None = None
        self._num_chunks = self._num_bytes = self._checksum = 0
        self.aborted = self._finished = False

    def send(self, layer_start: int, layer_end: int, kv: Tensor) -> None:
        if self._finished:
            raise RuntimeError("send() after finish()")
        if self.aborted or self._error is not None:
            return
        if self._lease_ms and time.time() * 1000 > self._lease_ms:
            self._fail(TransferError("reservation lease expired before the KV was sent",
                                     kv_pb2.KV_STATUS_EXPIRED))
            return
        if not self._block_ids:         # D's prefix cache holds the whole prompt
            return
        on_cpu = self._sender.device.type == "cpu"
        kv = kv.detach().to(self._sender.device)
        # crc only where the bytes are on the host anyway (module docstring, CRC trade-off)
        per_send = kv[0, 0, 0].numel() * kv.element_size() * 2 * (layer_end - layer_start)
        max_bytes = min(self._t.max_chunk_bytes, per_send * MAX_BLOCKS_PER_CHUNK)
        chunks = self._wire.plan_chunks(self._base, layer_start, layer_end, self._block_ids, kv,
                                        self._num_chunks, max_bytes, checksum=on_cpu)
        event = None
        if not on_cpu:
            event = torch.cuda.Event()
            event.record()              # the sender's stream waits for the gather + copies
        for header, piece in chunks:
            self._num_chunks += 1
            self._num_bytes += header.payload_bytes
            self._checksum = self._wire.crc32c_combine(self._checksum, header.crc32c,
                                                       header.payload_bytes) if on_cpu else 0
            self._enqueue(FrameKind.CHUNK, header, self._t.tamper(header, piece), event)

    def finish(self, timeout: float) -> SendSummary:
        if not self._finished and not self.aborted and self._error is None:
            self._finished = True
            end = kv_pb2.KVChunkHeader()
            end.CopyFrom(self._base)
            end.num_chunks = self._num_chunks
            self._enqueue(FrameKind.END, end, None, None)
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            error, pending = self._error, self._pending
        if error is not None:
            raise error if isinstance(error, TransferError) else TransferError(str(error))
        if self.aborted:
            raise TransferError("transfer aborted")
        if pending:
            self.abort()
            raise TransferError(f"{pending} KV frames to rank {self._sender.dst} not sent "
                                f"within {timeout:.1f}s")
        return SendSummary(self._num_chunks, self._checksum, self._num_bytes)

    def abort(self) -> None:
        self.aborted = True

    def _enqueue(self, kind: FrameKind, header: kv_pb2.KVChunkHeader, payload: Tensor | None,
                 event: torch.cuda.Event | None) -> None:
        with self._cond:
            self._pending += 1
        try:
            self._sender.put((self, kind, header, payload, event), self._t.enqueue_timeout_s)
        except Exception:               # queue.Full: the peer is stuck; surfaces in finish()
            self._done(TransferError(f"KV send queue to rank {self._sender.dst} full for "
                                     f"{self._t.enqueue_timeout_s:.0f}s"))
            self.abort()

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = self._error or error
            self._cond.notify_all()

    def _done(self, error: BaseException | None) -> None:
        with self._cond:
            self._pending -= 1
            if error is not None and self._error is None:
                self._error = error
            self._cond.notify_all()


@register("nccl")
class DistTransport(KVTransport):
    """P side of the nccl transport. D's rank comes from `rank_of(reservation)` or, by
    default, reservation.transport_params["rank"]; completion records go through
    `control` (gRPC Complete) or, in tests, straight to `local_receivers[rank]`."""
    name = "nccl"

    def __init__(self, rank_of: Callable[[worker_pb2.Reservation], int] | None = None,
                 control: ControlChannel | None = None, *,
                 local_receivers: Mapping[int, CompletionSink] | None = None,
                 device: torch.device | str | None = None, bye_ranks: tuple[int, ...] = (),
                 queue_frames: int = 64, enqueue_timeout_s: float = 60.0,
                 max_chunk_bytes: int = MAX_CHUNK_BYTES) -> None:
        if not dist.is_initialized():
            raise RuntimeError("nccl transport: call init_kv_group() before creating it")
        if control is None and local_receivers is None:
            raise ValueError("nccl transport needs a control channel or local_receivers")
        self._rank_of = rank_of or (lambda r: int(r.transport_params["rank"]))
        self._control, self._local = control, dict(local_receivers or {})
        self._device = _wire_device(device)
        self._queue_frames, self.enqueue_timeout_s = queue_frames, enqueue_timeout_s
        self.max_chunk_bytes = max_chunk_bytes
        self._senders: dict[int, _PeerSender] = {}
        self._lock = threading.Lock()
        self._bye_ranks = bye_ranks
        # Test hook: (header, payload) -> payload actually sent (fault injection).
        self.tamper: Callable[[kv_pb2.KVChunkHeader, Tensor], Tensor] = lambda h, p: p

    def _sender(self, rank: int) -> _PeerSender:
        if rank == dist.get_rank() or not 0 <= rank < dist.get_world_size():
            raise TransferError(f"bad destination rank {rank} for the KV group")
        with self._lock:
            if rank not in self._senders:
                self._senders[rank] = _PeerSender(rank, self._device, self._queue_frames)
            return self._senders[rank]

    def open(self, reservation: worker_pb2.Reservation, request_id: str,
             attempt_id: int) -> KVSendHandle:
        try:
            rank = self._rank_of(reservation)
        except (KeyError, ValueError) as e:
            raise TransferError(f"reservation has no usable transport_params['rank']: {e}",
                                kv_pb2.KV_STATUS_INVALID) from e
        sender = self._sender(rank)
        if sender.error is not None:
            raise sender.error
        return DistSendHandle(self, sender, reservation, request_id, attempt_id)

    def complete(self, reservation: worker_pb2.Reservation, record: worker_pb2.CompletionRecord,
                 timeout: float) -> kv_pb2.CompleteAck:
        if self._control is not None:
            return self._control.complete(reservation, record, timeout)
        return self._local[self._rank_of(reservation)].complete(record)

    def close(self, timeout: float = 10.0) -> None:
        """Say BYE to every D this transport talked to (and to bye_ranks), then stop."""
        for rank in self._bye_ranks:
            self._sender(rank)
        with self._lock:
            senders = list(self._senders.values())
            self._senders.clear()
        for s in senders:
            try:
                s.put(None, timeout)
            except Exception:
                logger.warning("KV sender to rank %d stuck; not saying BYE", s.dst)
        deadline = time.monotonic() + timeout
        for s in senders:
            if not s.join(max(0.0, deadline - time.monotonic())):
                logger.warning("KV sender to rank %d did not stop within %.1fs", s.dst, timeout)


# --- D side ---------------------------------------------------------------------------

class DistKVListener:
    """D side: one daemon thread per P rank reads that rank's frames and hands each
    chunk to `receiver.receive(header, tensor)`. `receiver` must be thread-safe (the
    threads and D's gRPC Complete calls use it concurrently)."""

    def __init__(self, receiver: object, peer_ranks: list[int], device: torch.device | str | None,
                 *, max_payload_bytes: int = 4 << 30, fences: int = 4096) -> None:
        if not dist.is_initialized():
            raise RuntimeError("DistKVListener: call init_kv_group() first")
        self._receiver = receiver
        self._device = _wire_device(device)
        self._max_payload = max_payload_bytes
        self._cond = threading.Condition()
        self._drained: OrderedDict[tuple[str, int], int] = OrderedDict()  # END seen: num_chunks
        self._max_fences = fences
        self._closing = False
        self.chunks = 0     # chunks handed to the receiver (any outcome), for tests/metrics
        self._threads = [threading.Thread(target=self._serve, args=(r,), name=f"kv-recv-{r}",
                                          daemon=True) for r in peer_ranks]
        for t in self._threads:
            t.start()

    def wait_drained(self, request_id: str, attempt_id: int, timeout: float) -> bool:
        """True once the END frame of the attempt was processed: every chunk sent before
        it is in D's cache (on CUDA: the copies are complete)."""
        with self._cond:
            return self._cond.wait_for(lambda: (request_id, attempt_id) in self._drained, timeout)

    def complete(self, record: worker_pb2.CompletionRecord, timeout: float = 10.0) -> kv_pb2.CompleteAck:
        """KVReceiver.complete after the attempt's chunks were processed. D routes the
        Complete of nccl reservations here; without the fence, Complete could overtake
        chunks still in this process's receive threads. If the fence does not come, the
        receiver decides (it will see missing chunks)."""
        if not self.wait_drained(record.request_id, record.attempt_id, timeout):
            logger.warning("complete for %s attempt %d before its KV was drained",
                           record.request_id, record.attempt_id)
        with self._cond:
            self._drained.pop((record.request_id, record.attempt_id), None)
        return self._receiver.complete(record)  # type: ignore[attr-defined]

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting chunks; threads exit on their sender's BYE (see module docstring)."""
        self._closing = True
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            logger.info("KV receive threads still waiting for BYE (daemon): %s", alive)

    def _serve(self, src: int) -> None:
        stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        frame = torch.empty(FRAME_BYTES, dtype=torch.uint8, device=self._device)
        try:
            # Own stream on CUDA: a recv posted while idle must not block D's engine.
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                while self._step(src, frame, stream):
                    pass
        except Exception as e:
            if not self._closing:
                logger.error("KV stream from rank %d broken, no more KV from it: %s", src, e)
        logger.debug("KV receive thread for rank %d exits", src)

    def _step(self, src: int, frame: Tensor, stream: torch.cuda.Stream | None) -> bool:
        from kv_transfer.layout import dtype_from_proto
        dist.recv(frame, src, tag=_TAG_HEADER)
        kind, header = unpack_frame(frame.cpu())   # on CUDA: waits for the recv
        if kind is FrameKind.BYE:
            return False
        if kind is FrameKind.END:
            if stream is not None:
                stream.synchronize()    # the scatters of earlier chunks are done
            with self._cond:
                self._drained[(header.request_id, header.attempt_id)] = header.num_chunks
                while len(self._drained) > self._max_fences:   # fences nobody asked for
                    self._drained.popitem(last=False)
                self._cond.notify_all()
            return True
        shape = tuple(header.shape)
        dtype = dtype_from_proto(header.dtype)
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if not shape or size != header.payload_bytes or size > self._max_payload:
            # The payload size is unknowable: the stream cannot be drained or trusted.
            raise ValueError(f"undrainable chunk header: shape {shape} {dtype}, "
                             f"payload_bytes {header.payload_bytes}")
        payload = torch.empty(shape, dtype=dtype, device=self._device)
        dist.recv(payload, src, tag=_TAG_PAYLOAD)  # always received: keeps the stream framed
        if self._closing:
            return True
        code, message = self._receiver.receive(header, payload)  # type: ignore[attr-defined]
        self.chunks += 1
        if code != kv_pb2.KV_STATUS_OK:
            logger.warning("rank %d chunk %d of %s attempt %d rejected (%s): %s", src,
                           header.chunk_index, header.request_id, header.attempt_id,
                           kv_pb2.KVStatus.Name(code), message)
        return True
