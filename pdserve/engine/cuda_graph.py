"""CUDA graphs for pure-decode steps: static buffers, batch-size buckets, capture, replay.

A decode step of a small batch is a few hundred short kernels (per layer: norms, GEMMs,
rotary, KV write, attention); on a GPU the CPU cannot launch them as fast as they run.
A CUDA graph records the whole forward once and replays it with one launch.

How it works:

* Static inputs, sized for the largest bucket; each bucket's graph reads their first rows.

      input_ids       [max_bs] int64
      positions       [max_bs] int64
      slot_mapping    [max_bs] int64
      seq_lens        [max_bs] int32
      block_tables    [max_bs, max_blocks] int32   max_blocks = cdiv(max_context_len, block_size)
      query_start_loc [max_bs + 1] int32           0, 1, 2, ...: one token per row, constant

* Buckets: 1, 2, 4, ... below max_batch_size, then max_batch_size itself. A step of n
  sequences replays the smallest bucket >= n.
* Capture (once, at start-up), largest bucket first so the smaller graphs reuse its memory
  pool: an eager warm-up forward (Triton compiles its kernels, cuBLAS picks its
  algorithms), then capture of forward + final norm + LM head into a graph-owned logits
  buffer [bucket, vocab] float32. Every row is padding during both, so capture never
  touches the KV cache.
* Replay: copy the step's rows into the static inputs, mark the rest of the bucket as
  padding, replay, return logits[:n]. Padding rows get slot_mapping -1 (the Triton KV
  write skips negative slots) and seq_len 0 (the Triton decode kernel returns zeros for an
  empty context): they cost one bucket row of compute and touch no KV block. This was
  chosen over a reserved scratch block, which would take a block id out of the pool and
  make the pool know about graphs. Block-table columns past a row's own width keep stale
  ids; they are never read because the kernel stops at seq_len.
* Attention inside the graph is the Triton split-KV decode with a num_splits fixed per
  bucket at capture: the captured metadata says max_seq_len = max_context_len, from
  which the backend picks choose_num_splits(bucket, Hkv, max_context_len). The kernel
  sizes each split from the row's real seq_len, so a shorter context just leaves splits
  empty. The torch reference backend cannot be captured (its KV write syncs on padding).

Nothing here reads a device value on the host: only the sampled tokens (in the sampler)
cross back.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from pdserve.kernels.metadata import AttentionMetadata

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CudaGraphConfig:
    enabled: bool = True
    # Largest batch replayed from a graph (the engine passes max_num_seqs); bigger decode
    # batches run eagerly.
    max_batch_size: int = 128
    # Longest context a graph serves: fixes the captured block-table width and, through
    # it, each bucket's split-KV count. Longer sequences' steps run eagerly.
    max_context_len: int = 8192
    # One-prompt prefill steps of up to this many tokens replay a graph too
    # (pdserve/engine/prefill_graph.py); 0: none. Needs the Triton backend's token buckets.
    prefill_max_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_context_len < 1:
            raise ValueError(f"max_context_len must be >= 1, got {self.max_context_len}")


def batch_buckets(max_batch_size: int) -> list[int]:
    """Powers of two below max_batch_size, then max_batch_size: 100 -> 1, 2, 4, ..., 64, 100."""
    buckets = []
    b = 1
    while b < max_batch_size:
        buckets.append(b)
        b *= 2
    buckets.append(max_batch_size)
    return buckets


def capture_graph(fn: Callable[[], Tensor], device: torch.device,
                  pool: tuple) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """fn() once on a side stream, as torch.cuda.graph's docs ask, so that lazy
    initialisation (Triton compile, cuBLAS workspace) stays out of the capture; then
    captured into `pool`. Returns the graph and the output tensor it writes."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class CudaGraphRunner:
    """Owns the static buffers and one captured graph per bucket for one model and KV
    cache (the graphs hold their addresses: neither may be reallocated afterwards)."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[Tensor, Tensor]],
                 block_size: int, config: CudaGraphConfig) -> None:
        device = kv_caches[0][0].device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the KV cache is on {device}")
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.config = config
        self.buckets = batch_buckets(config.max_batch_size)
        self.max_blocks = -(-config.max_context_len // block_size)
        n = self.buckets[-1]
        i64, i32 = torch.int64, torch.int32
        self.input_ids = torch.zeros(n, dtype=i64, device=device)                 # [max_bs]
        self.positions = torch.zeros(n, dtype=i64, device=device)                 # [max_bs]
        self.slot_mapping = torch.full((n,), -1, dtype=i64, device=device)        # -1 = padding
        self.seq_lens = torch.zeros(n, dtype=i32, device=device)                  # 0 = padding
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=i32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=i32, device=device)      # [max_bs + 1]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, Tensor] = {}                           # bucket -> [bucket, V] fp32
        self.num_replays = 0

    # -- capture ------------------------------------------------------------------------
    def _static_meta(self, bucket: int) -> AttentionMetadata:
        ctx = self.config.max_context_len
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket],
            query_start_loc=self.query_start_loc[:bucket + 1],
            seq_lens=self.seq_lens[:bucket],
            block_tables=self.block_tables[:bucket],
            max_query_len=1,
            # An upper bound, not this step's max: it fixes the split count at capture.
            max_seq_len=ctx,
            query_lens_cpu=[1] * bucket,
            seq_lens_cpu=[ctx] * bucket,  # only its length (num_seqs) is read by the kernels
        )

    def _forward(self, bucket: int) -> Tensor:
        meta = self._static_meta(bucket)
        hidden = self.model(self.input_ids[:bucket], self.positions[:bucket], self.kv_caches,
                            meta)                                     # [bucket, hidden]
        return self.model.compute_logits(hidden)                      # [bucket, V] fp32

    @torch.inference_mode()
    def capture(self) -> None:
        from pdserve.kernels.triton_attention import choose_num_splits
        t0 = time.perf_counter()
        self._set_padding(0, self.buckets[-1])
        hkv = self.kv_caches[0][0].shape[2]
        device = self.input_ids.device
        pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):
            self.graphs[bucket], self.logits[bucket] = capture_graph(
                functools.partial(self._forward, bucket), device, pool)
            logger.debug("captured decode graph: batch %d, %d KV splits", bucket,
                         choose_num_splits(bucket, hkv, self.config.max_context_len, device))
        torch.cuda.synchronize(device)
        logger.info("captured %d decode CUDA graphs (batch %s, context <= %d) in %.1f s",
                    len(self.graphs), self.buckets, self.config.max_context_len,
                    time.perf_counter() - t0)

    # -- replay -------------------------------------------------------------------------
    def can_run(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        """A pure-decode step (one token per sequence) that fits the largest bucket and
        whose contexts fit the captured block-table width."""
        return (bool(self.graphs) and meta.is_pure_decode and num_tokens == meta.num_seqs
                and 0 < meta.num_seqs <= self.buckets[-1]
                and meta.max_seq_len <= self.max_blocks * self.block_size)

    def bucket_for(self, num_seqs: int) -> int:
        return next(b for b in self.buckets if b >= num_seqs)

    def _set_padding(self, start: int, end: int) -> None:
        self.slot_mapping[start:end].fill_(-1)
        self.seq_lens[start:end].fill_(0)

    def replay(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata) -> Tensor:
        """input_ids, positions: [n] on the device; meta: a pure-decode step of n rows
        (can_run). Returns logits [n, V] float32, a view of the graph's buffer that the
        next replay overwrites."""
        n = meta.num_seqs
        bucket = self.bucket_for(n)
        # Columns past cdiv(max_seq_len, block_size) are never read: can_run bounds the
        # context, so a wider table (padded by the caller) is cut to the captured width.
        width = min(meta.block_tables.shape[1], self.max_blocks)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.block_tables[:n, :width].copy_(meta.block_tables[:, :width])
        if n < bucket:
            self._set_padding(n, bucket)
        self.graphs[bucket].replay()
        self.num_replays += 1
        return self.logits[bucket][:n]
