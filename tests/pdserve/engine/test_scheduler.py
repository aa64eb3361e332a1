"""Scheduler on a tiny pool: exact block ids, chunking, preemption, abort."""
from __future__ import annotations

from pdserve.cache.block_pool import BlockPool
from pdserve.cache.kv_cache_manager import KVCacheManager
from pdserve.config import SchedulerConfig
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import Sequence, SeqStatus
from pdserve.sampling.params import SamplingParams

BS = 4


def make(num_blocks=8, budget=8, max_seqs=8, caching=True):
    pool = BlockPool(num_blocks, enable_caching=caching)
    kv = KVCacheManager(pool, BS, enable_prefix_caching=caching)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), kv), pool


def seq(sid, n, start=0):
    return Sequence(sid, list(range(start, start + n)), SamplingParams(max_tokens=100))


def run_step(s: Scheduler, next_token=7):
    out = s.schedule()
    s.update_after_step(out)
    for sc in out.scheduled:
        if sc.samples:
            sc.seq.tokens.append(next_token)
    st = s.kv.pool.stats()
    assert st.free + st.cached + st.in_use == st.total
    return [(sc.seq.seq_id, sc.num_new_tokens) for sc in out.scheduled], out


def test_chunked_prefill_then_decode_exact_blocks():
    s, pool = make(budget=8)
    a = seq("a", 10)
    s.add(a)
    sched, _ = run_step(s)
    assert sched == [("a", 8)]                      # first chunk: budget-limited
    assert s.kv.block_table("a") == [0, 1]
    assert a.num_computed_tokens == 8 and a.num_output_tokens == 0
    sched, _ = run_step(s)
    assert sched == [("a", 2)]                      # rest of the prompt, then sample
    assert s.kv.block_table("a") == [0, 1, 2]
    assert a.num_output_tokens == 1
    sched, _ = run_step(s)
    assert sched == [("a", 1)]                      # decode
    assert a.num_computed_tokens == 11


def test_mixed_step_decodes_first_and_fcfs_admission():
    s, _ = make(budget=8)
    a, b = seq("a", 3), seq("b", 12, start=100)
    s.add(a)
    run_step(s)                                     # a prefilled, sampled
    s.add(b)
    sched, out = run_step(s)
    assert sched == [("a", 1), ("b", 7)]            # decode first, then b's first chunk
    assert s.kv.block_table("a") == [0]
    assert s.kv.block_table("b") == [1, 2]


def test_preemption_by_recompute_frees_newest_and_readmits():
    s, pool = make(num_blocks=4, budget=16)
    a, b = seq("a", 7), seq("b", 7, start=50)
    s.add(a)
    s.add(b)
    run_step(s)                                     # both prefilled: 2 blocks each
    assert s.kv.block_table("a") == [0, 1] and s.kv.block_table("b") == [2, 3]
    run_step(s)                                     # both decode to 8 tokens... 7+1 fits
    assert a.num_tokens == 9 and b.num_tokens == 9
    # a needs a third block: b (newest) is preempted, its blocks freed
    sched, out = run_step(s)
    assert [x.seq_id for x in out.preempted] == ["b"]
    assert b.status == SeqStatus.WAITING and b.num_computed_tokens == 0
    assert s.waiting[0] is b
    assert sched == [("a", 1)]
    assert s.kv.block_table("a") == [0, 1, 3]      # tail block of b's chain freed last
    assert not s.kv.has("b")
    # finish a: b is re-admitted and recomputes prompt + its generated tokens
    s.remove(a)
    a.status = SeqStatus.FINISHED
    sched, _ = run_step(s)
    assert sched[0][0] == "b"
    assert b.num_preemptions == 1


def test_self_preemption_never_deadlocks():
    s, pool = make(num_blocks=2, budget=16)
    a = seq("a", 8)
    s.add(a)
    run_step(s)
    assert s.kv.block_table("a") == [0, 1]
    sched, out = run_step(s)                        # needs a 3rd block: none, a preempts itself
    assert [x.seq_id for x in out.preempted] == ["a"] and sched == []
    assert pool.stats().in_use == 0


def test_abort_in_each_state_frees_blocks():
    s, pool = make(budget=4)
    a, b, c = seq("a", 6), seq("b", 6, start=20), seq("c", 6, start=40)
    for x in (a, b, c):
        s.add(x)
    run_step(s)                                     # a: first chunk (4 tokens)
    assert s.kv.block_table("a") == [0]
    s.remove(a)                                     # abort mid-prefill
    assert pool.stats().in_use == 0
    s.remove(c)                                     # abort while waiting
    assert list(s.waiting) == [b]
    run_step(s)
    s.remove(b)
    assert pool.stats().in_use == 0 and not s.has_work()
    s.remove(b)                                     # twice: no error, no double free
    assert pool.stats().in_use == 0


def test_prefix_hit_on_admission():
    s, pool = make(num_blocks=8, budget=16)
    a = seq("a", 9)
    s.add(a)
    run_step(s)
    s.remove(a)
    b = seq("b", 10)                                # same first 9 tokens
    s.add(b)
    sched, _ = run_step(s)
    assert sched == [("b", 2)]                      # 8 tokens (2 full blocks) reused
    assert b.num_cached_tokens == 8
    assert s.kv.block_table("b")[:2] == [0, 1]
