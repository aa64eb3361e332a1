"""The `nccl` KV transport: torch.distributed send/recv between a prefill rank (P) and a
decode rank (D). The same code runs with the gloo backend on CPU, which is how CI tests it.

How this works
--------------
One cluster-wide process group (`init_kv_group`): every P and D worker joins it once at
start-up with a launcher-assigned rank; afterwards only point-to-point send/recv runs,
never a collective. Why the one default group: p2p works between any two ranks of a group
(NCCL builds a 2-rank communicator per pair lazily, on the pair's first send/recv), and
`new_group` needs every rank of the default group to call it anyway, so per-pair groups
would add start-up coordination and buy nothing.

Each P→D pair is one ordered stream of frames; D answers each END with an ack:

    P ─ frame(CHUNK) payload frame(CHUNK) payload ... frame(END) ─────────────▶ D
    P ◀──────────────────────────────────────────── ack [code, chunks, bytes, attempt]

    frame: uint8 [FRAME_BYTES] = magic b"PDKV" | u8 version | u8 kind | u16 0 |
           u32 LE proto length | serialized kv_pb2.KVChunkHeader | zero padding
    payload: header.dtype / header.shape (KV_PAYLOAD_LAYOUT), after CHUNK frames only

The magic makes a misframed stream fail loudly instead of being parsed as KV. Framing
invariant: a frame and its payload are adjacent on the pair's stream, so P has one sender
thread per destination rank, shared by all attempts to that D (never one per attempt),
and D one receiving thread per source rank. NCCL ignores tags, so order alone frames the
stream; gloo matches tags too, which turns a framing bug into a timeout, not garbage.

The END ack is what grpc's KVPushAck is: finish() returns once D has processed (written,
and on CUDA synchronized) every chunk before END, and raises D's first rejection code.
So the gRPC Complete that follows cannot overtake chunks still in D's threads.

CRC trade-off: with gloo the payload is on the host and every chunk carries its crc32c.
With NCCL it stays on the GPU; crc32c there would cost a device-to-host copy per chunk,
so headers carry crc32c = 0 and D verifies ids, chunk count, bytes and block coverage at
Complete but not the bytes (KVReceiver skips crc when it is 0).

Shutdown: a thread blocked in recv from a remote rank cannot be woken from the local
process. P's close() sends BYE to every D it talked to (`peer_ranks` are PINGed at
start-up); D threads are daemons, so a D whose P died without BYE still exits.

Timeouts: the group timeout bounds every pending op, D's idle recv included: gloo closes
the pair when it expires and NCCL's watchdog tears the process down. So it must exceed
the longest idle gap of any pair (default 7 days); requests are bounded by finish(timeout)
and reservation leases instead.
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

FRAME_BYTES = 4096
# The largest header is a chunk naming many D block ids (<= 5 bytes each as varints):
# 512 ids stay well inside FRAME_BYTES (and pack_frame checks).
MAX_BLOCKS_PER_CHUNK = 512
# Chunks exist here only to bound the header (NCCL and gloo move any size); 256 MiB also
# bounds one payload allocation on D.
MAX_CHUNK_BYTES = 256 << 20
DEFAULT_GROUP_TIMEOUT_S = 7 * 24 * 3600.0   # > any idle gap of a pair (module docstring)

_MAGIC, _VERSION = b"PDKV", 1
_PREFIX = struct.Struct("<4sBBHI")          # magic, version, kind, reserved, proto length
_TAG_FRAME, _TAG_PAYLOAD, _TAG_ACK = 1, 2, 3  # gloo matches tags; NCCL ignores them


class FrameKind(IntEnum):
    CHUNK = 1   # a payload follows
    END = 2     # the attempt's chunks are all before this frame; D acks it
    BYE = 3     # the sender closes; D's thread for it exits
    PING = 4    # no-op: builds the pair's NCCL communicator at start-up


def init_kv_group(backend: Literal["nccl", "gloo"], init_method: str, world_size: int, rank: int,
                  timeout_s: float = DEFAULT_GROUP_TIMEOUT_S) -> None:
    """Join the cluster-wide KV group (the default group) once at start-up. Blocks until
    all `world_size` ranks joined: every P and D worker calls it concurrently with its
    launcher-assigned rank; rank 0 hosts the store at init_method (tcp://host:port). NCCL:
    call torch.cuda.set_device() first. No `device_id`: an eagerly bound communicator
    would be shared by all pairs, lazy init gives each pair its own."""
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise RuntimeError(f"already rank {dist.get_rank()} of {dist.get_world_size()}")
        return
    logger.info("joining KV group %s as rank %d/%d (%s)", init_method, rank, world_size, backend)
    dist.init_process_group(backend=backend, init_method=init_method, world_size=world_size,
                            rank=rank, timeout=timedelta(seconds=timeout_s))


def pack_frame(kind: FrameKind, header: kv_pb2.KVChunkHeader | None = None) -> Tensor:
    """A frame as a CPU uint8 tensor (layout in the module docstring)."""
    body = b"" if header is None else header.SerializeToString()
    if _PREFIX.size + len(body) > FRAME_BYTES:
        raise TransferError(f"a {len(body)}-byte chunk header does not fit a frame",
                            kv_pb2.KV_STATUS_INVALID)
    buf = bytearray(FRAME_BYTES)
    _PREFIX.pack_into(buf, 0, _MAGIC, _VERSION, int(kind), 0, len(body))
    buf[_PREFIX.size:_PREFIX.size + len(body)] = body
    return torch.frombuffer(buf, dtype=torch.uint8)


def unpack_frame(frame: Tensor) -> tuple[FrameKind, kv_pb2.KVChunkHeader]:
    """Parse a received frame (CPU uint8); ValueError when it is none: the stream is then
    misframed and nothing more from it can be trusted."""
    raw = frame.numpy().tobytes()
    magic, version, kind, _, n = _PREFIX.unpack_from(raw, 0)
    if magic != _MAGIC or version != _VERSION or n > FRAME_BYTES - _PREFIX.size:
        raise ValueError(f"not a KV frame (magic {magic!r}, version {version}, length {n})")
    return FrameKind(kind), kv_pb2.KVChunkHeader.FromString(raw[_PREFIX.size:_PREFIX.size + n])


def _wire_device(device: torch.device | str | None) -> torch.device:
    """NCCL moves device tensors only; gloo moves host tensors (a CUDA cache still works
    with gloo, through host copies)."""
    if dist.get_backend() != "nccl":
        return torch.device("cpu")
    dev = torch.device(device if device is not None else "cuda")
    if dev.type != "cuda":
        raise ValueError(f"the NCCL backend needs a CUDA device, got {dev}")
    return dev


def _stream_ctx(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    # Own CUDA stream per thread: a send or recv waiting on its peer must not stall the
    # engine's stream.
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


# --- P side ---------------------------------------------------------------------------

class CompletionSink(Protocol):
    def complete(self, record: worker_pb2.CompletionRecord) -> kv_pb2.CompleteAck: ...


class ControlChannel(Protocol):
    """Carries the CompletionRecord to D (GrpcTransport: D's KVTransfer.Complete)."""
    def complete(self, reservation: worker_pb2.Reservation, record: worker_pb2.CompletionRecord,
                 timeout: float) -> kv_pb2.CompleteAck: ...


# (handle or None for PING, kind, header, payload, event the payload's producer recorded)
_Item = tuple["DistSendHandle | None", FrameKind, kv_pb2.KVChunkHeader | None, "Tensor | None",
              "torch.cuda.Event | None"]


class _PeerSender:
    """The one thread writing to one D rank. Its bounded queue gives the engine
    backpressure instead of an unbounded pile of gathered KV."""

    def __init__(self, dst: int, device: torch.device, queue_frames: int) -> None:
        self.dst, self.device = dst, device
        self.queue: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_frames)
        self.error: TransferError | None = None         # set once: the stream is unusable
        self.busy_since = 0.0                           # monotonic start of the frame in flight
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ack = torch.zeros(4, dtype=torch.int64, device=device)
        self._thread = threading.Thread(target=self._run, name=f"kv-send-{dst}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with _stream_ctx(self._stream):
            while (item := self.queue.get()) is not None:
                handle, kind, header, payload, event = item
                if self.error is not None or (handle is not None and handle.aborted
                                              and kind is FrameKind.CHUNK):
                    if handle is not None:      # never started: skipping keeps the stream framed
                        handle._done(self.error)
                    continue
                self.busy_since = time.monotonic()
                try:
                    ack = self._send(kind, header, payload, event)
                    error = None
                except Exception as e:          # pair closed, peer gone, misframed ack
                    logger.error("KV stream to rank %d broken: %s", self.dst, e)
                    self.error = error = TransferError(f"KV stream to rank {self.dst} broken: {e}")
                    ack = None
                if handle is not None:
                    handle._done(error, ack)
                self.busy_since = 0.0
            if self.error is None:
                with contextlib.suppress(Exception):
                    dist.send(pack_frame(FrameKind.BYE).to(self.device), self.dst, tag=_TAG_FRAME)

    def _send(self, kind: FrameKind, header: kv_pb2.KVChunkHeader | None, payload: Tensor | None,
              event: torch.cuda.Event | None) -> list[int] | None:
        if event is not None and self._stream is not None:
            self._stream.wait_event(event)  # the payload was written on the engine's stream
        dist.send(pack_frame(kind, header).to(self.device), self.dst, tag=_TAG_FRAME)
        if payload is not None:
            dist.send(payload, self.dst, tag=_TAG_PAYLOAD)
        if kind is FrameKind.END:
            assert header is not None
            dist.recv(self._ack, self.dst, tag=_TAG_ACK)
            ack = self._ack.tolist()        # on CUDA: waits for the recv
            if ack[3] != header.attempt_id:
                raise ValueError(f"ack for attempt {ack[3]}, expected {header.attempt_id}")
            return ack
        if self._stream is not None:
            self._stream.synchronize()      # the payload may be freed or reused after this
        return None


class DistSendHandle(KVSendHandle):
    """One attempt's frames to one D rank, through that rank's _PeerSender."""

    def __init__(self, transport: DistTransport, sender: _PeerSender,
                 reservation: worker_pb2.Reservation, request_id: str, attempt_id: int) -> None:
        from kv_transfer import wire
        self._t, self._sender, self._wire = transport, sender, wire
        self._base = wire.header_base(reservation, request_id, attempt_id)
        self._block_ids = wire.target_block_ids(reservation)
        self._ledger = wire.SendLedger(lambda item: item[0])     # numbering, crc, last chunk held
        self._cond = threading.Condition()
        self._pending = 0
        self._error: TransferError | None = None
        self.aborted = self._finished = False

    def send(self, layer_start: int, layer_end: int, kv: Tensor) -> None:
        if self._finished:
            raise RuntimeError("send() after finish()")
        if self.aborted or self._error is not None or not self._block_ids:
            return                      # an error surfaces in finish(); no blocks: D has them
        # No lease check: the router renews D's lease while the prefill runs; D judges.
        on_host = self._sender.device.type == "cpu"
        kv = kv.detach().to(self._sender.device)
        column = 2 * kv[0, 0, 0].numel() * kv.element_size() * (layer_end - layer_start)
        max_bytes = min(self._t.max_chunk_bytes, column * MAX_BLOCKS_PER_CHUNK)
        chunks = self._wire.plan_chunks(self._base, layer_start, layer_end, self._block_ids, kv,
                                        self._ledger.next_index, max_bytes, checksum=on_host)
        event = None
        if not on_host:
            event = torch.cuda.Event()  # the sender's stream waits for the copies above
            event.record(torch.cuda.current_stream(self._sender.device))
        for header, piece, ev in self._ledger.push([(h, p, event) for h, p in chunks]):
            self._enqueue(FrameKind.CHUNK, header, self._t.tamper(header, piece), ev)

    def finish(self, timeout: float) -> SendSummary:
        if not self._finished and not self.aborted and self._error is None:
            self._finished = True
            held = self._ledger.finish()        # the last chunk, now carrying num_chunks
            if held is not None:
                self._enqueue(FrameKind.CHUNK, held[0], self._t.tamper(held[0], held[1]), held[2])
            end = kv_pb2.KVChunkHeader()
            end.CopyFrom(self._base)
            end.num_chunks = self._ledger.next_index
            self._enqueue(FrameKind.END, end, None, None)
        with self._cond:
            done = self._cond.wait_for(lambda: not self._pending or self._error is not None, timeout)
        if self._error is not None:
            self.abort()                # chunks still queued for this attempt are dropped
            raise self._error
        if self.aborted:
            raise TransferError("transfer aborted")
        if not done:
            self.abort()
            raise TransferError(f"KV to rank {self._sender.dst} not acknowledged within {timeout:.1f}s")
        return self._ledger.summary()

    def abort(self) -> None:
        self.aborted = True

    def _enqueue(self, kind: FrameKind, header: kv_pb2.KVChunkHeader, payload: Tensor | None,
                 event: torch.cuda.Event | None) -> None:
        with self._cond:
            self._pending += 1
        try:
            self._sender.queue.put((self, kind, header, payload, event), timeout=self._t.enqueue_timeout_s)
        except queue.Full:              # the peer is stuck; reported by finish()
            self.abort()
            self._done(TransferError(f"KV queue to rank {self._sender.dst} full for "
                                     f"{self._t.enqueue_timeout_s:.0f}s"))

    def _fail(self, error: TransferError) -> None:
        with self._cond:
            self._error = self._error or error
            self._cond.notify_all()

    def _done(self, error: TransferError | None, ack: list[int] | None = None) -> None:
        if ack is not None and ack[0] != kv_pb2.KV_STATUS_OK:
            error = TransferError(f"D rank {self._sender.dst} rejected the KV "
                                  f"({kv_pb2.KVStatus.Name(ack[0])}) after {ack[1]} good chunks", ack[0])
        with self._cond:
            self._pending -= 1
            self._error = self._error or error
            self._cond.notify_all()


@register("nccl")
class DistTransport(KVTransport):
    """P side. D's rank: `rank_of(reservation)`, by default transport_params["rank"].
    Completion records go through `control` (gRPC Complete) or, in tests, straight to
    `local_receivers[rank]`. `peer_ranks`: the D ranks this P may send to, connected at
    construction and told BYE at close() (D ranks reached otherwise are told BYE too)."""
    name = "nccl"

    def __init__(self, rank_of: Callable[[worker_pb2.Reservation], int] | None = None,
                 control: ControlChannel | None = None, *,
                 local_receivers: Mapping[int, CompletionSink] | None = None,
                 device: torch.device | str | None = None, peer_ranks: tuple[int, ...] = (),
                 queue_frames: int = 64, enqueue_timeout_s: float = 30.0,
                 max_chunk_bytes: int = MAX_CHUNK_BYTES) -> None:
        if not dist.is_initialized():
            raise RuntimeError("nccl transport: call init_kv_group() first")
        if control is None and local_receivers is None:
            raise ValueError("nccl transport needs a control channel (or local_receivers)")
        self._rank_of = rank_of or (lambda r: int(r.transport_params["rank"]))
        self._control, self._local = control, dict(local_receivers or {})
        self._device = _wire_device(device)
        self._queue_frames, self._peer_ranks = queue_frames, peer_ranks
        self.enqueue_timeout_s, self.max_chunk_bytes = enqueue_timeout_s, max_chunk_bytes
        self._senders: dict[int, _PeerSender] = {}
        self._lock = threading.Lock()
        # Test hook: (header, payload) -> the payload actually sent (fault injection).
        self.tamper: Callable[[kv_pb2.KVChunkHeader, Tensor], Tensor] = lambda h, p: p
        for rank in peer_ranks:
            # connect now: NCCL builds a pair's communicator on its first op, which would
            # otherwise land in the first request's time to first token
            self._sender(rank).queue.put((None, FrameKind.PING, None, None, None))

    def _sender(self, rank: int) -> _PeerSender:
        if rank == dist.get_rank() or not 0 <= rank < dist.get_world_size():
            raise TransferError(f"bad destination rank {rank} in the KV group", kv_pb2.KV_STATUS_INVALID)
        with self._lock:
            if rank not in self._senders:
                self._senders[rank] = _PeerSender(rank, self._device, self._queue_frames)
            return self._senders[rank]

    def open(self, reservation: worker_pb2.Reservation, request_id: str,
             attempt_id: int) -> KVSendHandle:
        try:
            rank = self._rank_of(reservation)
        except (KeyError, ValueError) as e:
            raise TransferError(f"no usable D rank in the reservation: {e}", kv_pb2.KV_STATUS_INVALID) from e
        sender = self._sender(rank)
        stuck = sender.busy_since and time.monotonic() - sender.busy_since > self.enqueue_timeout_s
        if sender.error is not None or stuck:
            # fail fast so the router picks another path instead of queueing behind it
            raise sender.error or TransferError(f"KV stream to rank {rank} stalled")
        return DistSendHandle(self, sender, reservation, request_id, attempt_id)

    def complete(self, reservation: worker_pb2.Reservation, record: worker_pb2.CompletionRecord,
                 timeout: float) -> kv_pb2.CompleteAck:
        if self._control is not None:
            return self._control.complete(reservation, record, timeout)
        return self._local[self._rank_of(reservation)].complete(record)

    def close(self, timeout: float = 10.0) -> None:
        """BYE to every D this transport talked to; stop the threads."""
        with self._lock:
            senders, self._senders = list(self._senders.values()), {}
        deadline = time.monotonic() + timeout
        for s in senders:
            with contextlib.suppress(queue.Full):
                s.queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
        for s in senders:
            s._thread.join(max(0.0, deadline - time.monotonic()))
            if s._thread.is_alive():
                logger.warning("KV sender to rank %d did not stop within %.1fs", s.dst, timeout)


# --- D side ---------------------------------------------------------------------------

class DistKVListener:
    """D side: one daemon thread per P rank reads that rank's frames, hands each chunk to
    `receiver.receive(header, tensor)` (a KVReceiver: thread-safe, it is shared with D's
    gRPC threads) and acks each END with the attempt's first rejection."""

    def __init__(self, receiver: object, peer_ranks: list[int], device: torch.device | str | None,
                 *, max_payload_bytes: int = 4 << 30, max_attempts: int = 4096) -> None:
        if not dist.is_initialized():
            raise RuntimeError("DistKVListener: call init_kv_group() first")
        self._receiver = receiver
        self._device = _wire_device(device)
        self._max_payload, self._max_attempts = max_payload_bytes, max_attempts
        self._closing = False
        self.chunks = 0             # chunks handed to the receiver, any outcome (metrics, tests)
        self._threads = [threading.Thread(target=self._serve, args=(r,), name=f"kv-recv-{r}",
                                          daemon=True) for r in peer_ranks]
        for t in self._threads:
            t.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop writing chunks (they are still drained); threads exit on their P's BYE."""
        self._closing = True
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            logger.info("KV receive threads still waiting for BYE (daemons): %s", alive)

    def _serve(self, src: int) -> None:
        stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        frame = torch.empty(FRAME_BYTES, dtype=torch.uint8, device=self._device)
        # (request_id, attempt_id) -> [first bad KVStatus or OK, good chunks, good bytes];
        # only this thread touches it. Bounded: attempts whose P died never see END.
        attempts: OrderedDict[tuple[str, int], list[int]] = OrderedDict()
        try:
            with _stream_ctx(stream):
                while self._step(src, frame, stream, attempts):
                    pass
        except Exception as e:
            if not self._closing:
                logger.error("KV stream from rank %d broken, no more KV from it: %s", src, e)

    def _step(self, src: int, frame: Tensor, stream: torch.cuda.Stream | None,
              attempts: OrderedDict[tuple[str, int], list[int]]) -> bool:
        from kv_transfer.layout import dtype_from_proto
        dist.recv(frame, src, tag=_TAG_FRAME)
        kind, header = unpack_frame(frame.cpu())    # on CUDA: waits for the recv
        if kind is FrameKind.BYE:
            return False
        if kind is FrameKind.PING:
            return True
        key = (header.request_id, header.attempt_id)
        state = attempts.pop(key, None) or [kv_pb2.KV_STATUS_OK, 0, 0]
        if kind is FrameKind.END:
            if stream is not None:
                stream.synchronize()    # the writes of the chunks before END are done
            ack = torch.tensor([*state, header.attempt_id], dtype=torch.int64, device=self._device)
            dist.send(ack, src, tag=_TAG_ACK)
            return True
        shape, dtype = torch.Size(header.shape), dtype_from_proto(header.dtype)
        size = shape.numel() * torch.empty((), dtype=dtype).element_size()
        if not shape or size != header.payload_bytes or size > self._max_payload:
            # the payload's size is unknowable, so the stream cannot be drained
            raise ValueError(f"undrainable chunk: shape {list(shape)} {dtype}, "
                             f"payload_bytes {header.payload_bytes}")
        payload = torch.empty(shape, dtype=dtype, device=self._device)
        dist.recv(payload, src, tag=_TAG_PAYLOAD)   # always received: keeps the stream framed
        if self._closing:
            code, message = kv_pb2.KV_STATUS_UNKNOWN_RESERVATION, "decode worker closing"
        else:
            code, message = self._receiver.receive(header, payload)  # type: ignore[attr-defined]
            self.chunks += 1
        if code == kv_pb2.KV_STATUS_OK and state[0] == kv_pb2.KV_STATUS_OK:
            state[1] += 1
            state[2] += header.payload_bytes
        elif state[0] == kv_pb2.KV_STATUS_OK:
            state[0] = code
            logger.warning("rank %d: chunk %d of %s attempt %d rejected (%s): %s", src,
                           header.chunk_index, header.request_id, header.attempt_id,
                           kv_pb2.KVStatus.Name(code), message)
        attempts[key] = state
        while len(attempts) > self._max_attempts:
            attempts.popitem(last=False)
        return True
