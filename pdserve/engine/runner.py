"""ModelRunner: turns a SchedulerOutput into tensors, runs the model, samples.

It owns the model, the paged KV cache tensors and the sampler; it knows nothing of
queues or policies. One step:

    prepare (flatten the scheduled chunks, slot mapping, block tables)
    → forward (every layer writes its K/V by slot mapping, then paged attention)
    → logits for the sequences whose chunk reaches their end → sample

On CUDA, a pure-decode step that fits the captured buckets replays a CUDA graph instead
of the eager forward (pdserve/engine/cuda_graph.py); prepare and sampling are the same.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from pdserve.engine.cuda_graph import CudaGraphConfig, CudaGraphRunner
from pdserve.engine.prefill_graph import PrefillGraphRunner
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.engine.sequence import Sequence
from pdserve.kernels.metadata import AttentionMetadata
from pdserve.sampling.sampler import PendingSample, SampleResult, Sampler, SamplingRow

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    input_ids: Tensor        # [T] int64
    positions: Tensor        # [T] int64
    meta: AttentionMetadata
    logits_indices: Tensor   # [S] int64: row of the last token of each sampling sequence
    sampling_seqs: list[Sequence]


# Eager steps that carry a prefill chunk run with their token count rounded up to a
# multiple of this (CUDA, Triton backend). cuBLAS chooses and prepares a kernel for every
# new GEMM shape the first time it sees it: 0.2 ms to several ms per shape, four shapes
# a layer, paid by the first prompt of each new length (measured inside the serving
# actors: 2-4 such GEMMs at 4-7 ms each, most of a short prompt's prefill). With the
# count bucketed, the runner warms every bucket up once at start (warm_up_gemms).
# Padding rows compute nothing that is read: slot -1 (the KV write skips them), no
# sequence's query range covers them, and every other op is row-wise.
TOKEN_BUCKET = 64

# With the token bucket on, block tables are as wide as a multiple of this: Triton
# specializes a kernel on whether each integer argument is divisible by 16, and the
# table's row stride is one, so a new width could mean a JIT compile (~1 s) mid-serving.
BLOCK_TABLE_ALIGN = 16

# In a sequence's token list, the slot of a token sampled by a step still in flight
# (LLMEngine's look-ahead): the next step reads its value on the device, and the engine
# writes the real id once the step that samples it has been resolved.
PLACEHOLDER_TOKEN = -1


@dataclass
class InFlight:
    """A launched step: its forward pass and sampling are queued on the device."""
    inputs: StepInputs
    pending: PendingSample | None              # None: no row samples this step
    rows: dict[str, int] = dataclasses.field(default_factory=dict)  # seq_id -> sampled row


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[Tensor, Tensor]],
                 block_size: int, device: torch.device, sampler: Sampler,
                 block_table_fn: Callable[[str], list[int]],
                 cuda_graph: CudaGraphConfig | None = None,
                 max_num_batched_tokens: int = 0, max_num_seqs: int = 0) -> None:
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
        self._hook_every_layer = True
        self._last_layer = len(self.model.model.layers) - 1
        self._exporting: list[Sequence] = []
        self._hooks_installed = False
        ops_name = getattr(self.model.model.layers[0].self_attn.ops, "name", None)
        self.token_bucket = TOKEN_BUCKET if device.type == "cuda" and ops_name == "triton" else 0
        if self.token_bucket and max_num_batched_tokens > 0:
            self.warm_up_gemms(max_num_batched_tokens, max_num_seqs)
            self.warm_up_prefill()
        config = cuda_graph or CudaGraphConfig()
        self.graphs = self._make_graphs(config)
        self.prefill_graphs: PrefillGraphRunner | None = None
        if self.token_bucket and config.prefill_max_tokens >= self.token_bucket:
            max_tokens = config.prefill_max_tokens // self.token_bucket * self.token_bucket
            self.prefill_graphs = PrefillGraphRunner(
                self.model, self.kv_caches, self.block_size, self.token_bucket, max_tokens,
                min(config.max_context_len, self.kv_caches[0][0].shape[0] * self.block_size),
                BLOCK_TABLE_ALIGN)
            self.prefill_graphs.capture()

    @torch.inference_mode()
    def warm_up_gemms(self, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        """Run each distinct GEMM of the model once at every token bucket up to
        max_num_batched_tokens, and the LM head at every row count up to max_num_seqs,
        so that no request pays cuBLAS's first call for a new shape (see TOKEN_BUCKET)."""
        gemms = self.model.layer_gemms()
        head = self.model.compute_logits
        top = -(-max_num_batched_tokens // self.token_bucket) * self.token_bucket
        widths = {w.shape[1] for w, _ in gemms}
        x = {k: torch.randn(top, k, dtype=gemms[0][0].dtype, device=self.device) for k in widths}
        for m in range(self.token_bucket, top + 1, self.token_bucket):
            for w, b in gemms:
                F.linear(x[w.shape[1]][:m], w, b)
        hidden = self.model.config.hidden_size
        h = torch.randn(max(1, max_num_seqs), hidden, dtype=gemms[0][0].dtype, device=self.device)
        for m in range(1, max(1, max_num_seqs) + 1):
            head(h[:m])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def warm_up_prefill(self) -> None:
        """One eager forward of a dummy one-bucket prompt, so that the Triton kernels of
        a prefill step are compiled (or loaded from Triton's cache) now, not on the first
        request. It writes no KV (every slot is -1) and reads only block 0."""
        t, dev = self.token_bucket, self.device
        blocks = -(-t // self.block_size)
        width = -(-blocks // BLOCK_TABLE_ALIGN) * BLOCK_TABLE_ALIGN
        meta = AttentionMetadata(
            slot_mapping=torch.full((t,), -1, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor([0, t], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([t], dtype=torch.int32, device=dev),
            block_tables=torch.zeros((1, width), dtype=torch.int32, device=dev),
            max_query_len=t, max_seq_len=t, query_lens_cpu=[t], seq_lens_cpu=[t])
        ids = torch.zeros(t, dtype=torch.int64, device=dev)
        pos = torch.arange(t, dtype=torch.int64, device=dev)
        hidden = self.model(ids, pos, self.kv_caches, meta)
        self.model.compute_logits(hidden[-1:])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def _make_graphs(self, config: CudaGraphConfig) -> CudaGraphRunner | None:
        """Decode CUDA graphs, captured now, when the device is CUDA and the model's
        attention ops are the Triton kernels (the torch reference cannot be captured)."""
        if not config.enabled or self.device.type != "cuda":
            return None
        ops_name = getattr(self.model.model.layers[0].self_attn.ops, "name", None)
        if ops_name != "triton":
            logger.info("CUDA graphs off: attention backend %r is not 'triton'", ops_name)
            return None
        # A graph cannot serve contexts the cache cannot hold anyway.
        num_blocks = self.kv_caches[0][0].shape[0]
        ctx = min(config.max_context_len, num_blocks * self.block_size)
        graphs = CudaGraphRunner(self.model, self.kv_caches, self.block_size,
                                 dataclasses.replace(config, max_context_len=ctx))
        graphs.capture()
        return graphs

    def set_layer_hook(self, hook: Callable[[int, list[Sequence]], None],
                       every_layer: bool = True) -> None:
        """every_layer: hook(layer, seqs) right after each layer (the forward runs eagerly
        then); False: one hook(last_layer, seqs) after the whole forward pass, which may
        then replay a prefill graph."""
        self.layer_hook = hook
        self._hook_every_layer = every_layer
        if every_layer and not self._hooks_installed:
            for idx, layer in enumerate(self.model.model.layers):
                layer.register_forward_hook(self._make_hook(idx))
            self._hooks_installed = True

    def _make_hook(self, idx: int) -> Callable:
        def hook(_module, _inputs, _output) -> None:
            if self._exporting and self.layer_hook is not None:
                self.layer_hook(idx, self._exporting)
        return hook

    def prepare(self, out: SchedulerOutput, source: InFlight | None = None) -> StepInputs:
        """Step inputs on the device. `source`: a step still in flight whose sampled tokens
        some sequences here take as input (PLACEHOLDER_TOKEN in their token lists); those
        ids are copied from its device tensor, so the host never waits for them."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        logits_idx: list[int] = []
        sampling: list[Sequence] = []
        from_dst: list[int] = []   # rows of ids whose token comes from `source`
        from_src: list[int] = []   # ... and their rows in source's sampled tokens
        for s in out.scheduled:
            seq, n = s.seq, s.num_new_tokens
            start = seq.num_computed_tokens
            table = self.block_table_fn(seq.seq_id)
            if n == 1:   # a decode row: the common case, kept short
                token = seq.tokens[start]
                if token == PLACEHOLDER_TOKEN:
                    if source is None or seq.seq_id not in source.rows:
                        raise RuntimeError(f"{seq.seq_id}: input token not sampled yet")
                    from_dst.append(len(ids))
                    from_src.append(source.rows[seq.seq_id])
                    token = 0
                ids.append(token)
                pos.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                ids.extend(seq.tokens[start:start + n])
                pos.extend(range(start, start + n))
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
            tables.append(table)
            if s.samples:
                logits_idx.append(qsl[-1] - 1)
                sampling.append(seq)
        nseq = len(seq_lens)
        if self.token_bucket and len(ids) > nseq:   # a prefill chunk: bucket the count
            pad = -len(ids) % self.token_bucket
            ids += [0] * pad
            pos += [0] * pad
            slots += [-1] * pad
        # All step inputs travel in two host buffers (int64: ids, positions, slots, logits
        # rows; int32: query starts, lengths, block tables) filled through numpy and copied
        # to the device once each: torch.tensor on Python lists cost ~2 ms a step at 128
        # sequences (the block tables alone are 128 x up to hundreds of ids), 0.4 ms this way.
        # Every part starts on a 16-byte boundary: Triton specializes kernels on whether
        # each pointer is 16-byte aligned, and parts at arbitrary offsets would make new
        # kernel variants (a JIT compile stall mid-serving) as batch sizes change.
        width = max(len(t) for t in tables)
        if self.token_bucket:
            width = -(-width // BLOCK_TABLE_ALIGN) * BLOCK_TABLE_ALIGN
        parts64 = (ids, pos, slots, logits_idx, from_dst, from_src)
        at64 = _aligned_offsets([len(x) for x in parts64], 2)
        host64_t = self._host_buffer(at64[-1], torch.int64)
        host64 = host64_t.numpy()
        for part, o in zip(parts64, at64):
            host64[o:o + len(part)] = part
        at32 = _aligned_offsets([nseq + 1, nseq, nseq * width], 4)
        host32_t = self._host_buffer(at32[-1], torch.int32)
        host32 = host32_t.numpy()
        host32[at32[0]:at32[0] + nseq + 1] = qsl
        host32[at32[1]:at32[1] + nseq] = seq_lens
        # One list -> array conversion for the whole table, not one per row.
        flat: list[int] = []
        pad = [0] * width
        for t in tables:
            flat += t
            flat += pad[:width - len(t)]
        host32[at32[2]:at32[2] + nseq * width] = flat
        dev = self.device
        # Pinned buffers on CUDA: the copies then never wait for the device (a copy from
        # pageable memory synchronizes, and the look-ahead prepares a step while the
        # previous one still runs).
        pinned = host64_t.is_pinned()
        dev64 = host64_t.to(dev, non_blocking=pinned)
        dev32 = host32_t.to(dev, non_blocking=pinned)
        ids_t, pos_t, slots_t, logits_t, dst_t, src_t = (
            dev64[o:o + len(x)] for x, o in zip(parts64, at64))
        if from_dst:
            assert source is not None and source.pending is not None
            ids_t[dst_t] = source.pending.tokens[src_t]
        qlens = [qsl[i + 1] - qsl[i] for i in range(nseq)]
        meta = AttentionMetadata(
            slot_mapping=slots_t,
            query_start_loc=dev32[at32[0]:at32[0] + nseq + 1],
            seq_lens=dev32[at32[1]:at32[1] + nseq],
            block_tables=dev32[at32[2]:at32[2] + nseq * width].view(nseq, width),
            max_query_len=max(qlens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=qlens,
            seq_lens_cpu=seq_lens,
        )
        return StepInputs(
            input_ids=ids_t,
            positions=pos_t,
            meta=meta,
            logits_indices=logits_t,
            sampling_seqs=sampling,
        )

    def _host_buffer(self, n: int, dtype: torch.dtype) -> Tensor:
        """A zeroed host buffer for step inputs (pinned when the device is CUDA; torch's
        caching host allocator reuses a block only after its copy has completed)."""
        return torch.zeros(n, dtype=dtype, pin_memory=self.device.type == "cuda")

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[tuple[Sequence, SampleResult]]:
        """Run one step and sample: launch() then resolve()."""
        return self.resolve(self.launch(out))

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, source: InFlight | None = None) -> InFlight:
        """Queue one step's forward pass and sampling on the device; returns at once on
        CUDA (the host waits only in resolve())."""
        inp = self.prepare(out, source)
        logits = self._logits(inp)
        if not inp.sampling_seqs:
            return InFlight(inp, None)
        rows = [SamplingRow(params=seq.params, prompt_token_ids=seq.prompt_token_ids,
                            output_token_ids=seq.output_token_ids, generator=seq.generator)
                for seq in inp.sampling_seqs]
        return InFlight(inp, self.sampler.launch(logits, rows),
                        {seq.seq_id: i for i, seq in enumerate(inp.sampling_seqs)})

    def resolve(self, flight: InFlight) -> list[tuple[Sequence, SampleResult]]:
        """Wait for a launched step's sampled tokens (one host sync)."""
        if flight.pending is None:
            return []
        return list(zip(flight.inputs.sampling_seqs, flight.pending.results()))

    def _logits(self, inp: StepInputs) -> Tensor:
        """Runs the step (writing its KV); logits [S, V] float32 of the sampling rows."""
        exporting = [s for s in inp.sampling_seqs if s.prefill_only]
        # Graph replay runs no Python per layer, so steps that stream KV out layer by
        # layer (prefill role, layer-wise transports) stay eager.
        per_layer = bool(exporting) and self._hook_every_layer
        after = exporting if exporting and not per_layer and self.layer_hook is not None else []
        n = inp.input_ids.shape[0]
        if self.graphs is not None and not exporting and self.graphs.can_run(inp.meta, n):
            return self.graphs.replay(inp.input_ids, inp.positions, inp.meta)[inp.logits_indices]
        if (self.prefill_graphs is not None and not per_layer
                and self.prefill_graphs.can_run(inp.meta, n)):
            logits = self.prefill_graphs.replay(inp.input_ids, inp.positions, inp.meta,
                                                inp.logits_indices)
        else:
            self._exporting = exporting if per_layer else []
            try:
                hidden = self.model(inp.input_ids, inp.positions, self.kv_caches, inp.meta)
            finally:
                self._exporting = []
            logits = self.model.compute_logits(hidden[inp.logits_indices])
        if after:   # the whole prompt's KV, queued after the forward pass on this stream
            self.layer_hook(self._last_layer, after)
        return logits


def _aligned_offsets(sizes: list[int], unit: int) -> list[int]:
    """Start offsets of parts of the given sizes laid out one after another, each start
    rounded up to a multiple of `unit` elements; the last entry is the total length."""
    offsets, o = [], 0
    for n in sizes:
        offsets.append(o)
        o += -(-n // unit) * unit
    offsets.append(o)
    return offsets
