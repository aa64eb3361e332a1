"""LLMEngine: the single-process, role-agnostic engine. ``step()`` reads as pseudocode:
schedule → execute → update."""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pdserve.cache.block_pool import BlockPool
from pdserve.cache.kv_cache_manager import KVCacheManager
from pdserve.config import EngineConfig, ModelConfig, resolve_dtype
from pdserve import env
from pdserve.engine.cuda_graph import CudaGraphConfig
from pdserve.engine.runner import PLACEHOLDER_TOKEN, InFlight, ModelRunner
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.engine.sequence import (FINISH_ABORT, FINISH_LENGTH, Sequence, SeqStatus)
from pdserve.kernels import get_attention_ops
from pdserve.model.llama import allocate_kv_caches, ensure_cpu_gemm_plan
from pdserve.model.loader import load_model
from pdserve.sampling.params import SamplingParams
from pdserve.sampling.sampler import SampleResult, Sampler
from pdserve.sampling.stop import TextStream
from pdserve.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Longest context a captured decode graph serves (its block-table width); longer
# sequences' steps run eagerly.
CUDA_GRAPH_MAX_CONTEXT = 16384

# Detokenizing while the next step runs pays where the device computes asynchronously
# and the batch is large enough for text work to show (~5-10 us a sequence).
OVERLAP_DETOKENIZE_MIN_SEQS = 8


