"""Per-step attention metadata: the runner builds it once, every layer reads it.

A step's tokens are flattened into one ragged batch. Sequence i contributes
``query_len[i] = query_start_loc[i+1] - query_start_loc[i]`` new tokens, which are the
*last* query_len[i] positions of its context of ``seq_lens[i]`` tokens (earlier ones are
already in the paged cache: a prefix-cache hit or earlier prefill chunks). A decode
sequence has query_len 1; a prefill chunk has more. Causality: new token j of sequence i
(0-based among its new tokens) sees context positions [0, seq_lens[i] - query_len[i] + j].

Paged KV layout, per layer (block_size tokens per block):

    k_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: [num_blocks, block_size, num_kv_heads, head_dim]

Token t of sequence i lives in block ``block_tables[i, t // block_size]`` at offset
``t % block_size``; its flat slot is ``block * block_size + offset``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class AttentionMetadata:
    slot_mapping: Tensor     # [num_tokens] int64: cache slot each new token's K/V goes to
    query_start_loc: Tensor  # [num_seqs + 1] int32: cumulative query lengths
    seq_lens: Tensor         # [num_seqs] int32: context length after this step
    block_tables: Tensor     # [num_seqs, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    # Host copies of the two length vectors, so the CPU reference path needs no sync.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1
