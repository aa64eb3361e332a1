"""DeferredSendHandle: the P side of an attempt whose reservation is still on its way.

The router asks D for blocks and P for the prefill at the same time (PrefillTask with
reservation_follows), so the reserve round trip is not on the time to first token. P
starts computing at once; the KV its forward pass produces waits here until the
reservation arrives (AttachReservation), then goes to D in the order it was produced:

    send(l0, l1, kv) ─▶ kept (kv is the gathered copy; P's own blocks may be freed)
    bind(real handle) ─▶ replays what was kept, in order; later sends go straight through
    finish(timeout)   ─▶ waits for bind() (within the same timeout), then the real finish
    fail(error)       ─▶ the reservation could not be used: finish() raises it
    abort()           ─▶ drops what was kept; aborts the real handle if bound

Thread-safe between the engine thread (send) and the thread that binds (the worker's
event loop): a send racing with bind() waits for the replay, so order is preserved.
"""
from __future__ import annotations

import threading
import time

from torch import Tensor

from kv_transfer.base import KVSendHandle, SendSummary, TransferError
from pdserve.v1 import kv_pb2, worker_pb2


class DeferredSendHandle(KVSendHandle):
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._kept: list[tuple[int, int, Tensor]] = []
        self._handle: KVSendHandle | None = None
        self.reservation: worker_pb2.Reservation | None = None
        self._error: TransferError | None = None
        self._aborted = False

    @property
    def bound(self) -> bool:
        return self._handle is not None

    def send(self, layer_start: int, layer_end: int, kv: Tensor) -> None:
        with self._cond:
            if self._aborted or self._error is not None:
                return                      # finish() reports it
            if self._handle is None:
                self._kept.append((layer_start, layer_end, kv))
                return
            # Sent under the lock: a bind() replaying on another thread finishes first.
            self._handle.send(layer_start, layer_end, kv)

    def bind(self, handle: KVSendHandle, reservation: worker_pb2.Reservation) -> None:
        """The reservation arrived and `handle` was opened on it: send what was kept."""
        with self._cond:
            if self._handle is not None:
                raise RuntimeError("send handle already bound")
            if self._aborted or self._error is not None:
                handle.abort()
                return
            self._handle, self.reservation = handle, reservation
            kept, self._kept = self._kept, []
            try:
                for layer_start, layer_end, kv in kept:
                    handle.send(layer_start, layer_end, kv)
            except TransferError as e:      # the real handle failed: finish() says so
                self._error = e
            finally:
                self._cond.notify_all()

    def fail(self, error: TransferError) -> None:
        """The reservation never came, or could not be used (another KV layout, a cache
        P cannot open): drop what was kept; finish() raises `error`."""
        with self._cond:
            if self._handle is None and self._error is None:
                self._error = error
                self._kept = []
            self._cond.notify_all()

    def finish(self, timeout: float) -> SendSummary:
        end = time.monotonic() + timeout
        with self._cond:
            while self._handle is None and self._error is None and not self._aborted:
                left = end - time.monotonic()
                if left <= 0:
                    self._kept = []
                    raise TransferError(f"no reservation from the decode worker within "
                                        f"{timeout:.1f}s", kv_pb2.KV_STATUS_UNKNOWN_RESERVATION)
                self._cond.wait(left)
            if self._error is not None:
                raise self._error
            if self._aborted and self._handle is None:
                raise TransferError("transfer aborted")
            handle = self._handle
        assert handle is not None
        return handle.finish(max(0.01, end - time.monotonic()))

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._kept = []
            handle = self._handle
            self._cond.notify_all()
        if handle is not None:
            handle.abort()
