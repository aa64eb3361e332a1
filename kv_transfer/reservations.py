"""D's table of KV reservations: which blocks are promised to which (request, attempt),
until when, and what has arrived so far.

Threads: D's gRPC threads (one per Push/Complete call) and D's engine loop (reserve,
release, lease sweep) all touch it. Two locks, never nested:

    table.lock   guards the dict only (create / get / pop / list)
    entry.lock   guards one entry's state and counters, and is held by the receiver
                 across check + write of a chunk

Why a per-entry lock held across the write: pop() and fail() take it before they
change the state, so when they return no chunk is half-written into the entry's blocks
and none will start; the owner may then free and reuse the blocks safely.

State machine (only the transitions below exist):

    OPEN ──last chunk (header.num_chunks set)──▶ RECEIVED
    OPEN | RECEIVED ──valid CompletionRecord──▶ COMPLETED
    OPEN | RECEIVED ──failed check, lease expiry, pop()──▶ FAILED

The table never frees KV blocks: its owner (the decode worker) does, after whichever
call moved the entry out of OPEN/RECEIVED told it to (KVReceiver's on_failed /
on_complete callbacks, or a non-None return from fail()).
"""
from __future__ import annotations

import enum
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.v1 import kv_pb2

logger = logging.getLogger(__name__)

# Completed reservations remembered after pop(), so that a duplicate Complete is
# answered DUPLICATE rather than UNKNOWN_RESERVATION. Bounded: the lease is the real
# backstop; this only makes the answer more precise for recent attempts.
_TOMBSTONES = 4096


class ReservationState(enum.Enum):
    OPEN = "open"             # blocks promised; chunks may arrive
    RECEIVED = "received"     # the chunk that declared num_chunks arrived; waiting for Complete
    COMPLETED = "completed"   # record verified; the sequence belongs to D's batch now
    FAILED = "failed"         # attempt ended; nothing more is written or accepted


LIVE_STATES = (ReservationState.OPEN, ReservationState.RECEIVED)


@dataclass(eq=False)
class ReservationEntry:
    """One reservation. Identity fields are fixed at creation; the rest is mutated only
    with `lock` held (by the receiver or the table)."""
    reservation_id: str
    request_id: str
    attempt_id: int
    block_ids: tuple[int, ...]          # D's block ids, block-table order
    num_tokens: int                     # prompt tokens whose KV goes into block_ids
    expiry: float                       # time.monotonic() deadline of the lease
    num_cached_blocks: int = 0          # leading block_ids D filled from its prefix cache:
                                        # never written by a transfer (they may be shared)
    state: ReservationState = ReservationState.OPEN
    chunks_received: int = 0
    bytes_received: int = 0
    checksum: int = 0                   # running crc32c of payloads in chunk_index order
    checksum_skipped: bool = False      # a tensor chunk came with crc32c = 0 (see receiver)
    next_chunk_index: int = 0
    declared_num_chunks: int = 0        # from the first header that set num_chunks
    coverage: dict[int, int] = field(default_factory=dict)  # layer -> bitmap of block positions
    failure: tuple[int, str] | None = None   # (KVStatus, reason) once FAILED
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    block_pos: dict[int, int] = field(init=False, repr=False)  # block id -> position

    def __post_init__(self) -> None:
        self.block_pos = {b: i for i, b in enumerate(self.block_ids)}

    @property
    def writable_mask(self) -> int:
        """Bitmap of the block positions a transfer must fill (all but the cached ones)."""
        return ((1 << len(self.block_ids)) - 1) & ~((1 << self.num_cached_blocks) - 1)

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES


def mark_failed(entry: ReservationEntry, code: int, reason: str) -> bool:
    """Move a live entry to FAILED; False when it was not live (someone else ended it).
    The caller holds entry.lock. The True return is the one-time right to notify."""
    if not entry.live:
        return False
    entry.state = ReservationState.FAILED
    entry.failure = (code, reason)
    return True


