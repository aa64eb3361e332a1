"""Continuous-batching scheduler with chunked prefill and preemption by recompute.

How it works (one call to ``schedule()`` per engine step):

    budget = max_num_batched_tokens
    1. RUNNING, oldest first: each sequence asks for its missing tokens
       (num_tokens - num_computed_tokens: 1 for a decode, the rest of the prompt for a
       prefill still in progress), capped by the budget (a chunk). If the KV manager
       cannot cover them, the NEWEST running sequence is preempted: its blocks are
       freed, its progress reset, and it goes back to the FRONT of WAITING to be
       recomputed later (its generated tokens are kept and re-prefilled). A sequence
       that must preempt itself stops this phase.
    2. WAITING, in order, only if nothing was preempted this step: look up the prefix
       cache, allocate blocks for the first chunk, move to RUNNING. Stop at the first
       sequence that does not fit (FCFS: no overtaking, so a big prompt cannot starve).

There is no deadlock: max_model_len is capped at the pool's token capacity, so a sequence
alone always fits, and preemption always frees the blocks of someone newer.

The scheduler knows sequences and block counts, never tensors.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from pdserve.cache.kv_cache_manager import KVCacheManager
from pdserve.config import SchedulerConfig
from pdserve.engine.sequence import Sequence, SeqStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int            # tokens fed this step, starting at seq.num_computed_tokens
    samples: bool = False          # the chunk reaches the end: this step yields a token

    def __post_init__(self) -> None:
        self.samples = self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """Hand-off from scheduler to runner: what to compute this step, decodes first."""
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    # -- queue management -------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose KV is already in its reserved blocks (decode role)."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (finish or abort)."""
        if seq.status == SeqStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        elif seq in self.running:
            self.running.remove(seq)
        self.kv.free(seq.seq_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # -- the algorithm ------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            assert n > 0, f"running sequence {seq.seq_id} has nothing to compute"
            while not self.kv.allocate(seq.seq_id, seq.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
                continue
            break  # seq preempted itself: nothing newer is left to run

        if not preempted:
            while (self.waiting and budget > 0
                   and len(self.running) < self.config.max_num_seqs):
                seq = self.waiting[0]
                computed: list[int] = []
                if seq.num_computed_tokens == 0:
                    computed, num_cached = self.kv.get_computed_blocks(seq.tokens)
                else:
                    num_cached = seq.num_computed_tokens
                n = min(seq.num_tokens - num_cached, budget)
                if not self.kv.allocate(seq.seq_id, num_cached + n, computed):
                    break
                self.waiting.popleft()
                seq.num_computed_tokens = num_cached
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = num_cached
                seq.status = SeqStatus.RUNNING
                self.running.append(seq)
                scheduled.append(ScheduledSeq(seq, n))
                budget -= n

        # Decodes first: the runner batches query-length-1 sequences together.
        scheduled.sort(key=lambda s: s.num_new_tokens != 1)
        return SchedulerOutput(scheduled, preempted)

    def _preempt(self, seq: Sequence) -> None:
        logger.debug("preempting %s (%d tokens) for recompute", seq.seq_id, seq.num_tokens)
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def detach(self, seq: Sequence) -> None:
        """Leave a running sequence out of later steps and free its blocks: it ends with
        the token of the step still in flight (engine look-ahead), so no later step
        reads its KV. Steps run in order on the device, so a later step that gets these
        blocks writes them only after the in-flight step has. remove() at its finish
        then finds nothing left to free."""
        self.running.remove(seq)
        self.kv.free(seq.seq_id)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance progress and publish newly full blocks to the prefix cache. Sequences
        that ended while the step was in flight are skipped: their blocks are gone."""
        for s in out.scheduled:
            if s.seq.status == SeqStatus.FINISHED:
                continue
            s.seq.num_computed_tokens += s.num_new_tokens
            self.kv.cache_blocks(s.seq.seq_id, s.seq.tokens, s.seq.num_computed_tokens)
