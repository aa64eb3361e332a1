"""CausalLM on the paged KV cache vs Hugging Face, logits for logits, on tiny random models.

Each config is saved with save_pretrained as a *sharded* checkpoint and loaded back with
load_model, so these tests also cover the sharded loader path. Steps are built by hand:
ragged prefill batches, chunked prefill over a cached prefix, mixed prefill+decode steps
and pure decode steps; each token's logits must equal HF's full-sequence logits there.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig,
                          Qwen2Config, Qwen3Config)

from pdserve.kernels import reference
from pdserve.kernels.metadata import AttentionMetadata
from pdserve.model.llama import CausalLM, allocate_kv_caches
from pdserve.model.loader import INDEX_FILE, load_model

ATOL = 1e-4
BLOCK_SIZE = 4
NUM_BLOCKS = 32


class RefOps:
    """The torch reference kernels behind the AttentionOps protocol."""
    write_kv = staticmethod(reference.write_kv)
    paged_attention = staticmethod(reference.paged_attention)


TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6)

CONFIGS: dict[str, PretrainedConfig] = {
    "llama3-rope": LlamaConfig(**TINY, num_hidden_layers=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama-linear-rope": LlamaConfig(**TINY, num_hidden_layers=2, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "mistral": MistralConfig(**TINY, num_hidden_layers=2, sliding_window=None),
    "qwen2-tied": Qwen2Config(**TINY, num_hidden_layers=3, tie_word_embeddings=True),
    "qwen3": Qwen3Config(**TINY, num_hidden_layers=2),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def models(request, tmp_path_factory) -> tuple[torch.nn.Module, CausalLM]:
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(CONFIGS[request.param], dtype=torch.float32).eval()
    with torch.no_grad():
        # HF zero-inits biases and one-inits norms; randomize so every weight matters.
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, max_shard_size="40KB")
    assert (path / INDEX_FILE).is_file(), "the checkpoint should be sharded"
    ours = load_model(path, torch.float32, torch.device("cpu"), RefOps())
    return hf, ours


def hf_logits(hf: torch.nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return hf(ids[None]).logits[0].float()                     # [L, vocab]


class Stepper:
    """Feeds (sequence, new tokens) steps to CausalLM the way a model runner would."""

    def __init__(self, model: CausalLM, block_tables: list[list[int]]):
        self.model = model
        self.block_tables = block_tables
        self.computed = [0] * len(block_tables)
        self.kv = allocate_kv_caches(model.config, NUM_BLOCKS, BLOCK_SIZE, torch.float32, "cpu")

    def step(self, chunks: list[tuple[int, Tensor]]) -> list[Tensor]:
        """chunks: (sequence index, its next tokens). Returns logits per chunk."""
        ids, pos, slots, qlens, slens, tables = [], [], [], [], [], []
        for seq, toks in chunks:
            start = self.computed[seq]
            table = self.block_tables[seq]
            for p in range(start, start + len(toks)):
                pos.append(p)
                slots.append(table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
            ids.append(toks)
            qlens.append(len(toks))
            slens.append(start + len(toks))
            tables.append(table)
            self.computed[seq] += len(toks)
        width = max(len(t) for t in tables)
        qsl = [0]
        for n in qlens:
            qsl.append(qsl[-1] + n)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32),
            seq_lens=torch.tensor(slens, dtype=torch.int32),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                      dtype=torch.int32),
            max_query_len=max(qlens), max_seq_len=max(slens),
            query_lens_cpu=qlens, seq_lens_cpu=slens)
        with torch.no_grad():
            hidden = self.model(torch.cat(ids), torch.tensor(pos), self.kv, meta)
            logits = self.model.compute_logits(hidden)
        assert logits.dtype == torch.float32
        return list(logits.split(qlens))


def test_ragged_prefill_matches_hf(models) -> None:
    hf, ours = models
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (11,), generator=g)
    b = torch.randint(0, 256, (7,), generator=g)
    # Scattered, non-zero block ids: a wrong slot or table lookup cannot pass by luck.
    stepper = Stepper(ours, [[3, 9, 1], [7, 2]])
    out_a, out_b = stepper.step([(0, a), (1, b)])
    torch.testing.assert_close(out_a, hf_logits(hf, a), atol=ATOL, rtol=0)
    torch.testing.assert_close(out_b, hf_logits(hf, b), atol=ATOL, rtol=0)


def test_chunked_prefill_then_decode_matches_hf(models) -> None:
    hf, ours = models
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, 256, (16,), generator=g)
    b = torch.randint(0, 256, (12,), generator=g)
    ref_a, ref_b = hf_logits(hf, a), hf_logits(hf, b)
    stepper = Stepper(ours, [[4, 11, 0, 6], [8, 13, 5]])

    # 1: first chunk of A beside all of B's prompt but its last 3 tokens.
    out_a, out_b = stepper.step([(0, a[:5]), (1, b[:9])])
    torch.testing.assert_close(out_a, ref_a[:5], atol=ATOL, rtol=0)
    torch.testing.assert_close(out_b, ref_b[:9], atol=ATOL, rtol=0)
    # 2: the rest of A's prompt over its cached prefix, mixed with a decode token of B.
    out_a, out_b = stepper.step([(0, a[5:13]), (1, b[9:10])])
    torch.testing.assert_close(out_a, ref_a[5:13], atol=ATOL, rtol=0)
    torch.testing.assert_close(out_b, ref_b[9:10], atol=ATOL, rtol=0)
    # 3..: pure decode steps (teacher-forced), the last one with A alone.
    for i, j in [(13, 10), (14, 11)]:
        out_a, out_b = stepper.step([(0, a[i:i + 1]), (1, b[j:j + 1])])
        torch.testing.assert_close(out_a, ref_a[i:i + 1], atol=ATOL, rtol=0)
        torch.testing.assert_close(out_b, ref_b[j:j + 1], atol=ATOL, rtol=0)
    (out_a,) = stepper.step([(0, a[15:16])])
    torch.testing.assert_close(out_a, ref_a[15:16], atol=ATOL, rtol=0)


def test_greedy_tokens_match_hf(models) -> None:
    """Greedy continuation, our decode loop vs HF's argmax over the growing sequence."""
    hf, ours = models
    prompt = torch.arange(3, 12)
    stepper = Stepper(ours, [[2, 5, 7, 1, 12]])
    (logits,) = stepper.step([(0, prompt)])
    seq = prompt.tolist()
    for _ in range(8):
        nxt = int(logits[-1].argmax())
        assert nxt == int(hf_logits(hf, torch.tensor(seq))[-1].argmax())
        seq.append(nxt)
        (logits,) = stepper.step([(0, torch.tensor([nxt]))])


def test_kv_cache_views_share_one_buffer(models) -> None:
    _, ours = models
    kv = allocate_kv_caches(ours.config, 6, 4, torch.float16, "cpu")
    assert len(kv) == ours.config.num_hidden_layers
    k0, v0 = kv[0]
    assert k0.shape == (6, 4, 2, 16) and k0.is_contiguous() and v0.is_contiguous()
    assert k0.untyped_storage().data_ptr() == kv[-1][1].untyped_storage().data_ptr()


def test_checkpoint_round_trip_names(models, tmp_path: Path) -> None:
    """Our parameter names are HF's: every HF weight maps onto one of ours."""
    hf, ours = models
    ours_names = set(ours.state_dict())
    hf_names = set(hf.state_dict())
    if ours.config.tie_word_embeddings:
        hf_names.discard("lm_head.weight")
    assert ours_names == hf_names
