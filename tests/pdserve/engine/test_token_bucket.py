"""Token-count buckets (runner.TOKEN_BUCKET): on CUDA, an eager step that carries a
prefill chunk runs with its token count rounded up, so that cuBLAS meets only shapes
warmed up at start. The padding rows must change nothing that comes out. On CPU the
bucket is off by default; these tests switch it on and run the torch reference ops,
which take padding rows the same way the Triton kernels do (slot -1, outside every
sequence's query range)."""
from __future__ import annotations

import torch

from pdserve.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.sampling.params import SamplingParams


def _engine(model_dir: str, bucket: int) -> LLMEngine:
    engine = LLMEngine(EngineConfig(
        model=model_dir, dtype="float32", device="cpu",
        cache=CacheConfig(num_blocks=128, enable_prefix_caching=True),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=48)))
    assert engine.runner.token_bucket == 0            # off on CPU unless asked for
    engine.runner.token_bucket = bucket
    return engine


def _run(engine: LLMEngine, prompts: list[list[int]]) -> dict[str, tuple[list[int], list[float]]]:
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    got: dict[str, tuple[list[int], list[float]]] = {f"r{i}": ([], []) for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id][0].extend(out.new_token_ids)
            got[out.request_id][1].extend(lp.logprob for lp in out.new_logprobs or [])
    return got


def test_padded_steps_give_the_same_tokens_and_logprobs(default_model_dir, prompts):
    tok = _engine(default_model_dir, 0).tokenizer
    # Chunked prefill (budget 48), mixed prefill/decode steps, and a prefix-cache hit
    # (the last prompt repeats the first one's 32-token head).
    ids = [tok.encode(p) for p in prompts[:5]]
    ids.append((ids[0] * 8)[:32] + tok.encode(" and more"))
    ids[0] = (ids[0] * 8)[:32] + ids[0]
    plain = _run(_engine(default_model_dir, 0), ids)
    padded = _run(_engine(default_model_dir, 16), ids)
    for rid in plain:
        assert padded[rid][0] == plain[rid][0], rid
        torch.testing.assert_close(padded[rid][1], plain[rid][1], atol=1e-4, rtol=0)


def test_prepare_pads_prefill_steps_only(default_model_dir):
    engine = _engine(default_model_dir, 16)
    runner = engine.runner
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine.add_request("a", list(range(100, 121)), params)      # 21 prompt tokens
    sched = engine.scheduler.schedule()
    inp = runner.prepare(sched)
    assert inp.input_ids.shape[0] == 32                        # 21 rounded up to 16s
    assert inp.meta.slot_mapping[21:].tolist() == [-1] * 11     # padding: no KV write
    assert int(inp.meta.query_start_loc[-1]) == 21              # outside every query range
    assert inp.logits_indices.tolist() == [20]
    # 2 blocks of 16, the table as wide as a multiple of 16 (one Triton specialization)
    assert inp.meta.block_tables.shape == (1, 16)
    assert inp.meta.block_tables[0, 2:].tolist() == [0] * 14
    engine.update(sched, runner.execute(sched))
    decode: SchedulerOutput = engine.scheduler.schedule()
    assert all(s.num_new_tokens == 1 for s in decode.scheduled)
    assert runner.prepare(decode).input_ids.shape[0] == 1      # a decode step: not padded


def test_warm_up_runs_every_bucket_shape(default_model_dir):
    engine = _engine(default_model_dir, 16)
    calls: list[tuple[int, int]] = []
    real = torch.nn.functional.linear

    def spy(x, w, b=None):
        calls.append((x.shape[0], tuple(w.shape)))
        return real(x, w, b)
    torch.nn.functional.linear = spy
    try:
        engine.runner.warm_up_gemms(40, 3)
    finally:
        torch.nn.functional.linear = real
    shapes = {tuple(w.shape) for w, _ in engine.model.layer_gemms()}
    assert len(shapes) == 4                  # fused qkv, o, fused gate_up, down
    for m in (16, 32, 48):                   # 40 rounded up to the bucket
        assert {shape for mm, shape in calls if mm == m} == shapes


def test_warm_up_forward_writes_no_kv(default_model_dir):
    engine = _engine(default_model_dir, 16)
    engine.kv_caches[0][0][0].fill_(0.5)           # block 0: the one the dummy reads
    before = [k.clone() for k, _ in engine.kv_caches[:2]]
    engine.runner.warm_up_prefill()
    for b, (k, _v) in zip(before, engine.kv_caches[:2]):
        assert torch.equal(b, k)
