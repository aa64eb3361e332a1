"""Overlapped detokenization (LLMEngine.step): a step's text is computed while the next
step runs. It must change when outputs appear, never what they say."""
from __future__ import annotations

import pytest

from pdserve.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.llm_engine import OVERLAP_DETOKENIZE_MIN_SEQS, LLMEngine
from pdserve.sampling.params import SamplingParams



def _params(n: int) -> list[SamplingParams]:
    out = []
    for i in range(n):
        if i == 3:
            out.append(SamplingParams(max_tokens=24, stop=[" the", "\n"]))  # text-stopped: never deferred
        elif i == 5:
            out.append(SamplingParams(max_tokens=20, temperature=0.8, seed=7))
        elif i == 7:
            out.append(SamplingParams(max_tokens=2))  # ends right after its first deferrable token
        else:
            out.append(SamplingParams(max_tokens=6 + 3 * i, ignore_eos=i % 2 == 0))
    return out


def _engine(model_dir: str, overlap: bool) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=model_dir, dtype="float32", device="cpu", overlap_detokenize=overlap,
        cache=CacheConfig(num_blocks=256, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512)))


def _run(engine: LLMEngine, tok, prompts: list[str]) -> tuple[dict, list]:
    """Per request: (token ids, text, finish reason, number of finished outputs); and the
    list of deferred-token counts seen after each step."""
    acc: dict[str, dict] = {}
    for i, (prompt, p) in enumerate(zip(prompts[:10], _params(10))):
        engine.add_request(f"r{i}", tok.encode(prompt), p)
        acc[f"r{i}"] = {"ids": [], "text": "", "finish": None, "finished_outputs": 0}
    deferred = []
    while engine.has_unfinished():
        for out in engine.step():
            a = acc[out.request_id]
            assert a["finished_outputs"] == 0, f"output after the last one for {out.request_id}"
            a["ids"] += out.new_token_ids
            a["text"] += out.new_text
            if out.finished:
                a["finish"] = out.finish_reason
                a["finished_outputs"] += 1
        deferred.append(len(engine._untexted))
    return acc, deferred


@pytest.fixture(scope="module")
def engines(default_model_dir):
    return _engine(default_model_dir, False), _engine(default_model_dir, True)


def test_overlap_gives_the_same_tokens_text_and_finish_reasons(engines, prompts):
    plain, overlapped = engines
    want, none_deferred = _run(plain, plain.tokenizer, prompts)
    got, deferred = _run(overlapped, overlapped.tokenizer, prompts)
    assert not any(none_deferred)
    assert max(deferred) >= OVERLAP_DETOKENIZE_MIN_SEQS - 2  # the overlap really ran
    assert got == want
    assert all(a["finished_outputs"] == 1 for a in got.values())
    assert got["r3"]["finish"] in ("stop", "length")
    assert got["r7"]["ids"] and len(got["r7"]["ids"]) == 2 and got["r7"]["finish"] == "length"
    for e in engines:
        assert e.pool.stats().in_use == 0 and not e.has_unfinished()


def test_small_batches_are_not_deferred(engines, prompts):
    _, overlapped = engines
    tok = overlapped.tokenizer
    for i in range(OVERLAP_DETOKENIZE_MIN_SEQS - 1):
        overlapped.add_request(f"s{i}", tok.encode(prompts[i]), SamplingParams(max_tokens=5))
    while overlapped.has_unfinished():
        overlapped.step()
        assert not overlapped._untexted


def test_length_finish_frees_blocks_before_the_final_text(engines, prompts):
    _, overlapped = engines
    tok = overlapped.tokenizer
    for i in range(OVERLAP_DETOKENIZE_MIN_SEQS):
        overlapped.add_request(f"l{i}", tok.encode(prompts[i]), SamplingParams(max_tokens=3, ignore_eos=True))
    finals = set()
    while overlapped.has_unfinished():
        finals |= {o.request_id for o in overlapped.step() if o.finished}
        if not overlapped.seqs and overlapped._untexted:
            # every sequence has ended and returned its blocks; only their text is pending
            assert overlapped.pool.stats().in_use == 0
            assert set(overlapped.pending_request_ids()) == {s.seq_id for s, *_ in overlapped._untexted}
            assert not finals
    assert finals == {f"l{i}" for i in range(OVERLAP_DETOKENIZE_MIN_SEQS)}
    assert overlapped.pool.stats().in_use == 0


def test_abort_of_a_request_with_pending_text_is_its_last_output(engines, prompts):
    _, overlapped = engines
    tok = overlapped.tokenizer
    for i in range(OVERLAP_DETOKENIZE_MIN_SEQS + 2):
        overlapped.add_request(f"a{i}", tok.encode(prompts[i % len(prompts)]),
                               SamplingParams(max_tokens=12, ignore_eos=True))
    while not overlapped._untexted:
        overlapped.step()
    victim = overlapped._untexted[0][0].seq_id
    abort_out = overlapped.abort(victim)
    assert abort_out is not None and abort_out.finished and abort_out.finish_reason == "abort"
    after = []
    while overlapped.has_unfinished():
        after += [o for o in overlapped.step() if o.request_id == victim]
    assert after == []
    assert overlapped.pool.stats().in_use == 0
