"""The host waits for the GPU once a step, to read the sampled tokens, and nowhere else.

Under torch.cuda.set_sync_debug_mode("error") any synchronizing CUDA call raises: a
blocking host->device copy (torch.tensor(..., device="cuda"), indexing a CUDA tensor with
a Python list), .item(), .tolist(), nonzero. Such a call inside a step makes the host wait
for the forward pass it has just queued, so nothing of the next step is prepared beside
it. Only the runner's resolve() (the sampled tokens) runs with the check off.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

from pdserve.sampling.params import SamplingParams

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs CUDA with compiled Triton (TRITON_INTERPRET unset)")

# Every sampler path: greedy (the argmax fast path alone), seeded and unseeded random rows
# with each filter, penalties, the min_tokens mask and logprobs.
PARAMS = [
    dict(temperature=0.0),
    dict(temperature=0.8, top_p=0.9, seed=7),
    dict(temperature=1.0, top_k=20),
    dict(temperature=0.7, min_p=0.1),
    dict(temperature=0.0, repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.2),
    dict(temperature=0.0, logprobs=3),
    dict(temperature=0.9, min_tokens=6, seed=3),
]


@contextlib.contextmanager
def _syncs_raise():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kernel", [False, True], ids=["sort", "sampling-kernel"])
def test_sampler_launch_queues_without_waiting(kernel: bool) -> None:
    """Sampler.launch on CUDA logits makes no synchronizing call for any mix of rows, on
    the torch sort path and through the sampling kernel; the deterministic rows (greedy,
    penalties, masked, logprobs) sample what they do on CPU."""
    from pdserve.sampling.sampler import Sampler, SamplingRow
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(PARAMS), 300, generator=gen) * 3
    rows = [SamplingRow(SamplingParams(max_tokens=16, **p), [1, 5, 9, 5], [7, 7, 2])
            for p in PARAMS]
    cuda_rows = [SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids,
                             None if r.params.seed is None else
                             torch.Generator("cuda").manual_seed(r.params.seed)) for r in rows]
    sampler = Sampler(eos_token_ids=[0, 1], seed=0, kernel=kernel)
    dev_logits = logits.cuda()
    sampler.launch(dev_logits, cuda_rows).results()            # first calls outside the check
    subsets = [list(range(len(rows))), [0, 4, 5], [1, 2, 3, 6], [1, 4]]
    batches = [dev_logits[idx].contiguous() for idx in subsets]    # list indexing syncs
    with _syncs_raise():
        for idx, batch in zip(subsets, batches):
            pending = sampler.launch(batch, [cuda_rows[i] for i in idx])
            torch.cuda.set_sync_debug_mode(0)
            got = pending.results()
            torch.cuda.set_sync_debug_mode("error")
            want = Sampler(eos_token_ids=[0, 1]).launch(logits[idx], [rows[i] for i in idx]).results()
            for i, g, w in zip(idx, got, want):
                assert 0 <= g.token_id < 300
                if rows[i].params.temperature == 0.0:
                    assert g.token_id == w.token_id, PARAMS[i]
                if rows[i].params.min_tokens:
                    assert g.token_id not in (0, 1)
                if rows[i].params.logprobs:
                    assert [t for t, _ in g.top_logprobs] == [t for t, _ in w.top_logprobs]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.timeout(300)
@pytest.mark.parametrize("look_ahead", [False, True], ids=["launch-resolve", "look-ahead"])
def test_engine_steps_wait_only_for_sampled_tokens(tiny_llama_dir: str, look_ahead: bool) -> None:
    """Whole engine steps on CUDA (prefill graphs, chunked prefill, mixed steps, decode
    graph replays, sampling, the look-ahead's launch from device tokens) with the check
    on everywhere but resolve()."""
    from pdserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from pdserve.engine.llm_engine import LLMEngine
    engine = LLMEngine(EngineConfig(
        model=tiny_llama_dir, dtype="bfloat16", device="cuda", look_ahead=look_ahead,
        cache=CacheConfig(num_blocks=256),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512)))
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 40, 130, 300, 17, 64, 9]

    def run(tag: str) -> int:
        for i, (n, p) in enumerate(zip(lengths, PARAMS)):
            engine.add_request(f"{tag}{i}", torch.randint(3, 290, (n,), generator=gen).tolist(),
                               SamplingParams(max_tokens=12 + i, ignore_eos=True, **p))
        tokens = 0
        while engine.has_unfinished():
            tokens += sum(len(o.new_token_ids) for o in engine.step())
        return tokens

    assert run("warm") == sum(12 + i for i in range(len(PARAMS)))   # compiles, first calls
    resolve = engine.runner.resolve

    def resolve_unchecked(flight):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return resolve(flight)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    engine.runner.resolve = resolve_unchecked
    try:
        with _syncs_raise():
            produced = run("checked")
    finally:
        engine.runner.resolve = resolve
    assert produced == sum(12 + i for i in range(len(PARAMS)))
    assert engine.pool.stats().in_use == 0
