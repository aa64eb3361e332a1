"""load_model: layouts it accepts, and the errors that name what is wrong and where."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdserve.config import ModelConfig
from pdserve.kernels import reference
from pdserve.model.loader import INDEX_FILE, SINGLE_FILE, load_model


class RefOps:
    write_kv = staticmethod(reference.write_kv)
    paged_attention = staticmethod(reference.paged_attention)


TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32,
    "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def tiny_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint with exactly the tensors a Llama of `cfg` has, in HF names."""
    g = torch.Generator().manual_seed(seed)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d, hq, hkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (hq * d, h), p + "self_attn.k_proj.weight": (hkv * d, h),
            p + "self_attn.v_proj.weight": (hkv * d, h), p + "self_attn.o_proj.weight": (h, hq * d),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def write_model(path: Path, cfg: dict, state: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(state, str(path / SINGLE_FILE))
    return path


def load(path: Path, dtype: torch.dtype = torch.float32):
    return load_model(path, dtype, torch.device("cpu"), RefOps())


def test_loads_every_tensor_and_casts(tmp_path: Path) -> None:
    state = tiny_state(TINY_CONFIG)
    model = load(write_model(tmp_path / "m", TINY_CONFIG, state), torch.bfloat16)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for name, t in state.items():
        assert loaded[name].dtype == torch.bfloat16
        torch.testing.assert_close(loaded[name], t.to(torch.bfloat16), atol=0, rtol=0)
    assert not any(p.requires_grad for p in model.parameters())
    # The rope table is derived, not loaded: it must be rebuilt after the meta-device build.
    cache = model.model.rotary_emb.cos_sin_cache
    assert torch.isfinite(cache).all() and cache[0, 0].eq(1).all()


def test_missing_dir_and_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(tmp_path / "empty")


def test_missing_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load(path)


def test_missing_shard_names_the_shard(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m", TINY_CONFIG, tiny_state(TINY_CONFIG))
    (path / SINGLE_FILE).unlink()
    (path / INDEX_FILE).write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00001.safetensors"):
        load(path)


def test_unsupported_architecture(tmp_path: Path) -> None:
    cfg = {**TINY_CONFIG, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    path = write_model(tmp_path / "m", cfg, tiny_state(TINY_CONFIG))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        load(path)


def test_missing_tensor_names_tensor_and_file(tmp_path: Path) -> None:
    state = tiny_state(TINY_CONFIG)
    del state["model.layers.1.mlp.up_proj.weight"]
    path = write_model(tmp_path / "m", TINY_CONFIG, state)
    with pytest.raises(ValueError) as e:
        load(path)
    msg = str(e.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and str(path / SINGLE_FILE) in msg
    assert "(32, 16)" in msg


def test_missing_tensor_in_sharded_checkpoint_names_its_shard(tmp_path: Path) -> None:
    state = tiny_state(TINY_CONFIG)
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    names = sorted(state)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    weight_map = {n: shard for shard, ns in shards.items() for n in ns}
    victim = shards["b.safetensors"][0]
    for shard, ns in shards.items():
        save_file({n: state[n] for n in ns if n != victim}, str(path / shard))
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ValueError, match=rf"{victim}.*b\.safetensors"):
        load(path)


def test_wrong_shape_names_tensor_file_and_shapes(tmp_path: Path) -> None:
    state = tiny_state(TINY_CONFIG)
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(12, 16)  # want (8, 16)
    path = write_model(tmp_path / "m", TINY_CONFIG, state)
    with pytest.raises(ValueError) as e:
        load(path)
    msg = str(e.value)
    assert "model.layers.0.self_attn.k_proj.weight" in msg and str(path / SINGLE_FILE) in msg
    assert "(12, 16)" in msg and "(8, 16)" in msg


def test_extra_tensors_are_ignored(tmp_path: Path, caplog) -> None:
    state = tiny_state(TINY_CONFIG)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(2)
    path = write_model(tmp_path / "m", TINY_CONFIG, state)
    with caplog.at_level(logging.DEBUG, logger="pdserve.model.loader"):
        load(path)
    assert "rotary_emb.inv_freq" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_tied_embeddings(tmp_path: Path) -> None:
    cfg = {**TINY_CONFIG, "tie_word_embeddings": True}
    state = tiny_state(cfg)
    assert "lm_head.weight" not in state
    model = load(write_model(tmp_path / "tied", cfg, state))
    assert model.lm_head is None
    hidden = torch.randn(3, 16)
    torch.testing.assert_close(model.compute_logits(hidden),
                               hidden @ state["model.embed_tokens.weight"].T)


def test_tied_checkpoint_with_redundant_lm_head(tmp_path: Path) -> None:
    """Some tied checkpoints also store lm_head.weight: it is ignored, embed_tokens wins."""
    cfg = {**TINY_CONFIG, "tie_word_embeddings": True}
    state = tiny_state(cfg)
    state["lm_head.weight"] = torch.zeros(32, 16)
    model = load(write_model(tmp_path / "tied", cfg, state))
    hidden = torch.randn(3, 16)
    torch.testing.assert_close(model.compute_logits(hidden),
                               hidden @ state["model.embed_tokens.weight"].T)


def test_untied_without_lm_head_is_an_error(tmp_path: Path) -> None:
    state = tiny_state(TINY_CONFIG)
    del state["lm_head.weight"]
    with pytest.raises(ValueError, match="lm_head.weight"):
        load(write_model(tmp_path / "m", TINY_CONFIG, state))


def test_round_trip_through_our_state_dict(tmp_path: Path) -> None:
    """A checkpoint written from our own model loads back unchanged (names are HF's)."""
    state = tiny_state(TINY_CONFIG)
    model = load(write_model(tmp_path / "a", TINY_CONFIG, state))
    write_model(tmp_path / "b", TINY_CONFIG, {k: v.clone() for k, v in model.state_dict().items()})
    assert load_file(str(tmp_path / "b" / SINGLE_FILE)).keys() == state.keys()
    again = load(tmp_path / "b").state_dict()
    for name, t in state.items():
        torch.testing.assert_close(again[name], t, atol=0, rtol=0)


def test_sliding_window_is_parsed_and_warned(tmp_path: Path, caplog) -> None:
    cfg = {**TINY_CONFIG, "architectures": ["MistralForCausalLM"], "sliding_window": 16}
    with caplog.at_level(logging.WARNING, logger="pdserve.model.loader"):
        model = load(write_model(tmp_path / "m", cfg, tiny_state(TINY_CONFIG)))
    assert model.config.sliding_window == 16 and "sliding_window=16" in caplog.text
    # Qwen2/3 ship a window that is switched off by use_sliding_window.
    qwen = {**cfg, "architectures": ["Qwen3ForCausalLM"], "use_sliding_window": False}
    assert ModelConfig.from_dict(qwen).sliding_window is None
