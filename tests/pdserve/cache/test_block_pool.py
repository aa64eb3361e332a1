"""BlockPool: exact block ids, ref counts and eviction order on a tiny pool."""

from __future__ import annotations

import pytest

from pdserve.cache.block_pool import BlockPool, NoFreeBlocksError, PoolStats


class Checked:
    """Wraps a pool; checks internal invariants and free+cached+in_use==total
    after every call, so no test can forget to."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool

    def __getattr__(self, name: str):
        attr = getattr(self.pool, name)
        if not callable(attr):
            return attr

        def wrapped(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            finally:
                check(self.pool)

        return wrapped


def check(pool: BlockPool) -> PoolStats:
    pool._check_invariants()
    s = pool.stats()
    assert s.free + s.cached + s.in_use == s.total == pool.num_blocks
    assert s.in_use == sum(pool.ref_count(b) > 0 for b in range(pool.num_blocks))
    assert pool.num_free_blocks() == s.free + s.cached
    return s


def make(n: int = 8, caching: bool = True) -> Checked:
    pool = BlockPool(n, enable_caching=caching)
    check(pool)
    return Checked(pool)


def test_fresh_allocation_order() -> None:
    p = make()
    assert p.allocate(3) == [0, 1, 2]
    assert p.allocate(0) == []
    assert p.allocate(2) == [3, 4]
    assert [p.ref_count(b) for b in range(8)] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert p.stats() == PoolStats(total=8, free=3, cached=0, in_use=5)


def test_free_goes_to_tail_and_is_reused_last() -> None:
    p = make()
    assert p.allocate(3) == [0, 1, 2]
    p.free([2, 1, 0])  # reverse table order, as the manager does
    assert p.stats() == PoolStats(total=8, free=8, cached=0, in_use=0)
    # Never-used blocks first, then the freed ones in the order they were freed.
    assert p.allocate(8) == [3, 4, 5, 6, 7, 2, 1, 0]


def test_shared_block_freed_only_at_ref_zero() -> None:
    p = make()
    a = p.allocate(1)
    p.cache(a[0], 111)
    p.touch(a)
    assert p.ref_count(0) == 2
    p.free(a)
    assert p.ref_count(0) == 1 and p.stats().in_use == 1
    p.free(a)
    assert p.ref_count(0) == 0 and p.stats() == PoolStats(8, 7, 1, 0)


def test_double_free_raises_and_changes_nothing() -> None:
    p = make()
    assert p.allocate(2) == [0, 1]
    p.free([0])
    with pytest.raises(ValueError, match="double free"):
        p.free([0])
    # A batch with one bad id is rejected whole: block 1 keeps its reference.
    with pytest.raises(ValueError, match="double free"):
        p.free([1, 1])
    assert p.ref_count(1) == 1
    with pytest.raises(ValueError, match="out of range"):
        p.free([8])
    assert p.stats() == PoolStats(8, 7, 0, 1)


def test_allocation_failure_leaves_state_unchanged() -> None:
    p = make()
    assert p.allocate(6) == [0, 1, 2, 3, 4, 5]
    before = p.stats()
    with pytest.raises(NoFreeBlocksError):
        p.allocate(3)
    assert issubclass(NoFreeBlocksError, RuntimeError)
    assert p.stats() == before
    assert p.allocate(2) == [6, 7]
    with pytest.raises(NoFreeBlocksError):
        p.allocate(1)
    with pytest.raises(ValueError):
        p.allocate(-1)


def test_cached_block_stays_findable_then_is_evicted_in_queue_order() -> None:
    p = make()
    assert p.allocate(3) == [0, 1, 2]
    p.cache(0, 100)
    p.cache(1, 101)
    assert p.lookup(100) == 0 and p.block_hash(0) == 100
    p.free([2, 1, 0])
    assert p.stats() == PoolStats(total=8, free=6, cached=2, in_use=0)
    assert p.lookup(100) == 0 and p.lookup(101) == 1
    # Queue: [3 4 5 6 7 2 1 0]. Five unhashed blocks and block 2 go first.
    assert p.allocate(6) == [3, 4, 5, 6, 7, 2]
    assert p.stats() == PoolStats(total=8, free=0, cached=2, in_use=6)
    # Block 1 (chain tail) is evicted before block 0 (chain head).
    assert p.allocate(1) == [1]
    assert p.lookup(101) is None and p.block_hash(1) is None
    assert p.lookup(100) == 0
    assert p.stats() == PoolStats(total=8, free=0, cached=1, in_use=7)
    assert p.allocate(1) == [0]
    assert p.lookup(100) is None
    assert p.stats() == PoolStats(total=8, free=0, cached=0, in_use=8)


def test_touch_revives_cached_block_from_middle_of_queue() -> None:
    p = make()
    assert p.allocate(3) == [0, 1, 2]
    p.cache(1, 7)
    p.free([2, 1, 0])  # queue [3 4 5 6 7 2 1 0]
    p.touch([1])
    assert p.ref_count(1) == 1
    assert p.stats() == PoolStats(total=8, free=7, cached=0, in_use=1)
    assert p.num_free_blocks() == 7
    assert p.allocate(7) == [3, 4, 5, 6, 7, 2, 0]
    assert p.lookup(7) == 1  # in use: never evicted


def test_touch_free_uncached_block_is_an_error() -> None:
    p = make()
    with pytest.raises(ValueError, match="not cached"):
        p.touch([3])
    assert p.ref_count(3) == 0


def test_cache_keeps_existing_mapping() -> None:
    p = make()
    assert p.allocate(2) == [0, 1]
    p.cache(0, 5)
    p.cache(1, 5)  # same prefix computed twice: first registration wins
    assert p.lookup(5) == 0 and p.block_hash(1) is None
    p.cache(0, 5)  # idempotent
    with pytest.raises(ValueError, match="different hash"):
        p.cache(0, 6)
    p.free([1, 0])
    assert p.stats() == PoolStats(total=8, free=7, cached=1, in_use=0)
    with pytest.raises(ValueError, match="not in use"):
        p.cache(1, 9)


def test_reset_prefix_cache() -> None:
    p = make()
    assert p.allocate(2) == [0, 1]
    p.cache(0, 1)
    p.cache(1, 2)
    p.free([1])
    assert p.reset_prefix_cache() is False  # block 0 still in use
    assert p.lookup(2) == 1
    p.free([0])
    assert p.stats() == PoolStats(total=8, free=6, cached=2, in_use=0)
    assert p.reset_prefix_cache() is True
    assert p.lookup(1) is None and p.lookup(2) is None
    assert p.stats() == PoolStats(total=8, free=8, cached=0, in_use=0)
    assert p.allocate(8) == [2, 3, 4, 5, 6, 7, 1, 0]


def test_caching_disabled() -> None:
    p = make(caching=False)
    assert p.allocate(1) == [0]
    p.cache(0, 42)
    assert p.lookup(42) is None and p.block_hash(0) is None
    p.free([0])
    assert p.stats() == PoolStats(total=8, free=8, cached=0, in_use=0)


def test_bad_construction_and_ids() -> None:
    with pytest.raises(ValueError):
        BlockPool(0)
    p = make()
    with pytest.raises(ValueError):
        p.ref_count(-1)
    with pytest.raises(ValueError):
        p.touch([8])
