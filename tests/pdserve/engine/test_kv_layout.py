"""CacheConfig.kv_layout: which memory order of KV blocks each attention backend gets."""
from __future__ import annotations

import pytest
import torch

from pdserve.config import CacheConfig, ModelConfig
from pdserve.engine.llm_engine import resolve_kv_layout
from pdserve.model.llama import allocate_kv_caches


@pytest.mark.parametrize("layout,backend,want", [
    ("auto", "triton", "head"), ("auto", "cpu", "token"), ("auto", "torch", "token"),
    ("token", "triton", "token"), ("head", "triton", "head"), ("token", "cpu", "token"),
])
def test_resolve(layout: str, backend: str, want: str) -> None:
    assert resolve_kv_layout(layout, backend) == want


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_head_major_needs_the_triton_kernels(backend: str) -> None:
    """The C kernels and the torch reference index token-major blocks: asking them to
    read head-major ones is a configuration error, not wrong attention."""
    with pytest.raises(ValueError, match="triton"):
        resolve_kv_layout("head", backend)


def test_bad_layouts_are_rejected() -> None:
    with pytest.raises(ValueError, match="kv_layout"):
        CacheConfig(kv_layout="blocked")
    cfg = ModelConfig.from_dict(dict(architectures=["LlamaForCausalLM"], vocab_size=32,
                                     hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    with pytest.raises(ValueError, match="layout"):
        allocate_kv_caches(cfg, 4, 4, torch.float32, "cpu", "blocked")
    k, v = allocate_kv_caches(cfg, 4, 4, torch.float32, "cpu", "head")[1]
    assert k.shape == v.shape == (4, 4, 2, 8) and k.stride() == (64, 8, 32, 1)
    assert not k.any() and not v.any()
