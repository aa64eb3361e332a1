"""Greedy parity of LLM.generate with HF transformers on the default model (fp32).

The batch is built so that one run exercises chunked prefill (a small token budget),
mixed prefill/decode steps, and prefix-cache hits (prompts sharing a long prefix, and a
second pass over the same prompts)."""
from __future__ import annotations

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.scheduler import Scheduler

MAX_NEW = 24

SYSTEM = ("You are a meticulous assistant for a railway company. " * 30).strip()


def _prompts(tok) -> list[list[int]]:
    texts = [
        "Hi",
        "The capital of France is",
        "Write a haiku about the sea.",
        "List three prime numbers and explain why each is prime.",
        SYSTEM + " Question: when does the first train leave?",
        SYSTEM + " Question: how much is a ticket to the coast?",
        " ".join(f"item{i}" for i in range(150)) + ". Summarize the list.",
        ("Once upon a time in a small village there lived an old clockmaker. " * 36)
        + "What happened next?",
    ]
    ids = [tok.encode(t) for t in texts]
    return ids


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return LLM(default_model_dir, dtype="float32", device="cpu", num_blocks=600,
               max_num_batched_tokens=256, max_num_seqs=16)


@pytest.fixture(scope="module")
def hf_outputs(default_model_dir, llm):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    model.eval()
    outs = []
    for ids in _prompts(llm.tokenizer):
        x = torch.tensor([ids])
        with torch.inference_mode():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
        outs.append(y[0, len(ids):].tolist())
    return outs


def test_prompt_lengths_cover_5_to_600(llm):
    lens = [len(p) for p in _prompts(llm.tokenizer)]
    assert min(lens) <= 5 and 500 <= max(lens) <= 600, lens


def test_greedy_matches_hf_in_one_batch(llm, hf_outputs, monkeypatch):
    steps = []
    orig = Scheduler.schedule

    def spy(self):
        out = orig(self)
        steps.append([(s.seq.seq_id, s.num_new_tokens, s.samples) for s in out.scheduled])
        return out
    monkeypatch.setattr(Scheduler, "schedule", spy)

    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    prompts = _prompts(llm.tokenizer)
    outs = llm.generate(prompts, params)
    for i, (o, ref) in enumerate(zip(outs, hf_outputs)):
        assert o.token_ids == ref, f"prompt {i} ({len(prompts[i])} tokens) diverged"
        assert o.finish_reason == "length"
        assert o.usage.prompt_tokens == len(prompts[i])
        assert o.usage.completion_tokens == MAX_NEW
    # Chunked prefill happened (a chunk that does not reach the end of its sequence) ...
    assert any(not samples and n > 1 for st in steps for _, n, samples in st)
    # ... in steps that also carried decodes (mixed batches).
    assert any(any(n == 1 for _, n, _ in st) and any(n > 1 for _, n, _ in st) for st in steps)
    # The two prompts with the shared system prefix: the later one hit the prefix cache.
    assert outs[4].usage.cached_tokens + outs[5].usage.cached_tokens > 0

    # Second pass: every prompt longer than a block is served from the prefix cache.
    again = llm.generate(prompts, params)
    for o, ref, p in zip(again, hf_outputs, prompts):
        assert o.token_ids == ref
        if len(p) > 16:
            assert o.usage.cached_tokens >= 16 * ((len(p) - 1) // 16) - 16
    stats = llm.engine.stats()
    assert stats["kv_blocks_in_use"] == 0


def test_chat_answers_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=20))[0]
    assert out.text.strip().startswith("The capital of France is Paris.")
    assert out.finish_reason == "stop"


def test_step_inputs_start_on_16_byte_boundaries(llm, monkeypatch):
    """The runner packs a step's inputs into two buffers; Triton specializes kernels on
    16-byte pointer alignment, so every part must start aligned whatever the batch."""
    from pdserve.engine.runner import ModelRunner
    seen = []
    orig = ModelRunner.prepare

    def spy(self, out, source=None):
        inp = orig(self, out, source)
        m = inp.meta
        tensors = [inp.input_ids, inp.positions, inp.logits_indices, m.slot_mapping,
                   m.query_start_loc, m.seq_lens, m.block_tables]
        seen.append([t.data_ptr() % 16 for t in tensors if t.numel()])
        return inp
    monkeypatch.setattr(ModelRunner, "prepare", spy)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1000, 20000, (n,), generator=g).tolist() for n in (3, 17, 30, 41, 5)]
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert len(seen) > 5 and all(r == 0 for row in seen for r in row), seen
