"""The KV chunk wire format: split a payload into self-describing chunks, and turn one
received chunk back into a tensor after checking it.

How P chunks a send(layer_start, layer_end, kv):

    kv: [L, 2, B, bs, Hkv, D]       unit = one (layer, block): 2*bs*Hkv*D*itemsize bytes
    usually one block of all L layers fits max_chunk_bytes, and kv is cut by blocks:

        chunk i   = kv[:, :, b0:b1]  (contiguous copy), header names D's
                    block_ids[b0:b1] and layers [layer_start, layer_end)

    if it does not (many layers of a big model in one send), each chunk is one block of
    as many layers as fit. Every chunk holds at least one unit, so a tiny
    max_chunk_bytes still makes progress (exceeding the limit by less than one unit).

Checksums are CRC-32C (Castagnoli): each header carries the crc of its payload; the
attempt's checksum is the crc of all payloads concatenated in chunk_index order (what
google_crc32c.extend over the payloads in order gives). Both sides derive it from the
per-chunk crcs with crc32c_combine, so every payload byte is checksummed once, not twice.
"""
from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import google_crc32c
import numpy as np
import torch
from torch import Tensor

from kv_transfer.base import SendSummary, TransferError
from kv_transfer.layout import KVLayout, dtype_from_proto, dtype_to_proto
from pdserve.v1 import kv_pb2, worker_pb2

logger = logging.getLogger(__name__)

Payload = bytes | memoryview | np.ndarray
T = TypeVar("T")

# decode_payload views received (read-only) bytes as a tensor on purpose: the tensor is
# only read, to copy it into the cache, so torch's "buffer is not writable" warning is
# noise here. Scoped to warnings raised from this module.
warnings.filterwarnings("ignore", message="The given buffer is not writable",
                        category=UserWarning, module=__name__)


def _require_little_endian() -> None:
    # The payload is raw little-endian tensor memory; a big-endian host would misread
    # it silently, so refuse instead of byte-swapping every chunk.
    if sys.byteorder != "little":
        raise TransferError("KV wire format needs a little-endian host", kv_pb2.KV_STATUS_INCOMPATIBLE)


def crc32c(buf: Payload) -> int:
    """CRC-32C of a bytes-like payload (google_crc32c only takes read-only buffers or
    contiguous numpy arrays; a memoryview goes through a zero-copy numpy view)."""
    if isinstance(buf, bytes | np.ndarray):
        return google_crc32c.value(buf)
    return google_crc32c.value(np.frombuffer(buf, dtype=np.uint8))


# --- crc32c_combine: crc(A + B) from crc(A), crc(B) and len(B), as zlib's crc32_combine
# does for CRC-32, with the reflected Castagnoli polynomial. Polynomials are 32-bit
# reflected: bit 31 is x^0.
_POLY = 0x82F63B78


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) mod p(x)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    table, p = [], 1 << 30          # x^1
    for _ in range(32):
        table.append(p)             # x^(2^n) mod p(x)
        p = _multmodp(p, p)
    return table


_X2N = _x2n_table()


def _x2nmodp(n: int, k: int) -> int:
    """x^(n * 2^k) mod p(x)."""
    p = 1 << 31                     # x^0
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32c_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """crc32c(A + B) given crc32c(A), crc32c(B) and len(B) in bytes; equals
    google_crc32c.extend(crc_a, B). crc_a = 0 is the crc of nothing."""
    if len_b == 0:
        return crc_a
    return _multmodp(_x2nmodp(len_b, 3), crc_a) ^ crc_b


# --- P side ---------------------------------------------------------------------------

def target_block_ids(reservation: worker_pb2.Reservation) -> list[int]:
    """D's block ids that P fills: the reservation's blocks minus the ones D already
    holds from its own prefix cache (the first num_cached_tokens // block_size)."""
    cached = 0
    if reservation.num_cached_tokens:
        if not reservation.block_size or reservation.num_cached_tokens % reservation.block_size:
            raise ValueError("reservation.num_cached_tokens must be a multiple of a nonzero block_size")
        cached = reservation.num_cached_tokens // reservation.block_size
    return list(reservation.block_ids[cached:])


def header_base(reservation: worker_pb2.Reservation, request_id: str,
                attempt_id: int) -> kv_pb2.KVChunkHeader:
    """The per-attempt header fields, copied from the reservation (see kv.proto)."""
    return kv_pb2.KVChunkHeader(request_id=request_id, attempt_id=attempt_id,
                                reservation_id=reservation.reservation_id,
                                compat_hash=reservation.compat_hash)


