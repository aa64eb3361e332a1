"""The router's request ledger: admission, and exactly one terminal outcome per request.

Every request the router accepts is entered here before any work starts and leaves
through `finish()` exactly once (completed / cancelled / error with a reason). A second
finish is ignored and counted (`double_finish`), which the tests assert stays 0.
"""
from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import dataclass, field

OUTCOMES = ("completed", "cancelled", "error")


class Overloaded(RuntimeError):
    """Admission refused: too many requests in flight. Maps to RESOURCE_EXHAUSTED / 429."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Record:
    request_id: str
    client_label: str
    accepted_at: float
    num_prompt_tokens: int
    attempts: int = 0
    tokens_sent: int = 0
    first_token_at: float | None = None
    # Where the time to first token went (monotonic, last attempt): the decode worker
    # reserved blocks / accepted a colocated submit; P's prefill call returned, with P's
    # own split of it (admission -> first token, first token -> D's ack of Complete).
    dispatched_at: float | None = None
    prefill_done_at: float | None = None
    prefill_seconds: float = 0.0
    transfer_seconds: float = 0.0
    outcome: str | None = None
    reason: str = ""
    finished_at: float | None = None
    workers: list[str] = field(default_factory=list)


class Ledger:
    def __init__(self, max_inflight: int) -> None:
        self.max_inflight = max_inflight
        self.active: dict[str, Record] = {}
        self.counts: dict[str, int] = {o: 0 for o in OUTCOMES}
        self.accepted = 0
        self.rejected = 0
        self.double_finish = 0
        self.history: deque[Record] = deque(maxlen=10_000)   # recently finished records

    def admit(self, num_prompt_tokens: int, client_label: str = "") -> Record:
        if len(self.active) >= self.max_inflight:
            self.rejected += 1
            raise Overloaded(f"server busy: {len(self.active)} requests in flight "
                             f"(limit {self.max_inflight}); retry later")
        rid = "req-" + secrets.token_hex(8)
        rec = Record(rid, client_label, time.monotonic(), num_prompt_tokens)
        self.active[rid] = rec
        self.accepted += 1
        return rec

    def finish(self, rec: Record, outcome: str, reason: str = "") -> bool:
        assert outcome in OUTCOMES, outcome
        if rec.outcome is not None:
            self.double_finish += 1
            return False
        rec.outcome, rec.reason, rec.finished_at = outcome, reason, time.monotonic()
        self.active.pop(rec.request_id, None)
        self.counts[outcome] += 1
        self.history.append(rec)
        return True

    @property
    def inflight(self) -> int:
        return len(self.active)

    def lost(self) -> int:
        """Accepted minus terminal: requests still without an outcome."""
        return self.accepted - sum(self.counts.values())
