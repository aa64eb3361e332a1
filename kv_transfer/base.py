"""KVTransport: moving one request's prompt KV from a prefill worker (P) into blocks that
a decode worker (D) has reserved. One interface, four transports (registry below):

    transport   payload path                              control (Complete)
    local       same process: direct tensor copy           direct call
    grpc        KVTransfer.Push chunk stream (<= 4 MiB)    KVTransfer.Complete
    nccl        torch.distributed send/recv (gloo on CPU)  KVTransfer.Complete (gRPC)
    ipc         CUDA IPC handle of D's cache, P copies in  KVTransfer.Complete (gRPC)

Protocol for one attempt (all transports):

    P                                                    D
    open(reservation, request_id, attempt_id) ────────▶  (nothing yet)
    send(layer_start, layer_end, kv)  ─ chunk(s) ─────▶  KVReceiver.receive(header, payload)
       ... once per layer range, while later layers compute ...
    finish() -> SendSummary(num_chunks, checksum, bytes)
    complete(CompletionRecord) ───────────────────────▶  KVReceiver.complete(record)
                                                         → sequence joins D's batch

`kv` for send() is P's KV of those layers for the request's blocks, gathered in D's
block order (see KV_PAYLOAD_LAYOUT); P's block ids never leave P.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from pdserve.v1 import kv_pb2, worker_pb2

# payload tensor: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
KV_PAYLOAD_LAYOUT = "layers,kv,blocks,block_size,kv_heads,head_dim"
MAX_CHUNK_BYTES = 4 << 20     # grpc chunks stay <= 4 MiB (measured sweet spot on loopback)


class TransferError(RuntimeError):
    """A transfer failed; `code` is a kv_pb2.KVStatus value."""

    def __init__(self, message: str, code: int = kv_pb2.KV_STATUS_UNSPECIFIED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SendSummary:
    num_chunks: int
    checksum: int          # crc32c over all payloads in chunk_index order (crc32c.extend)
    num_bytes: int


class KVSendHandle(abc.ABC):
    """P side, one per attempt. Not thread-safe: one producer calls send() in order."""

    @abc.abstractmethod
    def send(self, layer_start: int, layer_end: int, kv: Tensor) -> None:
        """Queue the KV of layers [layer_start, layer_end) (payload layout above).
        May return before the bytes are on the wire; errors surface in finish()."""

    @abc.abstractmethod
    def finish(self, timeout: float) -> SendSummary:
        """Wait until every chunk is acknowledged by D; raise TransferError on failure
        or after `timeout` seconds."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Stop sending (cancel, deadline); idempotent."""


class KVTransport(abc.ABC):
    """P-side factory of send handles for one transport kind."""
    name: str
    # True: P sends each layer's KV as soon as the layer has written it, so the transfer
    # overlaps the rest of the forward pass. False: one send of every layer after it.
    layerwise: bool = True

    @abc.abstractmethod
    def open(self, reservation: worker_pb2.Reservation, request_id: str,
             attempt_id: int) -> KVSendHandle: ...

    @abc.abstractmethod
    def complete(self, reservation: worker_pb2.Reservation,
                 record: worker_pb2.CompletionRecord, timeout: float) -> kv_pb2.CompleteAck: ...

    def close(self) -> None:
        """Release channels / process groups."""


TRANSPORTS: dict[str, Callable[..., KVTransport]] = {}


def register(name: str) -> Callable[[Callable[..., KVTransport]], Callable[..., KVTransport]]:
    def deco(factory: Callable[..., KVTransport]) -> Callable[..., KVTransport]:
        TRANSPORTS[name] = factory
        return factory
    return deco