def split_ranges(num_layers: int, num_blocks: int, unit_bytes: int,
                 max_chunk_bytes: int) -> list[tuple[int, int, int, int]]:
    """(l0, l1, b0, b1) pieces of a [num_layers, 2, num_blocks, ...] payload, each at most
    max_chunk_bytes (or one unit = one layer of one block, unit_bytes), layer-major."""
    if max_chunk_bytes < 1:
        raise ValueError(f"max_chunk_bytes must be >= 1, got {max_chunk_bytes}")
    column = unit_bytes * num_layers         # one block, every layer of the send
    if column <= max_chunk_bytes:
        # the usual case (a send is one or a few layers): cut by blocks only
        layers_per, blocks_per = num_layers, max(1, min(num_blocks, max_chunk_bytes // column))
    else:
        # a send of many layers of a big model: one block of all of them is too large,
        # so cut the layers too (each chunk: one block, as many layers as fit)
        layers_per, blocks_per = max(1, max_chunk_bytes // unit_bytes), 1
    out = []
    for l0 in range(0, num_layers, layers_per):
        l1 = min(num_layers, l0 + layers_per)
        for b0 in range(0, num_blocks, blocks_per):
            out.append((l0, l1, b0, min(num_blocks, b0 + blocks_per)))
    return out


def tensor_bytes(t: Tensor) -> np.ndarray:
    """Zero-copy uint8 view of a CPU tensor's memory (copies only if it is on a device
    or not contiguous). Works for bfloat16, which numpy has no dtype for."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def plan_chunks(base: kv_pb2.KVChunkHeader, layer_start: int, layer_end: int,
                block_ids: Sequence[int], kv: Tensor, first_chunk_index: int,
                max_chunk_bytes: int, checksum: bool = True,
                contiguous: bool = True) -> list[tuple[kv_pb2.KVChunkHeader, Tensor]]:
    """Headers plus payload tensors (on kv's device) for one send(): contiguous copies,
    or views of kv with contiguous=False. With checksum=False the headers carry
    crc32c = 0 (only for tensor transports that have their own integrity; the receiver
    then skips the crc checks)."""
    _require_little_endian()
    n_layers = layer_end - layer_start
    if kv.dim() != 6 or kv.shape[0] != n_layers or kv.shape[1] != 2 or kv.shape[2] != len(block_ids):
        raise ValueError(f"kv {tuple(kv.shape)} is not [{n_layers}, 2, {len(block_ids)}, bs, Hkv, D]")
    if n_layers < 1 or not block_ids:
        raise ValueError("a send needs at least one layer and one block")
    wire_dtype = dtype_to_proto(kv.dtype)
    unit = 2 * kv[0, 0, 0].numel() * kv.element_size()
    out = []
    for i, (l0, l1, b0, b1) in enumerate(split_ranges(n_layers, len(block_ids), unit, max_chunk_bytes)):
        piece = kv[l0:l1, :, b0:b1]
        if contiguous:
            piece = piece.contiguous()
        h = kv_pb2.KVChunkHeader()
        h.CopyFrom(base)
        h.layer_start, h.layer_end = layer_start + l0, layer_start + l1
        del h.block_ids[:]
        h.block_ids.extend(int(b) for b in block_ids[b0:b1])
        h.dtype = wire_dtype
        del h.shape[:]
        h.shape.extend(piece.shape)
        h.chunk_index = first_chunk_index + i
        h.payload_bytes = piece.numel() * piece.element_size()
        h.crc32c = crc32c(tensor_bytes(piece)) if checksum else 0
        out.append((h, piece))
    return out


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class OutChunk:
    """A KVChunk on P's side whose payload stays as uint8 views of the sender's KV
    tensor until it is serialized. SerializeToString() gives the bytes protobuf would
    (header, field 1, then payload, field 2), assembled with one copy: building a
    KVChunk message and serializing it would copy the payload three times (tobytes,
    the message, the serialization), which capped the grpc transport's throughput.
    The header stays mutable until then (the last chunk gets num_chunks at finish).

    The crc is computed here too, right before the copy, on gRPC's sending thread: the
    copy then reads bytes the crc just pulled into the CPU cache (on a box whose memory
    bandwidth is the limit, one DRAM pass less), and the engine thread that called
    send() never spends time on it. SendLedger reads the crcs at summary(), after every
    chunk has gone out.

    The views keep `kv` alive; the sender must not modify it afterwards (every caller
    passes a fresh gather or device->host copy)."""

    __slots__ = ("header", "_parts", "_payload", "_crc_done")

    def __init__(self, header: kv_pb2.KVChunkHeader, parts: list[np.ndarray]) -> None:
        self.header = header
        self._parts = parts
        self._payload: bytes | None = None
        self._crc_done = False

    def checksum(self) -> int:
        """The payload's crc32c (computed once, stamped into the header)."""
        if not self._crc_done:
            crc = 0
            for part in self._parts:
                crc = google_crc32c.extend(crc, part)
            self.header.crc32c = crc
            self._crc_done = True
        return self.header.crc32c

    @property
    def payload(self) -> bytes:
        """The payload bytes as sent (a copy; stamps the crc like sending does)."""
        self.checksum()
        if self._payload is None:
            self._payload = b"".join(self._parts)
        return self._payload

    @payload.setter
    def payload(self, data: bytes) -> None:   # tests: alter the bytes on the "wire"
        self.checksum()                        # ... after the sender's crc
        self._payload, self._parts = bytes(data), []

    def SerializeToString(self) -> bytes:  # noqa: N802 - the protobuf method name
        self.checksum()
        parts = self._parts if self._payload is None else [self._payload]
        head = self.header.SerializeToString()
        size = sum(memoryview(p).nbytes for p in parts)
        out = [b"\x0a", _varint_bytes(len(head)), head]
        if size:
            out += [b"\x12", _varint_bytes(size), *parts]
        return b"".join(out)


def encode_chunks(base: kv_pb2.KVChunkHeader, layer_start: int, layer_end: int,
                  block_ids: Sequence[int], kv: Tensor, first_chunk_index: int,
                  max_chunk_bytes: int) -> list[OutChunk]:
    """Byte chunks for the grpc transport: kv [layers, 2, len(block_ids), bs, Hkv, D]
    (block_ids are D's, in kv's block order). num_chunks is left 0: the sender sets it on
    its last chunk, when it knows the total."""
    kv = kv.detach().cpu().contiguous()  # one device->host copy for the whole send
    width = _SAME_WIDTH_INT[kv.element_size()]   # numpy has no bfloat16: same-width ints
    chunks = []
    for h, piece in plan_chunks(base, layer_start, layer_end, block_ids, kv,
                                first_chunk_index, max_chunk_bytes, checksum=False, contiguous=False):
        # piece [l, 2, b, ...] of a contiguous kv: each [l, k/v] slab is one contiguous run,
        # and the slabs in order are the payload's C order.
        parts = [piece[i, j].view(width).numpy().view(np.uint8).reshape(-1)
                 for i in range(piece.shape[0]) for j in range(2)]
        chunks.append(OutChunk(h, parts))       # crc32c: at serialization
    return chunks


class SendLedger(Generic[T]):
    """P-side bookkeeping of one attempt, shared by the send handles: chunk numbering,
    the running checksum and byte count, and the last chunk held back. Why hold one
    back: kv.proto asks the last chunk to carry num_chunks, and a handle only knows
    which chunk was last when finish() is called; the cost is one chunk's delay."""

    def __init__(self, header_of: Callable[[T], kv_pb2.KVChunkHeader]) -> None:
        self._header_of = header_of
        self._held: T | None = None
        self.next_index = 0     # chunk_index of the next chunk to plan
        self.num_bytes = 0
        # crc32c of all payloads in order, combined at summary() from the headers: an
        # OutChunk stamps its crc only when it is serialized
        self._headers: list[kv_pb2.KVChunkHeader] = []

    def push(self, items: Sequence[T]) -> list[T]:
        """Account newly planned chunks (numbered from next_index); returns those that
        may go out now, in order."""
        out = [] if self._held is None else [self._held]
        for item in items:
            h = self._header_of(item)
            if h.chunk_index != self.next_index:
                raise ValueError(f"chunk {h.chunk_index} planned out of order (next {self.next_index})")
            self._headers.append(h)
            self.num_bytes += h.payload_bytes
            self.next_index += 1
            out.append(item)
        self._held = out.pop() if out else None
        return out

    def finish(self) -> T | None:
        """The held-back last chunk, now stamped with num_chunks (None if none was sent)."""
        held, self._held = self._held, None
        if held is not None:
            self._header_of(held).num_chunks = self.next_index
        return held

    def summary(self) -> SendSummary:
        """Call once every chunk is out (after D's ack): all crcs are stamped by then."""
        checksum = 0
        for h in self._headers:
            checksum = crc32c_combine(checksum, h.crc32c, h.payload_bytes)
        return SendSummary(num_chunks=self.next_index, checksum=checksum, num_bytes=self.num_bytes)


# --- D side ---------------------------------------------------------------------------

@dataclass(frozen=True)
class WireChunk:
    """A received KVChunk whose payload is a zero-copy view of the message bytes."""
    header: kv_pb2.KVChunkHeader
    payload: memoryview


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint in KVChunk")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def parse_chunk(data: bytes) -> WireChunk:
    """Deserialize a KVChunk without copying its payload. Why not KVChunk.FromString:
    protobuf copies the payload once when parsing and again on every `.payload` access,
    which on D's serial receive path costs more than the crc and the cache write
    together. Same semantics as protobuf for this message: fields in any order, the
    last payload wins, repeated headers merge, unknown fields are skipped; a malformed
    message raises ValueError (the RPC then fails)."""
    buf = memoryview(data)
    header = kv_pb2.KVChunkHeader()
    payload = buf[0:0]
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError("KVChunk field runs past the end of the message")
            if field == 1:
                header.MergeFromString(buf[pos:pos + size])
            elif field == 2:
                payload = buf[pos:pos + size]
            pos += size
        elif wire_type == 0:
            _, pos = _varint(buf, pos)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire_type} in KVChunk")
    if pos != len(buf):
        raise ValueError("truncated KVChunk")
    return WireChunk(header, payload)


def _nbytes(payload: Payload) -> int:
    return payload.nbytes if isinstance(payload, memoryview | np.ndarray) else len(payload)


def check_shape(header: kv_pb2.KVChunkHeader, layout: KVLayout) -> tuple[int, ...]:
    """Validate dtype/shape/payload_bytes of a header against D's layout (not the
    payload itself); returns the payload shape. TransferError(INVALID) on mismatch."""
    invalid = kv_pb2.KV_STATUS_INVALID
    if not 0 <= header.layer_start < header.layer_end <= layout.num_layers:
        raise TransferError(f"bad layer range [{header.layer_start}, {header.layer_end}) "
                            f"for {layout.num_layers} layers", invalid)
    if not header.block_ids:
        raise TransferError("chunk names no blocks", invalid)
    dtype = dtype_from_proto(header.dtype)
    if dtype != layout.dtype:
        raise TransferError(f"chunk dtype {dtype} != cache dtype {layout.dtype}", invalid)
    expected = layout.payload_shape(header.layer_end - header.layer_start, len(header.block_ids))
    if tuple(header.shape) != expected:
        raise TransferError(f"chunk shape {tuple(header.shape)} != expected {expected}", invalid)
    size = layout.payload_bytes(expected[0], expected[2])
    if header.payload_bytes != size:
        raise TransferError(f"payload_bytes {header.payload_bytes} != {size} for shape {expected}", invalid)
    return expected


def decode_payload(header: kv_pb2.KVChunkHeader, payload: Payload, layout: KVLayout) -> Tensor:
    """Check a received chunk's header and bytes, and view the bytes as the payload
    tensor (zero-copy, read-only memory: the caller copies it into the cache). Raises
    TransferError with INVALID (header vs layout vs length) or CORRUPT (crc)."""
    _require_little_endian()
    shape = check_shape(header, layout)
    n = _nbytes(payload)
    if n != header.payload_bytes:
        raise TransferError(f"payload is {n} bytes, header says {header.payload_bytes}",
                            kv_pb2.KV_STATUS_INVALID)
    crc = crc32c(payload)
    if crc != header.crc32c:
        raise TransferError(f"crc32c mismatch on chunk {header.chunk_index}: "
                            f"got {crc:#010x}, header {header.crc32c:#010x}", kv_pb2.KV_STATUS_CORRUPT)
    # Raw bytes -> uint8 -> the cache dtype: torch.frombuffer never interprets objects,
    # so a hostile payload is at worst wrong numbers (and then it fails the crc above).
    raw = torch.frombuffer(payload, dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
    return raw.view(layout.dtype).view(shape)
