"""Paged KV block pool: block ids, reference counts and prefix-cache hashes.

Mechanism only: the pool never sees requests, sequences or tensors. A block id
is an index into the KV tensors that someone else owns; the pool decides which
ids are free, which are shared, and which still hold a reusable (cached) prefix.

Every block is in exactly one of three states:

    state    ref   hash      in free queue   allocatable
    -------  ----  --------  -------------   -----------
    free      0    None      yes             yes
    cached    0    set       yes             yes (evicted: loses its hash)
    in_use   >0    any       no              no

The free queue holds every ref-0 block, least recently freed at the head:

    head (evict / allocate first)                         tail (freed last)
     |                                                     |
     v                                                     v
    [ 7 ] <-> [ 3 ] <-> [ 4 ] <-> ... <-> [ 12 ] <-> [ 11 ] <-> [ 10 ]

It is an OrderedDict used as a doubly linked list: popitem(last=False) takes
the head, `q[b] = None` appends at the tail, and `del q[b]` unlinks a cached
block from the middle in O(1) when a prefix-cache hit revives it.

Callers free a sequence's blocks tail-first (reverse table order). A prefix
chain b0 -> b1 -> b2 then sits in the queue as [... b2, b1, b0], so eviction
takes the chain's tail before its head: a shorter prefix stays findable longer,
and a hit on b0 is still useful when b2 is gone (the reverse is not true).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


class NoFreeBlocksError(RuntimeError):
    """allocate() asked for more blocks than num_free_blocks()."""


@dataclass(frozen=True)
class PoolStats:
    total: int
    free: int  # ref 0, no hash
    cached: int  # ref 0, hashed: evictable, still findable by lookup()
    in_use: int  # ref > 0
    # Invariant: free + cached + in_use == total.


class BlockPool:
    """Fixed set of `num_blocks` KV blocks with ref counts and a prefix cache."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self._ref: list[int] = [0] * num_blocks
        # block id -> chain hash it is registered under (None: not registered).
        # Owner: cache() sets it; eviction in allocate() and reset clear it.
        self._hash: list[int | None] = [None] * num_blocks
        # chain hash -> block id. Bidirectional with _hash: h2b[h] == b  <=>  _hash[b] == h.
        self._hash_to_block: dict[int, int] = {}
        # All ref-0 blocks, head = next to allocate. Initial order 0, 1, 2, ...
        self._free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # Number of blocks in _free_queue that hold a hash, so stats() is O(1).
        self._num_cached = 0

    # ------------------------------------------------------------------ queries

    def num_free_blocks(self) -> int:
        """Blocks allocatable now: free + cached (cached ones get evicted)."""
        return len(self._free_queue)

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref[block_id]

    def block_hash(self, block_id: int) -> int | None:
        """The chain hash `block_id` is registered under, or None."""
        self._check_id(block_id)
        return self._hash[block_id]

    def lookup(self, block_hash: int) -> int | None:
        """Block holding the prefix chain `block_hash`, in use or cached."""
        if not self.enable_caching:
            return None
        return self._hash_to_block.get(block_hash)

    def stats(self) -> PoolStats:
        queued = len(self._free_queue)
        return PoolStats(
            total=self.num_blocks,
            free=queued - self._num_cached,
            cached=self._num_cached,
            in_use=self.num_blocks - queued,
        )

    # ---------------------------------------------------------------- mutations

    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks from the head of the free queue, each with ref 1.

        A cached block taken this way is evicted: its hash is dropped, so the
        prefix it held can no longer be found.
        """
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free_queue):
            raise NoFreeBlocksError(
                f"need {n} blocks, only {len(self._free_queue)} allocatable"
            )
        out: list[int] = []
        for _ in range(n):
            block_id, _ = self._free_queue.popitem(last=False)
            assert self._ref[block_id] == 0
            if self._hash[block_id] is not None:
                self._evict(block_id)
            self._ref[block_id] = 1
            out.append(block_id)
        return out

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference per listed id; ref-0 blocks join the queue tail.

        Validates the whole batch first so that a double free raises without
        having released any of the other blocks.
        """
        ids = list(block_ids)
        for block_id, times in Counter(ids).items():
            self._check_id(block_id)
            if self._ref[block_id] < times:
                raise ValueError(
                    f"double free of block {block_id}: ref {self._ref[block_id]}, "
                    f"freed {times} time(s)"
                )
        for block_id in ids:
            self._ref[block_id] -= 1
            if self._ref[block_id] == 0:
                self._free_queue[block_id] = None  # tail: evicted last
                if self._hash[block_id] is not None:
                    self._num_cached += 1

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one reference per listed id for a prefix-cache hit.

        A cached block (ref 0) leaves the free queue and is no longer
        evictable. Touching a free, unhashed block is a caller bug: its
        contents are garbage.
        """
        ids = list(block_ids)
        for block_id in ids:
            self._check_id(block_id)
            if self._ref[block_id] == 0 and self._hash[block_id] is None:
                raise ValueError(f"block {block_id} is free and not cached; cannot touch")
        for block_id in ids:
            if self._ref[block_id] == 0:
                del self._free_queue[block_id]  # O(1) unlink from the middle
                self._num_cached -= 1
            self._ref[block_id] += 1

    def cache(self, block_id: int, block_hash: int) -> None:
        """Register a full, computed, in-use block under its chain hash.

        If another block already holds `block_hash` (two sequences computed the
        same prefix concurrently) the existing mapping wins and `block_id`
        stays unregistered: it is freed as a plain block later.
        """
        if not self.enable_caching:
            return
        self._check_id(block_id)
        if self._ref[block_id] == 0:
            raise ValueError(f"block {block_id} is not in use; only owned blocks can be cached")
        current = self._hash[block_id]
        if current is not None:
            if current != block_hash:
                raise ValueError(
                    f"block {block_id} is already cached under a different hash"
                )
            return
        if block_hash in self._hash_to_block:
            return
        self._hash[block_id] = block_hash
        self._hash_to_block[block_hash] = block_id

    def reset_prefix_cache(self) -> bool:
        """Forget every hash. Refused (False) while any block is in use,
        because running sequences may still rely on their registered prefix."""
        in_use = self.num_blocks - len(self._free_queue)
        if in_use > 0:
            logger.warning("reset_prefix_cache refused: %d blocks in use", in_use)
            return False
        self._hash_to_block.clear()
        self._hash = [None] * self.num_blocks
        self._num_cached = 0
        return True

    # ---------------------------------------------------------------- internals

    def _evict(self, block_id: int) -> None:
        h = self._hash[block_id]
        assert h is not None and self._hash_to_block.get(h) == block_id
        del self._hash_to_block[h]
        self._hash[block_id] = None
        self._num_cached -= 1

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} out of range [0, {self.num_blocks})")

    def _check_invariants(self) -> None:
        """O(num_blocks) self-check for tests."""
        queued = set(self._free_queue)
        assert queued == {b for b in range(self.num_blocks) if self._ref[b] == 0}
        assert all(r >= 0 for r in self._ref)
        assert self._num_cached == sum(1 for b in queued if self._hash[b] is not None)
        for h, b in self._hash_to_block.items():
            assert self._hash[b] == h
        assert sum(h is not None for h in self._hash) == len(self._hash_to_block)
        s = self.stats()
        assert s.free + s.cached + s.in_use == s.total
