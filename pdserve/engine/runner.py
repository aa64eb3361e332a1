"""ModelRunner: turns a SchedulerOutput into tensors, runs the model, samples.

It owns the model, the paged KV cache tensors and the sampler; it knows nothing of
queues or policies. One step:

    prepare (flatten the scheduled chunks, slot mapping, block tables)
    → forward (every layer writes its K/V by slot mapping, then paged attention)
    → logits for the sequences whose chunk reaches their end → sample
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from pdserve.engine.scheduler import SchedulerOutput
from pdserve.engine.sequence import Sequence
from pdserve.kernels.metadata import AttentionMetadata
from pdserve.sampling.sampler import SampleResult, Sampler, SamplingRow

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    input_ids: Tensor        # [T] int64
    positions: Tensor        # [T] int64
    meta: AttentionMetadata
    logits_indices: Tensor   # [S] int64: row of the last token of each sampling sequence
    sampling_seqs: list[Sequence]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[Tensor, Tensor]],
                 block_size: int, device: torch.device, sampler: Sampler,
                 block_table_fn: Callable[[str], list[int]]) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = sampler
        self.block_table_fn = block_table_fn
        # Prefill role: called as layer_hook(layer_idx, seqs) right after each layer has
        # written its K/V, for the sequences whose prompt completes this step, so their
        # KV streams out while later layers still compute (layer-wise pipelining).
        self.layer_hook: Callable[[int, list[Sequence]], None] | None = None
        self._exporting: list[Sequence] = []
        self._hooks_installed = False

    def set_layer_hook(self, hook: Callable[[int, list[Sequence]], None]) -> None:
        self.layer_hook = hook
        if not self._hooks_installed:
            for idx, layer in enumerate(self.model.model.layers):
                layer.register_forward_hook(self._make_hook(idx))
            self._hooks_installed = True

    def _make_hook(self, idx: int) -> Callable:
        def hook(_module, _inputs, _output) -> None:
            if self._exporting and self.layer_hook is not None:
                self.layer_hook(idx, self._exporting)
        return hook

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        logits_idx: list[int] = []
        sampling: list[Sequence] = []
        for s in out.scheduled:
            seq, n = s.seq, s.num_new_tokens
            start = seq.num_computed_tokens
            table = self.block_table_fn(seq.seq_id)
            ids.extend(seq.tokens[start:start + n])
            pos.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
            tables.append(table)
            if s.samples:
                logits_idx.append(qsl[-1] - 1)
                sampling.append(seq)
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        dev = self.device
        qlens = [qsl[i + 1] - qsl[i] for i in range(len(seq_lens))]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
            max_query_len=max(qlens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=qlens,
            seq_lens_cpu=seq_lens,
        )
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(pos, dtype=torch.int64, device=dev),
            meta=meta,
            logits_indices=torch.tensor(logits_idx, dtype=torch.int64, device=dev),
            sampling_seqs=sampling,
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[tuple[Sequence, SampleResult]]:
        inp = self.prepare(out)
        self._exporting = [s for s in inp.sampling_seqs if s.prefill_only]
        try:
            hidden = self.model(inp.input_ids, inp.positions, self.kv_caches, inp.meta)
        finally:
            self._exporting = []
        if not inp.sampling_seqs:
            return []
        logits = self.model.compute_logits(hidden[inp.logits_indices])
        rows = [SamplingRow(params=seq.params, prompt_token_ids=seq.prompt_token_ids,
                            output_token_ids=seq.output_token_ids, generator=seq.generator)
                for seq in inp.sampling_seqs]
        results = self.sampler(logits, rows)
        return list(zip(inp.sampling_seqs, results))
