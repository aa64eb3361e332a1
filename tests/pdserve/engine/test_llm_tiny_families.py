"""LLM.generate == HF generate (greedy, fp32) for tiny random Qwen2- and Qwen3-style
models saved as sharded safetensors with an index; and seeded sampling is reproducible."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

from pdserve import LLM, SamplingParams

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _tiny(kind: str, vocab: int):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1,
                  eos_token_id=2)
    if kind == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    return Qwen3Config(**common, tie_word_embeddings=True)


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def tiny_model(request, tmp_path_factory, default_model_dir):
    torch.manual_seed(1)
    # The real tokenizer of the default model keeps the model directory complete.
    vocab = 49152
    hf = AutoModelForCausalLM.from_config(_tiny(request.param, vocab), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    path = Path(tmp_path_factory.mktemp(request.param))
    hf.save_pretrained(path, max_shard_size="2MB")
    assert (path / "model.safetensors.index.json").exists()
    for f in TOKENIZER_FILES:
        src = Path(default_model_dir) / f
        if src.exists():
            shutil.copy(src, path / f)
    return hf, str(path)


def test_greedy_matches_hf_batch(tiny_model):
    hf, path = tiny_model
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (5, 17, 40, 130, 300)]
    llm = LLM(path, dtype="float32", device="cpu", num_blocks=200, max_num_batched_tokens=128)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    for p, o in zip(prompts, outs):
        x = torch.tensor([p])
        with torch.inference_mode():
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12,
                            do_sample=False, eos_token_id=None, pad_token_id=0)
        assert o.token_ids == y[0, len(p):].tolist()


def test_seeded_sampling_reproducible_across_batches(default_model_dir):
    llm = LLM(default_model_dir, dtype="float32", device="cpu", num_blocks=200)
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234, ignore_eos=True)
    alone = llm.generate(["Tell me a story about a fox"], sp)[0].token_ids
    other = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    mixed = llm.generate(["Hello there", "Tell me a story about a fox", "Numbers: 1 2 3"],
                         [other, sp, other])[1].token_ids
    assert alone == mixed
    different = llm.generate(["Tell me a story about a fox"],
                             SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=99,
                                            ignore_eos=True))[0].token_ids
    assert different != alone


def test_stop_string_and_penalty_through_engine(default_model_dir):
    llm = LLM(default_model_dir, dtype="float32", device="cpu", num_blocks=200)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    full = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=20))[0]
    assert "Paris" in full.text
    cut = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=20, stop=["Paris"]))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == "Paris"
    assert cut.text == full.text[:full.text.index("Paris")]
    # A strong repetition penalty changes greedy output for a repetitive prompt.
    rep = "one two three one two three one two three"
    a = llm.generate([rep], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0]
    b = llm.generate([rep], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True,
                                           repetition_penalty=3.0))[0]
    assert a.token_ids != b.token_ids
