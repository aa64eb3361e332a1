"""CUDA graphs for one-prompt prefill steps: the step that decides a lone request's TTFT.

An eager prefill step of a short prompt is bound by the host: per layer a dozen kernel
launches (Triton launches cost tens of microseconds of Python each) and a few dozen torch
ops, ~9 ms on the 1B shape against ~4 ms of GPU time for a 640-token prompt. A step with
exactly one sequence whose chunk fits `max_tokens` replays a graph instead. This is the
usual step of a prefill worker and of any engine at low load; steps that mix sequences
(decode rows, several prompts) stay eager.

How it works:

* Buckets: the runner already rounds a prefill step's token count up to a multiple of
  TOKEN_BUCKET (padding rows: slot -1, outside the query range). There is one graph per
  multiple up to max_tokens, captured largest first into one memory pool.
* Static inputs of the largest bucket: input_ids, positions, slot_mapping [max_tokens];
  query_start_loc [2], seq_lens [1], block_tables [1, max_blocks] int32, the logits row
  [1] int64. A replay copies the step's values in; the graph reads its bucket's prefix.
* Attention: the captured metadata says max_query_len = bucket, which sizes the prefill
  kernel's grid; the kernel reads the real query length from query_start_loc and
  programs past it return at once. The context (seq_len, a prefix-cache hit included)
  comes from seq_lens, the block table is as wide as max_context_len allows.
* Capture runs with every slot -1: it writes no KV, and reads only block 0.
* A prefill worker exports the prompt's KV after the step (transports that are not
  layer-wise, see ModelRunner.set_layer_hook); layer-wise exports run eagerly.
"""
from __future__ import annotations

import functools
import logging
import time

import torch
from torch import Tensor

from pdserve.engine.cuda_graph import capture_graph
from pdserve.kernels.metadata import AttentionMetadata

logger = logging.getLogger(__name__)


class PrefillGraphRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[Tensor, Tensor]],
                 block_size: int, bucket: int, max_tokens: int, max_context_len: int,
                 table_align: int = 16) -> None:
        device = kv_caches[0][0].device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the KV cache is on {device}")
        if bucket < 1 or max_tokens < bucket:
            raise ValueError(f"need 1 <= bucket <= max_tokens, got {bucket}, {max_tokens}")
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.buckets = list(range(bucket, max_tokens + 1, bucket))
        self.max_context_len = max_context_len
        blocks = -(-max_context_len // block_size)
        self.max_blocks = -(-blocks // table_align) * table_align
        n = self.buckets[-1]
        i64, i32 = torch.int64, torch.int32
        self.input_ids = torch.zeros(n, dtype=i64, device=device)
        self.positions = torch.zeros(n, dtype=i64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=i64, device=device)
        self.query_start_loc = torch.zeros(2, dtype=i32, device=device)
        self.seq_lens = torch.zeros(1, dtype=i32, device=device)
        self.block_tables = torch.zeros(1, self.max_blocks, dtype=i32, device=device)
        self.logits_index = torch.zeros(1, dtype=i64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, Tensor] = {}
        self.num_replays = 0

    def _forward(self, bucket: int) -> Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket], query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens, block_tables=self.block_tables, max_query_len=bucket,
            max_seq_len=self.max_context_len, query_lens_cpu=[bucket],
            seq_lens_cpu=[self.max_context_len])
        hidden = self.model(self.input_ids[:bucket], self.positions[:bucket], self.kv_caches, meta)
        return self.model.compute_logits(hidden.index_select(0, self.logits_index))

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        device = self.input_ids.device
        pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):
            # A query of the whole bucket over a context of the same length, on block 0,
            # writing nothing (every slot is -1).
            self.query_start_loc.copy_(torch.tensor([0, bucket], dtype=torch.int32))
            self.seq_lens.fill_(bucket)
            self.graphs[bucket], self.logits[bucket] = capture_graph(
                functools.partial(self._forward, bucket), device, pool)
        torch.cuda.synchronize(device)
        logger.info("captured %d prefill CUDA graphs (one prompt, %d..%d tokens) in %.1f s",
                    len(self.graphs), self.buckets[0], self.buckets[-1], time.perf_counter() - t0)

    def can_run(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        """One sequence, a chunk of more than one token, padded to a captured bucket,
        with a context the captured block table can hold."""
        return (bool(self.graphs) and meta.num_seqs == 1 and not meta.is_pure_decode
                and num_tokens in self.graphs
                and meta.max_seq_len <= self.max_blocks * self.block_size)

    def replay(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata,
               logits_indices: Tensor) -> Tensor:
        """input_ids, positions: [bucket] (padded by the runner); logits_indices: [1], or
        [0] for a chunk that does not end the prompt. Returns logits [rows, V] float32, a
        view the next replay overwrites."""
        bucket = input_ids.shape[0]
        width = min(meta.block_tables.shape[1], self.max_blocks)
        self.input_ids[:bucket].copy_(input_ids)
        self.positions[:bucket].copy_(positions)
        self.slot_mapping[:bucket].copy_(meta.slot_mapping)
        self.query_start_loc.copy_(meta.query_start_loc)
        self.seq_lens.copy_(meta.seq_lens)
        self.block_tables[:, :width].copy_(meta.block_tables[:, :width])
        rows = logits_indices.numel()     # 0: a chunk that does not end the prompt
        if rows:
            self.logits_index.copy_(logits_indices)
        self.graphs[bucket].replay()
        self.num_replays += 1
        return self.logits[bucket][:rows]
