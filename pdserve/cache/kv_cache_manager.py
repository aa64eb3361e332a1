"""Per-sequence block tables over a BlockPool, with prefix caching.

The manager knows sequences (by string id) and which blocks each one holds; it
knows nothing about tensors or scheduling policy.

A sequence's block table maps token positions to blocks, `block_size` tokens
each. With block_size 4 and 10 tokens:

    tokens   t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 .  .
    table    [   b5      ,    b2       ,   b9       ]
    hashes   h0=H(None,  | h1=H(h0,    | (partial: never hashed)
               t0..t3)   |   t4..t7)   |

Each full, computed block is registered in the pool under a chain hash that
folds in every token before it, so equal hashes mean equal whole prefixes (up
to a 64-bit collision), not just equal blocks. A new prompt walks its own chain
from the first block and stops at the first miss: get_computed_blocks().

Lifecycle of one sequence (the scheduler drives it):

    hit, n = get_computed_blocks(prompt)      # no references taken yet
    allocate(seq, len(prompt), hit)           # touch hit blocks, add new ones
    ... model computes tokens n.. ...
    cache_blocks(seq, tokens, num_computed)   # register newly full blocks
    allocate(seq, len(tokens) + 1)            # grow by a block when needed
    free(seq)                                 # finish, abort or preempt
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from pdserve.cache.block_pool import BlockPool

_U64 = (1 << 64) - 1


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int], extra: int = 0) -> int:
    """Chain hash of one full block, stable across processes and runs.

    Python's hash() is salted per process (PYTHONHASHSEED), so a prefill and a
    decode worker would disagree; blake2b over a fixed byte layout does not:

        [has_parent u8][parent u64][extra u64][token_ids int64 * n]   little-endian

    `extra` (taken mod 2**64) salts the chain, e.g. by model or adapter id, so
    equal tokens under different weights never share KV.
    """
    parent = 0 if parent_hash is None else parent_hash
    if not 0 <= parent <= _U64:
        raise ValueError(f"parent_hash must be a 64-bit unsigned hash, got {parent_hash}")
    header = struct.pack("<BQQ", parent_hash is not None, parent, extra & _U64)
    try:
        body = struct.pack(f"<{len(token_ids)}q", *token_ids)
    except struct.error as e:
        raise ValueError("token ids must fit in int64") from e
    digest = hashlib.blake2b(header + body, digest_size=8).digest()
    return int.from_bytes(digest, "little")


class KVCacheManager:
    """Block tables of live sequences, allocated from one BlockPool."""

    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        enable_prefix_caching: bool = True,
        hash_extra: int = 0,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.pool = pool
        self.block_size = block_size
        # Caching needs both sides on: the pool's flag makes lookup/cache inert.
        self.enable_prefix_caching = enable_prefix_caching and pool.enable_caching
        self.hash_extra = hash_extra
        # seq_id -> block ids, position order. Owner: this manager.
        self._tables: dict[str, list[int]] = {}
        # seq_id -> how many leading blocks of its table are hashed, and the
        # hash of the last of them (parent of the next). Keeps cache_blocks
        # O(new blocks). Invariant: _num_hashed[s] <= len(_tables[s]).
        self._num_hashed: dict[str, int] = {}
        self._last_hash: dict[str, int | None] = {}
        # Metrics (tokens): hit rate = prefix_hit_tokens / prefix_queries_tokens.
        self.prefix_queries_tokens = 0
        self.prefix_hit_tokens = 0

    # ------------------------------------------------------------------ queries

    def has(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: str) -> list[int]:
        """A copy of the sequence's block ids in position order."""
        return list(self._table(seq_id))

    def block_table_view(self, seq_id: str) -> list[int]:
        """The sequence's live block-id list, without a copy: for the runner, which
        reads it while packing a step's inputs. Never modify it."""
        return self._table(seq_id)

    def num_blocks_needed(self, seq_id: str | None, num_tokens: int) -> int:
        """Blocks still to allocate so the table covers `num_tokens` tokens
        (seq_id None or unknown: a sequence with no blocks yet)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        have = len(self._tables.get(seq_id, ())) if seq_id is not None else 0
        return max(0, self._blocks_for(num_tokens) - have)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some sequence (kv_cache_usage_perc)."""
        s = self.pool.stats()
        return s.in_use / s.total

    def get_computed_blocks(self, token_ids: Sequence[int]) -> tuple[list[int], int]:
        """Longest cached chain of full blocks that prefixes `token_ids`.

        Returns (block_ids, num_tokens) without taking references: pass the
        ids to allocate() before anything else touches the pool. Capped at
        (len - 1) // block_size blocks so at least one prompt token is left to
        compute; the model needs it to produce the first logits.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = max(0, len(token_ids) - 1) // self.block_size
        blocks: list[int] = []
        parent: int | None = None
        for i in range(max_blocks):
            chunk = token_ids[i * self.block_size : (i + 1) * self.block_size]
            parent = hash_block_tokens(parent, chunk, self.hash_extra)
            block_id = self.pool.lookup(parent)
            if block_id is None:
                break
            blocks.append(block_id)
        num_tokens = len(blocks) * self.block_size
        self.prefix_queries_tokens += len(token_ids)
        self.prefix_hit_tokens += num_tokens
        return blocks, num_tokens

    # ---------------------------------------------------------------- mutations

    def allocate(
        self, seq_id: str, num_tokens: int, computed_blocks: list[int] | None = None
    ) -> bool:
        """Grow seq_id's table to cover `num_tokens` tokens in total.

        On the first call, `computed_blocks` (a prefix hit) becomes the head of
        the table. Returns False and changes nothing when the pool cannot
        supply the missing blocks; tables never shrink here.
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        table = self._tables.get(seq_id)
        if table is not None and not computed_blocks and self._blocks_for(num_tokens) <= len(table):
            return True   # the common decode step: the last block still has room
        computed = list(computed_blocks or ())
        is_new = seq_id not in self._tables
        if computed and not is_new:
            raise ValueError(f"computed_blocks given for {seq_id!r}, which already has a table")
        if len(computed) * self.block_size > num_tokens:
            raise ValueError(
                f"{len(computed)} computed blocks exceed num_tokens={num_tokens}"
            )
        for block_id in computed:
            # A stale hit (evicted since get_computed_blocks) must not be shared.
            if self.pool.block_hash(block_id) is None:
                raise ValueError(f"computed block {block_id} is no longer cached")

        table = self._tables.get(seq_id, computed)
        need = max(0, self._blocks_for(num_tokens) - len(table))
        # Touching a cached block at ref 0 takes it out of the allocatable set.
        revived = sum(1 for b in set(computed) if self.pool.ref_count(b) == 0)
        if need > self.pool.num_free_blocks() - revived:
            return False

        self.pool.touch(computed)
        new_blocks = self.pool.allocate(need)
        if is_new:
            self._tables[seq_id] = computed + new_blocks
            self._num_hashed[seq_id] = len(computed)
            self._last_hash[seq_id] = self.pool.block_hash(computed[-1]) if computed else None
        else:
            table.extend(new_blocks)
        return True

    def cache_blocks(self, seq_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register every full block whose tokens are all computed.

        `token_ids` is the sequence's whole token list so far (prompt +
        output); only blocks beyond those already hashed are touched.
        """
        table = self._table(seq_id)
        if not 0 <= num_computed_tokens <= len(token_ids):
            raise ValueError(
                f"num_computed_tokens={num_computed_tokens} outside [0, {len(token_ids)}]"
            )
        if num_computed_tokens > len(table) * self.block_size:
            raise ValueError(
                f"{num_computed_tokens} computed tokens but only {len(table)} blocks allocated"
            )
        if not self.enable_prefix_caching:
            return
        num_full = num_computed_tokens // self.block_size
        start = self._num_hashed[seq_id]
        parent = self._last_hash[seq_id]
        bs = self.block_size
        for i in range(start, num_full):
            parent = hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs], self.hash_extra)
            # If another block already holds this prefix, the pool keeps that
            # one; the chain still continues from `parent`, so later blocks
            # remain findable through the surviving block.
            self.pool.cache(table[i], parent)
        if num_full > start:
            self._num_hashed[seq_id] = num_full
            self._last_hash[seq_id] = parent

    def free(self, seq_id: str) -> None:
        """Release all of seq_id's blocks, tail first (evicted first).
        Unknown ids are ignored: an abort may race with a finish."""
        table = self._tables.pop(seq_id, None)
        if table is None:
            return
        del self._num_hashed[seq_id]
        del self._last_hash[seq_id]
        self.pool.free(reversed(table))

    # ---------------------------------------------------------------- internals

    def _table(self, seq_id: str) -> list[int]:
        try:
            return self._tables[seq_id]
        except KeyError:
            raise ValueError(f"unknown sequence {seq_id!r}") from None

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