class ReservationTable:
    """Thread-safe map reservation_id -> ReservationEntry (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, ReservationEntry] = {}
        self._completed: OrderedDict[str, tuple[str, int]] = OrderedDict()

    def create(self, request_id: str, attempt_id: int, block_ids: Sequence[int], num_tokens: int,
               lease_s: float, *, num_cached_blocks: int = 0,
               now: float | None = None) -> ReservationEntry:
        if attempt_id <= 0:
            raise ValueError(f"attempt_id must be nonzero, got {attempt_id}")
        if not request_id:
            raise ValueError("request_id must be set")
        ids = tuple(int(b) for b in block_ids)
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"block_ids must be non-empty and unique, got {ids}")
        if not 0 <= num_cached_blocks <= len(ids):
            raise ValueError(f"num_cached_blocks {num_cached_blocks} out of range for {len(ids)} blocks")
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        now = time.monotonic() if now is None else now
        with self._lock:
            rid = secrets.token_hex(16)
            while rid in self._entries:  # 128 random bits: only for form's sake
                rid = secrets.token_hex(16)
            entry = ReservationEntry(rid, request_id, attempt_id, ids, num_tokens, now + lease_s,
                                     num_cached_blocks=num_cached_blocks)
            self._entries[rid] = entry
        return entry

    def get(self, reservation_id: str) -> ReservationEntry | None:
        with self._lock:
            return self._entries.get(reservation_id)

    def completed_attempt(self, reservation_id: str) -> tuple[str, int] | None:
        """(request_id, attempt_id) of a completed reservation already popped, if recent."""
        with self._lock:
            return self._completed.get(reservation_id)

    def pop(self, reservation_id: str, reason: str = "released") -> ReservationEntry | None:
        """Remove an entry (release, or cleanup after complete/fail). A live entry becomes
        FAILED first; waits for a chunk being written into it. Idempotent (None)."""
        with self._lock:
            entry = self._entries.pop(reservation_id, None)
        if entry is None:
            return None
        with entry.lock:  # wait out an in-flight write before the caller frees blocks
            mark_failed(entry, kv_pb2.KV_STATUS_UNKNOWN_RESERVATION, reason)
            completed = entry.state is ReservationState.COMPLETED
        if completed:
            with self._lock:
                self._completed[reservation_id] = (entry.request_id, entry.attempt_id)
                while len(self._completed) > _TOMBSTONES:
                    self._completed.popitem(last=False)
        return entry

    def fail(self, reservation_id: str, reason: str,
             code: int = kv_pb2.KV_STATUS_EXPIRED) -> ReservationEntry | None:
        """Fail a live entry (lease sweep, cancel); returns it only if this call moved it
        to FAILED: then, and only then, the caller frees its blocks. Waits for an
        in-flight write. Does not call the receiver's on_failed."""
        entry = self.get(reservation_id)
        if entry is None:
            return None
        with entry.lock:
            moved = mark_failed(entry, code, reason)
        if moved:
            logger.info("reservation %s (request %s attempt %d) failed: %s",
                        reservation_id, entry.request_id, entry.attempt_id, reason)
        return entry if moved else None

    def renew(self, reservation_id: str, lease_s: float, now: float | None = None) -> bool:
        """Push a live lease's expiry to now + lease_s (the router's heartbeat while the
        prefill is queued or computing). False if the entry is gone or no longer live."""
        entry = self.get(reservation_id)
        if entry is None:
            return False
        now = time.monotonic() if now is None else now
        with entry.lock:
            if not entry.live:
                return False
            entry.expiry = max(entry.expiry, now + lease_s)
        return True

    def expired(self, now: float | None = None) -> list[ReservationEntry]:
        """Live entries whose lease has run out (the owner then calls fail() on each;
        one that completes in between is not failed)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            entries = list(self._entries.values())
        return [e for e in entries if e.live and e.expiry <= now]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, reservation_id: object) -> bool:
        with self._lock:
            return reservation_id in self._entries
