"""Engine look-ahead (LLMEngine.step): each step is scheduled and launched before the
previous step's tokens are read, its inputs taken from the device. It must change when
work runs, never what comes out. On CPU the launch is synchronous, so these tests check
the bookkeeping (placeholders, progress, preemption, aborts, blocks); the GPU suite
measures the overlap."""
from __future__ import annotations

import pytest

from pdserve.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.runner import PLACEHOLDER_TOKEN
from pdserve.sampling.params import SamplingParams


def _params(i: int, early_ends: bool = False) -> SamplingParams:
    """Without early_ends no sequence ends before max_tokens, so both engines run the
    very same batches (and exact equality holds: batch composition changes fp32 results
    on CPU). With it, eos and stop strings end sequences while their successor step is
    already in flight."""
    kinds = [
        dict(max_tokens=18, ignore_eos=True),
        dict(max_tokens=14, ignore_eos=True, temperature=0.9, top_p=0.9, seed=11 + i),
        dict(max_tokens=12, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.4),
        dict(max_tokens=10, ignore_eos=True, logprobs=3),
        dict(max_tokens=1),                                    # ends with its first token
        dict(max_tokens=9, min_tokens=4, ignore_eos=True, seed=3, temperature=0.7),
    ]
    if early_ends:
        kinds += [dict(max_tokens=40), dict(max_tokens=30, stop=[" the", "\n", "."])]
    return SamplingParams(**kinds[i % len(kinds)])


def _engine(model_dir: str, look_ahead: bool, num_blocks: int = 256, overlap: bool = False,
            max_model_len: int | None = None) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=model_dir, dtype="float32", device="cpu", look_ahead=look_ahead,
        overlap_detokenize=overlap,
        cache=CacheConfig(num_blocks=num_blocks, enable_prefix_caching=True),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64,
                                  max_model_len=max_model_len)))


def _drain(engine: LLMEngine, acc: dict, abort_at: dict[int, str] | None = None) -> int:
    """Step until idle; returns the number of steps. abort_at: step number -> request id."""
    steps = 0
    while engine.has_unfinished():
        if abort_at and steps in abort_at:
            out = engine.abort(abort_at[steps])
            if out is not None:
                _take(acc, out)
        for out in engine.step():
            _take(acc, out)
        steps += 1
        for seq in engine.seqs.values():   # the host never sees a placeholder as text or input
            assert seq.tokens[:seq.num_prompt_tokens].count(PLACEHOLDER_TOKEN) == 0
    return steps


def _take(acc: dict, out) -> None:
    a = acc.setdefault(out.request_id, {"ids": [], "text": "", "finish": None, "finals": 0,
                                        "lps": []})
    assert a["finals"] == 0, f"output after the last one for {out.request_id}"
    assert PLACEHOLDER_TOKEN not in out.new_token_ids
    a["ids"] += out.new_token_ids
    a["text"] += out.new_text
    a["lps"] += [(lp.token_id, round(lp.logprob, 4)) for lp in out.new_logprobs or []]
    if out.finished:
        a["finish"], a["finals"] = out.finish_reason, 1


def _run(engine: LLMEngine, prompts: list[str], n: int = 12, abort_at=None,
         early_ends: bool = False) -> dict:
    tok = engine.tokenizer
    for i in range(n):
        engine.add_request(f"r{i}", tok.encode(prompts[i % len(prompts)]), _params(i, early_ends))
    acc: dict = {}
    _drain(engine, acc, abort_at)
    assert engine.pool.stats().in_use == 0
    assert not engine.seqs and not engine.scheduler.has_work()
    return acc


@pytest.fixture(scope="module")
def model(default_model_dir):
    return default_model_dir


def test_look_ahead_gives_the_same_outputs(model, prompts):
    want = _run(_engine(model, look_ahead=False), prompts)
    engine = _engine(model, look_ahead=True)
    launched_early = []
    orig = engine.runner.launch

    def launch(out, source=None):
        launched_early.append(source is not None)
        return orig(out, source)
    engine.runner.launch = launch
    got = _run(engine, prompts)
    assert any(launched_early)                 # successors really read device tokens
    assert got == want
    assert all(a["finals"] == 1 for a in got.values())
    assert len(got["r4"]["ids"]) == 1 and got["r4"]["finish"] in ("length", "stop")


def test_look_ahead_with_overlapped_detokenization(model, prompts):
    want = _run(_engine(model, look_ahead=False), prompts, n=12)
    assert _run(_engine(model, look_ahead=True, overlap=True), prompts, n=12) == want


def test_look_ahead_under_preemption(model, prompts):
    """A pool too small for the batch: the look-ahead schedule preempts sequences whose
    token is still in flight; they recompute with the real token."""
    want = _run(_engine(model, look_ahead=False, num_blocks=8), prompts, n=10)
    engine = _engine(model, look_ahead=True, num_blocks=8)
    preempted = []
    orig = engine.scheduler.schedule

    def schedule():
        out = orig()
        preempted.extend(out.preempted)
        return out
    engine.scheduler.schedule = schedule
    assert _run(engine, prompts, n=10) == want
    assert preempted


def test_look_ahead_at_the_context_length(model, prompts):
    want = _run(_engine(model, look_ahead=False, max_model_len=24), prompts, n=8)
    got = _run(_engine(model, look_ahead=True, max_model_len=24), prompts, n=8)
    assert got == want
    assert any(a["finish"] == "length" for a in got.values())


@pytest.mark.parametrize("when", [1, 2, 5])
def test_abort_while_a_step_is_in_flight(model, prompts, when):
    engine = _engine(model, look_ahead=True)
    acc = _run(engine, prompts, n=8, abort_at={when: "r1", when + 1: "r3"})
    assert acc["r1"]["finish"] == "abort" and acc["r3"]["finish"] in ("abort", "stop", "length")
    assert all(a["finals"] == 1 for a in acc.values())


def test_sequences_that_end_while_their_successor_is_in_flight(model, prompts):
    """eos and stop strings: the successor step already has a row for the sequence; its
    token is dropped, nothing follows the last output, every block comes back."""
    engine = _engine(model, look_ahead=True)
    tok = engine.tokenizer
    acc = _run(engine, prompts, n=16, early_ends=True)
    ends = {rid: a["finish"] for rid, a in acc.items()}
    assert "stop" in ends.values()
    for i in range(16):
        a, p = acc[f"r{i}"], _params(i, early_ends=True)
        assert a["finals"] == 1 and len(a["ids"]) <= p.max_tokens
        if a["finish"] == "length":
            assert len(a["ids"]) == p.max_tokens
        for stop in p.stop:
            assert stop not in a["text"]
        eos = set(engine.eos_token_ids)
        if not p.ignore_eos:   # no token after an eos
            assert not eos.intersection(a["ids"][:-1])
    # the same requests without look-ahead end for the same kinds of reasons
    assert tok is not None


def test_a_look_ahead_engine_takes_no_kv_from_other_workers(model):
    engine = _engine(model, look_ahead=True)
    with pytest.raises(RuntimeError, match="look_ahead"):
        engine.reserve("x", [1, 2, 3], SamplingParams(max_tokens=2))
    assert engine.pool.stats().in_use == 0
