"""DeferredSendHandle: the KV a prefill produces before its reservation arrives is kept,
then sent in order once the real handle is bound; finish() waits for the binding."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from kv_transfer.base import KVSendHandle, SendSummary, TransferError
from kv_transfer.deferred import DeferredSendHandle
from pdserve.v1 import kv_pb2, worker_pb2


class Recorder(KVSendHandle):
    def __init__(self, fail_on: int | None = None) -> None:
        self.sent: list[tuple[int, int, float]] = []
        self.aborted = False
        self.fail_on = fail_on

    def send(self, layer_start: int, layer_end: int, kv: torch.Tensor) -> None:
        if self.fail_on is not None and layer_start == self.fail_on:
            raise TransferError("refused", kv_pb2.KV_STATUS_CORRUPT)
        self.sent.append((layer_start, layer_end, float(kv.sum())))

    def finish(self, timeout: float) -> SendSummary:
        return SendSummary(num_chunks=len(self.sent), checksum=7, num_bytes=1)

    def abort(self) -> None:
        self.aborted = True


RES = worker_pb2.Reservation(reservation_id="res-1")


def kv(i: int) -> torch.Tensor:
    return torch.full((1, 2, 1, 4, 1, 2), float(i))


def test_kept_sends_are_replayed_in_order_then_sends_go_straight_through():
    h = DeferredSendHandle()
    for layer in range(3):
        h.send(layer, layer + 1, kv(layer))
    real = Recorder()
    assert not h.bound and h.reservation is None
    h.bind(real, RES)
    assert real.sent == [(0, 1, 0.0), (1, 2, 16.0), (2, 3, 32.0)]
    h.send(3, 4, kv(3))
    assert real.sent[-1] == (3, 4, 48.0)
    assert h.finish(1.0) == SendSummary(num_chunks=4, checksum=7, num_bytes=1)
    assert h.reservation is RES


def test_finish_waits_for_the_binding():
    h = DeferredSendHandle()
    h.send(0, 2, kv(1))
    real = Recorder()
    threading.Timer(0.2, h.bind, args=(real, RES)).start()
    t0 = time.monotonic()
    assert h.finish(5.0).num_chunks == 1
    assert 0.15 <= time.monotonic() - t0 < 2.0
    assert real.sent == [(0, 2, 16.0)]


def test_finish_without_a_reservation_times_out_and_drops_what_was_kept():
    h = DeferredSendHandle()
    h.send(0, 1, kv(1))
    t0 = time.monotonic()
    with pytest.raises(TransferError, match="no reservation"):
        h.finish(0.2)
    assert time.monotonic() - t0 >= 0.19
    assert h._kept == []


def test_fail_is_what_finish_raises_and_a_later_bind_sends_nothing():
    h = DeferredSendHandle()
    h.send(0, 1, kv(1))
    h.fail(TransferError("incompatible", kv_pb2.KV_STATUS_INCOMPATIBLE))
    real = Recorder()
    h.bind(real, RES)
    assert real.sent == [] and real.aborted
    with pytest.raises(TransferError, match="incompatible") as e:
        h.finish(1.0)
    assert e.value.code == kv_pb2.KV_STATUS_INCOMPATIBLE


def test_abort_before_and_after_the_binding():
    before = DeferredSendHandle()
    before.send(0, 1, kv(1))
    before.abort()
    real = Recorder()
    before.bind(real, RES)                 # the reservation came after the abort
    assert real.sent == [] and real.aborted
    with pytest.raises(TransferError, match="aborted"):
        before.finish(1.0)

    after = DeferredSendHandle()
    real2 = Recorder()
    after.bind(real2, RES)
    after.abort()
    assert real2.aborted


def test_a_refused_replay_fails_the_attempt():
    h = DeferredSendHandle()
    h.send(0, 1, kv(0))
    h.send(1, 2, kv(1))
    h.bind(Recorder(fail_on=1), RES)
    with pytest.raises(TransferError, match="refused"):
        h.finish(1.0)


def test_sends_racing_with_the_binding_keep_their_order():
    """The engine thread sends layer after layer while another thread binds: every layer
    reaches the real handle exactly once, in order."""
    for _ in range(20):
        h = DeferredSendHandle()
        real = Recorder()
        layers = 64

        def produce():
            for layer in range(layers):
                h.send(layer, layer + 1, kv(layer))
        t = threading.Thread(target=produce)
        t.start()
        h.bind(real, RES)
        t.join()
        assert [s[0] for s in real.sent] == list(range(layers))
