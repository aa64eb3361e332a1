"""A client-side ledger: per request, the accept time, every token with its sequence
number, the one terminal outcome and its time (RELIABILITY.md, "The rig")."""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Entry:
    index: int
    accepted_at: float = 0.0
    request_id: str = ""
    tokens: list[tuple[int, int]] = field(default_factory=list)   # (seq no, token id)
    outcomes: list[tuple[str, str, float]] = field(default_factory=list)
    tokens_after_terminal: int = 0

    @property
    def token_ids(self) -> list[int]:
        return [t for _, t in self.tokens]

    @property
    def outcome(self) -> str | None:
        return self.outcomes[0][0] if self.outcomes else None


class ClientLedger:
    def __init__(self) -> None:
        self.entries: dict[int, Entry] = {}
        self.rejected = 0

    def accept(self, i: int) -> Entry:
        e = Entry(i, accepted_at=time.monotonic())
        self.entries[i] = e
        return e

    def token(self, e: Entry, token_id: int) -> None:
        if e.outcomes:
            e.tokens_after_terminal += 1
        e.tokens.append((len(e.tokens), token_id))

    def terminal(self, e: Entry, outcome: str, reason: str = "") -> None:
        e.outcomes.append((outcome, reason, time.monotonic()))

    # -- invariants (L1, L2) ------------------------------------------------------------
    def lost(self) -> list[Entry]:
        return [e for e in self.entries.values() if not e.outcomes]

    def violations(self) -> list[str]:
        bad = []
        for e in self.entries.values():
            if len(e.outcomes) > 1:
                bad.append(f"request {e.index}: {len(e.outcomes)} terminal outcomes")
            if e.tokens_after_terminal:
                bad.append(f"request {e.index}: tokens after its terminal outcome")
        return bad
