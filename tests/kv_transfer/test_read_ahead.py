"""read_ahead (D's Push handler reads chunks on a helper thread) and the malloc
thresholds set for KV streaming."""
from __future__ import annotations

import threading
import time

import pytest

from kv_transfer import malloc
from kv_transfer.grpc_transport import read_ahead


def test_yields_every_item_in_order():
    assert list(read_ahead(iter(range(1000)), 2)) == list(range(1000))


def test_reads_ahead_while_the_consumer_works():
    pulled: list[int] = []

    def source():
        for i in range(5):
            pulled.append(i)
            yield i

    it = read_ahead(source(), 2)
    assert next(it) == 0
    deadline = time.monotonic() + 5
    while len(pulled) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    # the consumer holds item 0; two more are queued and one more is pulled and waiting
    assert pulled == [0, 1, 2, 3]
    assert list(it) == [1, 2, 3, 4]


def test_error_from_the_source_reaches_the_consumer_after_earlier_items():
    def source():
        yield 1
        yield 2
        raise RuntimeError("stream reset")

    it = read_ahead(source(), 4)
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(RuntimeError, match="stream reset"):
        next(it)


def test_consumer_stopping_early_releases_the_helper_thread():
    produced = threading.Event()

    def endless():
        i = 0
        while True:
            produced.set()
            yield i
            i += 1

    before = set(threading.enumerate())   # Thread objects: idents of ended threads are reused
    it = read_ahead(endless(), 2)
    assert next(it) == 0
    # the helper is alive now: blocked offering items to the full queue
    helpers = [t for t in threading.enumerate() if t not in before and t.name == "pdserve-kv-read"]
    assert len(helpers) == 1 and helpers[0].is_alive()
    it.close()  # what happens when the handler returns on a refused chunk
    helpers[0].join(2)
    assert not helpers[0].is_alive()


def test_malloc_thresholds_follow_the_env_switch(monkeypatch):
    monkeypatch.setattr(malloc, "_applied", None)
    monkeypatch.setenv("PDSERVE_TUNE_MALLOC", "0")
    assert malloc.use_heap_for_chunks() is False
    monkeypatch.setattr(malloc, "_applied", None)
    monkeypatch.setenv("PDSERVE_TUNE_MALLOC", "1")
    import platform
    applied = malloc.use_heap_for_chunks()
    if platform.libc_ver()[0] == "glibc":
        assert applied is True
    assert malloc.use_heap_for_chunks() is applied  # once per process