@dataclass
class _Step:
    """A launched step, as the engine tracks it until update()."""
    sched: SchedulerOutput
    flight: InFlight
    progressed: bool = False      # scheduler.update_after_step already applied (look-ahead)
    placeholders: set[str] = field(default_factory=set)  # seq ids given PLACEHOLDER_TOKEN


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one step produced for one request: a delta, and the terminal state once."""
    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    error: str | None = None


def resolve_kv_layout(layout: str, backend: str) -> str:
    """CacheConfig.kv_layout -> "token" or "head". Head-major blocks are for the Triton
    kernels only: the C kernels index token-major blocks, and the torch reference (the
    oracle) reads head-major ones through a copy of the whole cache per call."""
    if layout == "auto":
        return "head" if backend == "triton" else "token"
    if layout == "head" and backend != "triton":
        raise ValueError(f"kv_layout 'head' needs the triton attention backend, not {backend!r}")
    return layout


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.torch_device()
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.model_config = ModelConfig.from_dir(config.model)
        self.tokenizer = Tokenizer(config.model)
        self.ops = get_attention_ops(device=self.device)
        torch.manual_seed(config.seed)
        self.model = load_model(config.model, self.dtype, self.device, self.ops)
        if self.device.type == "cpu":
            ensure_cpu_gemm_plan(self.model, env.cpu_gemm())

        mc, cc = self.model_config, config.cache
        elem = torch.empty((), dtype=self.dtype).element_size()
        bytes_per_block = (mc.num_hidden_layers * 2 * cc.block_size
                           * mc.num_key_value_heads * mc.head_dim * elem)
        self.num_blocks = cc.blocks_for_budget(bytes_per_block)
        self.block_size = cc.block_size
        self.kv_layout = resolve_kv_layout(cc.kv_layout, self.ops.name)
        self.kv_caches = allocate_kv_caches(mc, self.num_blocks, cc.block_size,
                                            self.dtype, self.device, self.kv_layout)
        self.pool = BlockPool(self.num_blocks, enable_caching=cc.enable_prefix_caching)
        self.kv = KVCacheManager(self.pool, cc.block_size, cc.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.eos_token_ids = tuple(self.tokenizer.eos_token_ids) or mc.eos_token_ids
        self.sampler = Sampler(self.eos_token_ids, seed=config.seed)
        capacity = self.num_blocks * cc.block_size
        self.max_model_len = min(config.scheduler.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings, capacity)
        # CUDA graphs serve decode steps; a prefill-role engine never runs one.
        graphs = CudaGraphConfig(
            enabled=config.role != "prefill" and not env.enforce_eager(),
            max_batch_size=config.scheduler.max_num_seqs,
            max_context_len=min(self.max_model_len, CUDA_GRAPH_MAX_CONTEXT),
            prefill_max_tokens=0 if env.enforce_eager() else min(
                env.prefill_graph_max_tokens(), config.scheduler.max_num_batched_tokens))
        self.runner = ModelRunner(self.model, self.kv_caches, cc.block_size, self.device,
                                  self.sampler, self.kv.block_table_view, cuda_graph=graphs,
                                  max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
                                  max_num_seqs=config.scheduler.max_num_seqs)
        self.seqs: dict[str, Sequence] = {}
        self.streams: dict[str, TextStream] = {}
        # Overlapped detokenization (see step()): tokens whose text is computed during
        # the next step's forward pass, and the outputs made from them not yet returned.
        self.overlap_detokenize = (self.device.type == "cuda" if config.overlap_detokenize is None
                                   else config.overlap_detokenize)
        self._untexted: list[tuple[Sequence, TextStream, int, list[TokenLogprob] | None]] = []
        self._texted: list[RequestOutput] = []
        # Set by AsyncEngine: where outputs made mid-step go at once, not at step's end.
        self.early_sink: Callable[[list[RequestOutput]], None] | None = None
        # Look-ahead (see step()): the launched step whose tokens the next step() reads.
        self.look_ahead = config.look_ahead and config.role != "prefill"
        self._inflight: _Step | None = None
        # Set while a profiler trace runs (AsyncEngine.start_profile): step() then marks
        # its phases as named ranges.
        self.profiling = False
        logger.info("engine ready: %s on %s (%s), %d KV blocks of %d tokens, max_model_len %d",
                    mc.architecture, self.device, self.dtype, self.num_blocks, cc.block_size,
                    self.max_model_len)

    # -- requests -----------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        n = len(prompt_token_ids)
        if n >= self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens; this model accepts at most "
                             f"{self.max_model_len - 1} prompt tokens")
        vocab = self.model_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab})")

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, prefill_only: bool = False,
                    output_token_ids: list[int] | tuple[int, ...] = ()) -> Sequence:
        """output_token_ids: tokens of this completion already generated (and delivered)
        elsewhere; the request resumes after them: they are prefilled with the prompt,
        count as output (max_tokens, penalties) and their text is not produced again."""
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already active")
        self.validate([*prompt_token_ids, *output_token_ids], params)
        seq = Sequence(request_id, list(prompt_token_ids), params, prefill_only=prefill_only,
                       tokens=[*prompt_token_ids, *output_token_ids])
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self.seqs[request_id] = seq
        self.streams[request_id] = self.text_stream(seq.prompt_token_ids, params,
                                                    output_token_ids)
        self.scheduler.add(seq)
        return seq

    def text_stream(self, prompt_token_ids: list[int] | tuple[int, ...], params: SamplingParams,
                    output_token_ids: list[int] | tuple[int, ...] = ()) -> TextStream:
        """The detokenizer and stop rules of a request, past output tokens already
        delivered (their text was sent with them: it is dropped here)."""
        stream = TextStream(self.tokenizer, params, prompt_token_ids, self.eos_token_ids)
        for t in output_token_ids:
            if stream.step(t).finish_reason is not None:
                raise ValueError("the resumed output already ended the request")
        return stream

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request now and free its blocks. Unknown or finished ids are a no-op."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        self._finish(seq, FINISH_ABORT)
        return self._output(seq, [], "", None)

    def has_unfinished(self) -> bool:
        return (self.scheduler.has_work() or self._inflight is not None
                or bool(self._untexted or self._texted))

    def pending_request_ids(self) -> list[str]:
        """Requests whose last output is still to come: active ones, and finished ones
        whose final text is computed in the next step."""
        return list(dict.fromkeys([*self.seqs, *(s.seq_id for s, *_ in self._untexted),
                                   *(o.request_id for o in self._texted)]))

    # -- the loop -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step: schedule → launch → resolve → update.

        With look_ahead (EngineConfig.look_ahead), a step's successor is scheduled and launched
        before the host waits for the step's tokens: sequences that sampled get a
        PLACEHOLDER_TOKEN, the successor reads those ids on the device, and the host
        then reads the tokens and runs update() while the device computes the
        successor. A sequence that turns out to have ended (eos, a stop string) costs
        one wasted row; one certain to end (max_tokens, the context length) is left out
        of the successor. A successor that samples with penalties (they read the
        output ids on the host) is launched right after update() instead.

        With overlap_detokenize, the text of the previous step's tokens (sequences
        without stop strings, past their first token, in batches of
        OVERLAP_DETOKENIZE_MIN_SEQS or more) is computed while the device runs; whether
        such a sequence ends never depends on its text. Those outputs go to early_sink
        as soon as they are made, or lead this step's return."""
        cur, self._inflight = self._inflight, None
        if cur is None:
            with self._range("pdserve.schedule"):
                sched_out = self.scheduler.schedule()
            if sched_out.is_empty:
                self._detokenize_untexted()
                return self._take_texted()
            with self._range("pdserve.launch"):
                cur = _Step(sched_out, self.runner.launch(sched_out))
        later: SchedulerOutput | None = None
        if self.look_ahead:
            later = self._look_ahead(cur)
        self._detokenize_untexted()
        with self._range("pdserve.resolve"):
            sampled = self.runner.resolve(cur.flight)
        with self._range("pdserve.update"):
            outputs = self._take_texted() + self.update(cur.sched, sampled, cur)
        if later is not None:
            # cur's tokens may have ended some of its sequences (eos, a stop string)
            later.scheduled = [s for s in later.scheduled if s.seq.status != SeqStatus.FINISHED]
            if later.scheduled:
                self._inflight = _Step(later, self.runner.launch(later))
        return outputs

    def _range(self, name: str) -> contextlib.AbstractContextManager:
        """A named range in profiler traces; nothing at all while no profile runs."""
        return torch.profiler.record_function(name) if self.profiling else contextlib.nullcontext()

    def _look_ahead(self, cur: "_Step") -> SchedulerOutput | None:
        """Schedule cur's successor now; launch it unless it needs cur's tokens on the
        host (then it is returned, to launch after update)."""
        self.scheduler.update_after_step(cur.sched)
        cur.progressed = True
        for seq in cur.flight.inputs.sampling_seqs:
            if seq.status == SeqStatus.FINISHED:
                continue  # aborted while cur was in flight
            stream = self.streams.get(seq.seq_id)
            if ((stream is not None and stream.num_output_tokens + 1 >= seq.params.max_tokens)
                    or seq.num_tokens + 1 >= self.max_model_len):
                self.scheduler.detach(seq)  # ends with cur's token, whatever it is
                continue
            seq.tokens.append(PLACEHOLDER_TOKEN)
            cur.placeholders.add(seq.seq_id)
        nxt = self.scheduler.schedule()
        if nxt.is_empty:
            return None
        if any(s.samples and s.seq.params.needs_penalties for s in nxt.scheduled):
            return nxt
        self._inflight = _Step(nxt, self.runner.launch(nxt, source=cur.flight))
        return None

    def _take_texted(self) -> list[RequestOutput]:
        texted, self._texted = self._texted, []
        return texted

    def _detokenize_untexted(self) -> None:
        untexted, self._untexted = self._untexted, []
        outs = []
        for seq, stream, token_id, lps in untexted:
            if seq.finish_reason == FINISH_ABORT:
                continue  # aborted meanwhile: the abort output was its last
            text = stream.detokenize()
            delta, finish = text.delta, text.finish_reason
            if finish is None and seq.status == SeqStatus.FINISHED:  # model length
                delta += stream.finish_now("length").delta
            outs.append(self._output(seq, [token_id], delta, lps))
        if not outs:
            return
        if self.early_sink is not None:
            self.early_sink(outs)
        else:
            self._texted.extend(outs)

    def update(self, sched_out: SchedulerOutput, sampled: list[tuple[Sequence, SampleResult]],
               step: "_Step | None" = None) -> list[RequestOutput]:
        if step is None or not step.progressed:
            self.scheduler.update_after_step(sched_out)
        now = time.monotonic()
        outputs = []
        overlap = self.overlap_detokenize and len(sampled) >= OVERLAP_DETOKENIZE_MIN_SEQS
        for seq, res in sampled:
            if seq.status == SeqStatus.FINISHED:
                continue  # ended while this step was in flight (abort, or eos one step earlier)
            if step is not None and seq.seq_id in step.placeholders:
                assert seq.tokens[-1] == PLACEHOLDER_TOKEN, seq.seq_id
                seq.tokens[-1] = res.token_id
            else:
                seq.tokens.append(res.token_id)
            if seq.first_token_time is None:
                seq.first_token_time = now
            lps = None
            if res.logprob is not None:
                lps = [TokenLogprob(res.token_id, res.logprob, list(res.top_logprobs or []))]
            if seq.prefill_only:
                # Prefill role: the first token is all this engine produces. Its KV was
                # copied out layer by layer during the forward pass, so the blocks can go
                # back to the pool (they stay in the prefix cache). Stop rules and text
                # are the decode worker's business.
                self._finish(seq, FINISH_LENGTH)
                outputs.append(self._output(seq, [res.token_id], "", lps))
                continue
            stream = self.streams[seq.seq_id]
            text = stream.accept(res.token_id)
            if text is None and overlap and seq.num_output_tokens > 1 and not stream.needs_text_to_stop:
                self._untexted.append((seq, stream, res.token_id, lps))
                if stream.reaches_length or seq.num_tokens >= self.max_model_len:
                    self._finish(seq, FINISH_LENGTH)  # blocks back now, the text next step
                continue
            if text is None:
                text = stream.detokenize()
            delta, finish = text.delta, text.finish_reason
            if finish is None and seq.num_tokens >= self.max_model_len:
                tail = stream.finish_now("length")
                delta, finish = delta + tail.delta, tail.finish_reason
            if finish is not None:
                seq.stop_reason = stream.stop_reason
                self._finish(seq, finish)
            outputs.append(self._output(seq, [res.token_id], delta, lps))
        return outputs

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.status == SeqStatus.FINISHED:
            return
        self.scheduler.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self.seqs.pop(seq.seq_id, None)
        self.streams.pop(seq.seq_id, None)

    # -- decode role: KV computed elsewhere ------------------------------------------------
    def reserve(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                output_token_ids: list[int] | tuple[int, ...] = ()) -> list[int] | None:
        """Hold blocks for a prompt whose KV another worker will write. Returns the block
        ids (in block-table order), or None when the pool cannot hold it now.
        output_token_ids: as in add_request; their KV comes with the prompt's."""
        if self.look_ahead:
            # A step in flight may still write blocks that look-ahead has freed, and
            # another process's KV writes are not ordered after it on this device.
            raise RuntimeError("an engine with look_ahead cannot take KV from other workers")
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already active")
        tokens = [*prompt_token_ids, *output_token_ids]
        self.validate(tokens, params)
        stream = self.text_stream(prompt_token_ids, params, output_token_ids)
        seq = Sequence(request_id, list(prompt_token_ids), params, status=SeqStatus.RESERVED,
                       tokens=tokens)
        if not self.kv.allocate(request_id, len(tokens)):
            return None
        if params.seed is not None:
            # The first token was sampled by the prefill worker with the same seed; the
            # generator here continues the request's own random stream for the rest.
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self.seqs[request_id] = seq
        self.streams[request_id] = stream
        return self.kv.block_table(request_id)

    def activate(self, request_id: str, first_token_id: int,
                 first_logprob: TokenLogprob | None = None) -> RequestOutput:
        """The reserved blocks now hold the prompt's KV: join the running batch with the
        first token already sampled (it is fed to the model in the next step)."""
        seq = self.seqs.get(request_id)
        if seq is None or seq.status != SeqStatus.RESERVED:
            raise ValueError(f"request {request_id!r} holds no reservation")
        seq.num_computed_tokens = seq.num_tokens     # the prompt and any resumed output
        self.kv.cache_blocks(request_id, seq.tokens, seq.num_computed_tokens)
        seq.tokens.append(first_token_id)
        seq.first_token_time = time.monotonic()
        stream = self.streams[request_id]
        text = stream.step(first_token_id)
        delta, finish = text.delta, text.finish_reason
        if finish is None and seq.num_tokens >= self.max_model_len:
            tail = stream.finish_now("length")
            delta, finish = delta + tail.delta, tail.finish_reason
        lps = [first_logprob] if first_logprob is not None else None
        if finish is not None:
            seq.stop_reason = stream.stop_reason
            self._finish(seq, finish)
        else:
            self.scheduler.add_running(seq)
        return self._output(seq, [first_token_id], delta, lps)

    def _output(self, seq: Sequence, new_ids: list[int], text: str,
                lps: list[TokenLogprob] | None) -> RequestOutput:
        return RequestOutput(
            request_id=seq.seq_id, new_token_ids=new_ids, new_text=text, new_logprobs=lps,
            finished=seq.status == SeqStatus.FINISHED, finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason, num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens, num_cached_tokens=seq.num_cached_tokens)

    # -- introspection ------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        ps = self.pool.stats()
        return {"num_running": self.scheduler.num_running,
                "num_waiting": self.scheduler.num_waiting,
                "kv_blocks_total": ps.total, "kv_blocks_free": ps.free,
                "kv_blocks_cached": ps.cached, "kv_blocks_in_use": ps.in_use,
                "kv_cache_usage": self.kv.usage}
