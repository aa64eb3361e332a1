"""KVCacheManager: block tables and prefix caching, exact ids on a tiny pool.

Pool of 10 blocks, block_size 4 unless a test says otherwise. Token lists are
built so that block boundaries are easy to read: list(range(100, 110)) is ten
tokens, i.e. two full blocks and a partial one.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from pdserve.cache.block_pool import BlockPool, PoolStats
from pdserve.cache.kv_cache_manager import KVCacheManager, hash_block_tokens

BS = 4


class Checked:
    """Wraps a manager; after every call checks the pool invariants and that
    each block's ref count equals the number of live tables holding it."""

    def __init__(self, mgr: KVCacheManager) -> None:
        self.mgr = mgr

    def __getattr__(self, name: str):
        attr = getattr(self.mgr, name)
        if not callable(attr):
            return attr

        def wrapped(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            finally:
                check(self.mgr)

        return wrapped


def check(mgr: KVCacheManager) -> PoolStats:
    pool = mgr.pool
    pool._check_invariants()
    s = pool.stats()
    assert s.free + s.cached + s.in_use == s.total
    holders: Counter[int] = Counter()
    for table in mgr._tables.values():
        assert len(set(table)) == len(table)
        holders.update(table)
    for b in range(pool.num_blocks):
        assert pool.ref_count(b) == holders[b], f"block {b}"
    assert mgr.usage == s.in_use / s.total
    return s


def make(num_blocks: int = 10, caching: bool = True, **kw) -> Checked:
    mgr = KVCacheManager(BlockPool(num_blocks), BS, enable_prefix_caching=caching, **kw)
    return Checked(mgr)


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def chain_hashes(tokens: list[int], extra: int = 0) -> list[int]:
    out, parent = [], None
    for i in range(len(tokens) // BS):
        parent = hash_block_tokens(parent, tokens[i * BS : (i + 1) * BS], extra)
        out.append(parent)
    return out


def test_allocate_grows_table_only_by_what_is_missing() -> None:
    m = make()
    assert m.num_blocks_needed(None, 10) == 3
    assert m.allocate("a", 10)
    assert m.block_table("a") == [0, 1, 2]
    assert m.num_blocks_needed("a", 12) == 0
    assert m.allocate("a", 12) and m.block_table("a") == [0, 1, 2]
    assert m.num_blocks_needed("a", 13) == 1
    assert m.allocate("a", 13) and m.block_table("a") == [0, 1, 2, 3]
    assert m.allocate("a", 5) and m.block_table("a") == [0, 1, 2, 3]  # never shrinks
    assert m.usage == 0.4
    assert m.has("a") and not m.has("b")
    with pytest.raises(ValueError, match="unknown sequence"):
        m.block_table("b")


def test_allocation_failure_changes_nothing() -> None:
    m = make()
    assert m.allocate("a", 32)  # 8 blocks
    before = m.pool.stats()
    assert not m.allocate("b", 12)
    assert not m.has("b") and m.pool.stats() == before
    assert not m.allocate("a", 44)
    assert m.block_table("a") == list(range(8)) and m.pool.stats() == before
    assert m.allocate("b", 8) and m.block_table("b") == [8, 9]


def test_prefix_hit_shares_blocks_across_sequences() -> None:
    m = make()
    prompt_a = toks(100, 10)
    assert m.get_computed_blocks(prompt_a) == ([], 0)
    assert m.allocate("a", 10)
    m.cache_blocks("a", prompt_a, 10)
    h = chain_hashes(prompt_a)
    assert [m.pool.block_hash(b) for b in (0, 1, 2)] == [h[0], h[1], None]

    prompt_b = toks(100, 8) + [7, 7, 7]
    hit, n = m.get_computed_blocks(prompt_b)
    assert (hit, n) == ([0, 1], 8)
    assert m.pool.ref_count(0) == 1  # get_computed_blocks takes no reference
    assert m.allocate("b", len(prompt_b), hit)
    assert m.block_table("b") == [0, 1, 3]
    assert [m.pool.ref_count(b) for b in range(4)] == [2, 2, 1, 1]
    assert m.prefix_queries_tokens == 21 and m.prefix_hit_tokens == 8

    m.free("a")
    assert [m.pool.ref_count(b) for b in range(4)] == [1, 1, 0, 1]
    m.free("b")
    # Chain blocks 0, 1 stay cached; 2 (partial) and 3 (never hashed) are plain free.
    assert m.pool.stats() == PoolStats(total=10, free=8, cached=2, in_use=0)


def test_hit_leaves_at_least_one_token_to_compute() -> None:
    m = make()
    prompt = toks(100, 8)
    assert m.allocate("a", 8)
    m.cache_blocks("a", prompt, 8)
    assert m.pool.block_hash(1) is not None  # both blocks cached
    assert m.get_computed_blocks(prompt) == ([0], 4)  # not ([0, 1], 8)
    assert m.get_computed_blocks(prompt + [1]) == ([0, 1], 8)
    assert m.get_computed_blocks(prompt[:4]) == ([], 0)
    assert m.get_computed_blocks(prompt[:5]) == ([0], 4)
    assert m.get_computed_blocks([]) == ([], 0)


def test_partial_block_is_never_cached() -> None:
    m = make()
    tokens = toks(100, 7)
    assert m.allocate("a", 8)
    m.cache_blocks("a", tokens, 7)
    assert [m.pool.block_hash(b) for b in (0, 1)] == [chain_hashes(tokens)[0], None]
    tokens.append(107)  # a decode step fills block 1, but it is not computed yet
    m.cache_blocks("a", tokens, 7)
    assert m.pool.block_hash(1) is None
    m.cache_blocks("a", tokens, 8)
    assert m.pool.block_hash(1) == chain_hashes(tokens)[1]
    with pytest.raises(ValueError):
        m.cache_blocks("a", tokens, 9)  # more computed than tokens
    with pytest.raises(ValueError):
        m.cache_blocks("zzz", tokens, 4)


def test_chain_hash_depends_on_whole_prefix() -> None:
    block = [1, 2, 3, 4]
    h_a = hash_block_tokens(hash_block_tokens(None, [9, 9, 9, 9]), block)
    h_b = hash_block_tokens(hash_block_tokens(None, [8, 8, 8, 8]), block)
    assert h_a != h_b != hash_block_tokens(None, block)
    assert hash_block_tokens(None, block, extra=1) != hash_block_tokens(None, block)
    assert 0 <= h_a < 2**64

    m = make()
    a = [9, 9, 9, 9] + block + [0]
    b = [8, 8, 8, 8] + block + [0]
    assert m.allocate("a", 9)
    m.cache_blocks("a", a, 9)
    assert m.pool.block_hash(1) == h_a
    # Same second block after a different first block: no hit at all.
    assert m.get_computed_blocks(b) == ([], 0)


def test_hash_extra_isolates_models() -> None:
    pool = BlockPool(10)
    m0 = KVCacheManager(pool, BS)
    m1 = KVCacheManager(pool, BS, hash_extra=1)
    prompt = toks(0, 9)
    assert m0.allocate("a", 9)
    m0.cache_blocks("a", prompt, 9)
    assert m0.get_computed_blocks(prompt) == ([0, 1], 8)
    assert m1.get_computed_blocks(prompt) == ([], 0)


def test_lru_eviction_takes_chain_tail_first() -> None:
    m = make(num_blocks=8)
    prompt = toks(100, 12)
    assert m.allocate("a", 12) and m.block_table("a") == [0, 1, 2]
    m.cache_blocks("a", prompt, 12)
    m.free("a")  # queue [3 4 5 6 7 | 2 1 0]
    assert m.pool.stats() == PoolStats(total=8, free=5, cached=3, in_use=0)
    longer = prompt + [1]
    assert m.get_computed_blocks(longer) == ([0, 1, 2], 12)

    assert m.allocate("x", 20) and m.block_table("x") == [3, 4, 5, 6, 7]
    assert m.allocate("y", 4) and m.block_table("y") == [2]  # evicts chain tail
    assert m.get_computed_blocks(longer) == ([0, 1], 8)
    assert m.allocate("z", 4) and m.block_table("z") == [1]
    assert m.get_computed_blocks(longer) == ([0], 4)
    assert m.allocate("w", 4) and m.block_table("w") == [0]
    assert m.get_computed_blocks(longer) == ([], 0)
    assert m.pool.stats() == PoolStats(total=8, free=0, cached=0, in_use=8)


def test_touching_evictable_hit_counts_against_free_blocks() -> None:
    m = make(num_blocks=8)
    prompt = toks(100, 9)
    assert m.allocate("a", 9)
    m.cache_blocks("a", prompt, 9)
    m.free("a")  # queue [3 4 5 6 7 2 1 0], cached 0, 1
    assert m.allocate("x", 16) and m.block_table("x") == [3, 4, 5, 6]
    assert m.pool.num_free_blocks() == 4  # 7, 2 free; 1, 0 cached
    hit, n = m.get_computed_blocks(toks(100, 8) + toks(0, 9))
    assert (hit, n) == ([0, 1], 8)
    # 17 tokens = 5 blocks: 2 hit + 3 new, but reviving 0 and 1 leaves only 2.
    before = m.pool.stats()
    assert not m.allocate("b", 17, hit)
    assert not m.has("b") and m.pool.stats() == before
    assert [m.pool.ref_count(b) for b in (0, 1)] == [0, 0]
    assert m.allocate("b", 13, hit)
    assert m.block_table("b") == [0, 1, 7, 2]
    assert m.pool.stats() == PoolStats(total=8, free=0, cached=0, in_use=8)


def test_abort_mid_prefill_keeps_computed_blocks_cached() -> None:
    m = make()
    prompt = toks(100, 12)
    assert m.allocate("a", 12) and m.block_table("a") == [0, 1, 2]
    m.cache_blocks("a", prompt, 4)  # first chunk of a chunked prefill
    m.cache_blocks("a", prompt, 6)  # second chunk ends mid-block
    m.free("a")  # abort
    assert m.pool.stats() == PoolStats(total=10, free=9, cached=1, in_use=0)
    assert m.get_computed_blocks(prompt) == ([0], 4)
    m.free("a")  # the abort raced with a finish: no-op
    m.free("never-seen")


def test_preempt_and_reallocate_hits_own_blocks() -> None:
    m = make()
    tokens = toks(100, 8)
    assert m.allocate("a", 8)
    m.cache_blocks("a", tokens, 8)
    for t in (200, 201, 202):  # decode three tokens
        assert m.allocate("a", len(tokens) + 1)
        tokens.append(t)
        m.cache_blocks("a", tokens, len(tokens))
    assert m.block_table("a") == [0, 1, 2]
    m.free("a")  # preempted by recompute: prompt + outputs become the new prompt
    assert m.pool.stats() == PoolStats(total=10, free=8, cached=2, in_use=0)
    hit, n = m.get_computed_blocks(tokens)
    assert (hit, n) == ([0, 1], 8)
    assert m.allocate("a", len(tokens), hit)
    assert m.block_table("a") == [0, 1, 3]
    assert [m.pool.ref_count(b) for b in range(4)] == [1, 1, 0, 1]
    m.cache_blocks("a", tokens, len(tokens))  # nothing new is full
    assert m.pool.block_hash(3) is None


def test_caller_mistakes() -> None:
    m = make()
    assert m.allocate("a", 9)
    m.cache_blocks("a", toks(0, 9), 9)
    with pytest.raises(ValueError, match="already has a table"):
        m.allocate("a", 12, [0])
    with pytest.raises(ValueError, match="exceed"):
        m.allocate("b", 4, [0, 1])
    with pytest.raises(ValueError, match="no longer cached"):
        m.allocate("b", 8, [2])
    with pytest.raises(ValueError):
        m.allocate("b", -1)
    with pytest.raises(ValueError):
        KVCacheManager(BlockPool(4), 0)


def test_prefix_caching_disabled() -> None:
    m = make(caching=False)
    prompt = toks(0, 9)
    assert m.allocate("a", 9)
    m.cache_blocks("a", prompt, 9)
    assert m.pool.block_hash(0) is None
    assert m.get_computed_blocks(prompt) == ([], 0)
    assert m.prefix_queries_tokens == 0
    m.free("a")
    assert m.pool.stats() == PoolStats(total=10, free=10, cached=0, in_use=0)


def test_hash_is_deterministic_across_processes() -> None:
    # Python's own hash() differs per process under PYTHONHASHSEED; ours must not.
    code = (
        "from pdserve.cache.kv_cache_manager import hash_block_tokens as h\n"
        "print(h(None, [1, 2, 3, 4]), h(12345, [5, 6, 7, 8], extra=3))"
    )
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        here = [hash_block_tokens(None, [1, 2, 3, 4]), hash_block_tokens(12345, [5, 6, 7, 8], 3)]
        assert [int(x) for x in out] == here
    # Pinned: a change of byte layout would silently split prefill and decode
    # workers running different builds.
    assert here == [13102907000534197198, 18436110157041458670]


def test_randomized_operations_keep_invariants() -> None:
    """Random admit / step / preempt / finish on a 12-block pool.

    A shadow "KV store" records, per block, the exact token prefix written
    into it. It checks that (1) a sequence only ever writes blocks it owns
    alone, (2) every registered hash matches what the block really holds, and
    (3) every prefix hit returns blocks holding exactly the hit prefix.
    """
    rng = random.Random(1234)
    m = make(num_blocks=12)
    bases = [[rng.randrange(50) for _ in range(rng.randrange(3, 13))] for _ in range(3)]
    written: dict[int, tuple[int, ...]] = {}  # block -> token prefix up to its end
    live: dict[str, tuple[list[int], int]] = {}  # seq -> (tokens, num_computed)
    waiting: dict[str, list[int]] = {}
    next_id = 0
    hits = 0

    def compute(seq: str, tokens: list[int], start: int, end: int) -> None:
        table = m.block_table(seq)
        for pos in range(start, end):
            b = table[pos // BS]
            assert m.pool.ref_count(b) == 1, "writing a shared block"
            blk = pos // BS
            written[b] = tuple(tokens[: min(end, (blk + 1) * BS)])
        m.cache_blocks(seq, tokens, end)

    for _ in range(3000):
        op = rng.random()
        if op < 0.3 and len(live) + len(waiting) < 6:
            seq = f"s{next_id}"
            next_id += 1
            waiting[seq] = rng.choice(bases) + [rng.randrange(50) for _ in range(rng.randrange(1, 6))]
        elif op < 0.5 and waiting:
            seq = rng.choice(sorted(waiting))
            tokens = waiting[seq]
            hit, n = m.get_computed_blocks(tokens)
            assert n == len(hit) * BS < len(tokens)
            for i, b in enumerate(hit):
                assert written[b] == tuple(tokens[: (i + 1) * BS])
            hits += n
            end = min(len(tokens), n + rng.randrange(1, 9))
            before = m.pool.stats()
            if m.allocate(seq, end, hit):
                del waiting[seq]
                live[seq] = (tokens, n)
                compute(seq, tokens, n, end)
                live[seq] = (tokens, end)
            else:
                assert not m.has(seq) and m.pool.stats() == before
        elif op < 0.85 and live:
            seq = rng.choice(sorted(live))
            tokens, done = live[seq]
            if done == len(tokens):
                tokens.append(rng.randrange(50))  # decode one token
                end = len(tokens)
            else:
                end = min(len(tokens), done + rng.randrange(1, 9))  # prefill chunk
            if m.allocate(seq, end):
                compute(seq, tokens, done, end)
                live[seq] = (tokens, end)
            else:  # preempt by recompute: everything so far becomes the prompt
                m.free(seq)
                del live[seq]
                waiting[seq] = tokens
        elif live:
            seq = rng.choice(sorted(live))
            m.free(seq)
            del live[seq]
            m.free(seq)  # idempotent
        # Every registered hash describes what its block actually holds.
        for b in range(m.pool.num_blocks):
            h = m.pool.block_hash(b)
            if h is not None:
                prefix = written[b]
                assert len(prefix) % BS == 0
                assert chain_hashes(list(prefix))[-1] == h
    assert hits > 0
    for seq in list(live):
        m.free(seq)
    assert m.pool.stats().in_use == 0
