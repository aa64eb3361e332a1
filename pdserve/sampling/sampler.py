"""Sampler: turns one step's logits into one token per sequence (plus optional logprobs).

How this works, per step, for a batch of n rows:

1. Logprobs (rows that asked) come from the *raw* model distribution: log_softmax of the
   logits as the model produced them, before any penalty, mask or temperature (vLLM's
   default "raw_logprobs" behaviour).
2. Penalties (rows with any non-default penalty), vectorised over those rows:
   repetition (HF/CTRL: over prompt + output, positive logits divided, negative
   multiplied), then frequency / presence (OpenAI: over output tokens only).
3. min_tokens: eos ids and the row's stop_token_ids get -inf until the row has
   generated min_tokens tokens (regardless of ignore_eos, which only affects stopping).
4. Greedy rows (temperature 0) take argmax. Random rows: divide by temperature, top-k,
   top-p, min-p (HF warper order), softmax, then an exponential race
   argmax(probs / q), q ~ Exp(1). A seeded row draws its q from its own generator, so its
   tokens depend only on its seed and its own logits, never on the batch companions.
   With PDSERVE_SAMPLER_KERNEL=1 on CUDA, one Triton kernel does all of step 4 for the
   random rows without sorting the vocabulary (pdserve/kernels/triton_sampling.py); it
   draws the same q as the torch path below, which sorts.

Fast path: a batch that is all greedy with no penalties, no min_tokens masking and no
logprobs is a single argmax. Everything else touches only the rows that need it, and the
host sees one .tolist() at the end. Per-row values and row indices reach the device by
non-blocking copies (pdserve/host_copy.py), so launch() queues the sampling behind the
forward pass without waiting for it.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pdserve import env
from pdserve.host_copy import row_index, to_device
from pdserve.sampling.params import SamplingParams

logger = logging.getLogger(__name__)

# Temperatures below this are treated as greedy: logits / 1e-30 overflows to inf and the
# softmax turns into NaN, while the distribution is already one-hot for any practical use.
_GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingRow:
    """One sequence's needs for this step (built by the runner, read-only here)."""
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]    # tokens generated so far, before this step
    # Set iff params.seed is not None; owned by the sequence, created once from the seed
    # (see make_generator) on the logits' device, and advanced by each sampled step.
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class SampleResult:
    token_id: int
    logprob: float | None                         # raw log_softmax of the sampled token
    top_logprobs: list[tuple[int, float]] | None  # top-N (token, logprob), N = params.logprobs


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """The per-sequence generator for a seeded request (create once, keep with the sequence)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def apply_penalties(logits: Tensor, rows: Sequence[SamplingRow]) -> Tensor:
    """Repetition, frequency and presence penalties for rows[i] applied to logits[i].

    logits: [m, V] float32, returns a new [m, V] tensor. Token ids >= V (tokenizer tokens
    the model head does not cover) are ignored.
    """
    m, vocab = logits.shape
    dev = logits.device
    # Pad ragged token lists with `vocab`, a scratch column dropped after the scatter.
    prompt_tok = _padded([r.prompt_token_ids for r in rows], vocab, dev)  # [m, Lp] int64
    output_tok = _padded([r.output_token_ids for r in rows], vocab, dev)  # [m, Lo] int64
    prompt_tok = prompt_tok.clamp(max=vocab)  # out-of-head ids land in the scratch column
    output_tok = output_tok.clamp(max=vocab)
    counts = torch.zeros(m, vocab + 1, dtype=logits.dtype, device=dev)  # [m, V+1]
    counts.scatter_add_(1, output_tok, torch.ones_like(output_tok, dtype=logits.dtype))
    counts = counts[:, :vocab]                                          # [m, V]
    seen = torch.zeros(m, vocab + 1, dtype=torch.bool, device=dev)      # [m, V+1]
    seen.scatter_(1, prompt_tok, True)
    seen = seen[:, :vocab] | (counts > 0)                               # [m, V]

    rep = _col([r.params.repetition_penalty for r in rows], logits)      # [m, 1]
    freq = _col([r.params.frequency_penalty for r in rows], logits)      # [m, 1]
    pres = _col([r.params.presence_penalty for r in rows], logits)       # [m, 1]
    penalised = torch.where(logits < 0, logits * rep, logits / rep)
    out = torch.where(seen, penalised, logits)
    return out - freq * counts - pres * (counts > 0).to(logits.dtype)


def filter_logits(logits: Tensor, top_k: Sequence[int], top_p: Sequence[float],
                  min_p: Sequence[float]) -> Tensor:
    """Temperature-scaled logits [m, V] -> a new [m, V] with dropped tokens set to -inf.

    Per-row knobs as Python values (decided on the host, no device sync): top_k 0 = off,
    top_p 1 = off, min_p 0 = off. Order as HF's warpers: top-k, then top-p over the top-k
    renormalised distribution, then min-p. Top-k keeps every token tied with the k-th
    logit (as HF). Top-p keeps the smallest most-probable set whose mass reaches top_p;
    the top token always stays. Min-p drops tokens with prob < min_p * max prob.
    """
    m, vocab = logits.shape
    dev = logits.device
    out = logits
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        k = to_device([min(kk, vocab) if kk > 0 else vocab for kk in top_k],
                      torch.int64, dev)                                 # [m]
        p = to_device(top_p, torch.float32, dev)                        # [m]
        srt, idx = logits.sort(dim=-1, descending=True)                 # [m, V] each
        kth = srt.gather(1, (k - 1).unsqueeze(1))                       # [m, 1]
        # Sorted order is monotone, so "< kth" drops a suffix and keeps ties at the k-th.
        srt = srt.masked_fill(srt < kth, float("-inf"))
        probs = srt.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs                      # [m, V] exclusive
        # Rows with top_p == 1 never drop: rounding could push the tail's mass_before to 1.
        drop = (mass_before >= p.unsqueeze(1)) & (p < 1.0).unsqueeze(1)
        srt = srt.masked_fill(drop, float("-inf"))
        out = torch.empty_like(logits).scatter_(1, idx, srt)
    if any(mp > 0 for mp in min_p):
        mp_t = to_device(min_p, torch.float32, dev)                     # [m]
        probs = out.softmax(dim=-1)                                     # [m, V]
        thresh = mp_t.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)   # [m, 1]
        out = out.masked_fill(probs < thresh, float("-inf"))
    return out


class Sampler:
    """Stateless apart from its own generator, used by rows without a seed."""

    def __init__(self, eos_token_ids: Sequence[int], seed: int = 0,
                 kernel: bool | None = None) -> None:
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.seed = seed
        self.kernel = kernel   # None: decided per call by use_kernel
        # One generator per device, created lazily on the first batch seen there.
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: Tensor, rows: list[SamplingRow]) -> list[SampleResult]:
        return self.launch(logits, rows).results()

    def launch(self, logits: Tensor, rows: list[SamplingRow]) -> "PendingSample":
        """Queue the sampling on logits' device without waiting for it: the returned
        PendingSample holds the token ids as a device tensor (a later step can read them
        there) until results() brings everything to the host in one sync."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, V], "
                             f"got {tuple(logits.shape)}")
        n, vocab = logits.shape
        dev = logits.device
        lp_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        pen_rows = [i for i, r in enumerate(rows) if r.params.needs_penalties]
        mask_rows, mask_cols = self._min_tokens_mask(rows, vocab)
        rand_rows = [i for i, r in enumerate(rows)
                     if r.params.temperature >= _GREEDY_TEMPERATURE]

        if not (lp_rows or pen_rows or mask_rows or rand_rows):
            return PendingSample(self, logits.argmax(dim=-1), None, [], rows)

        lp_index = row_index(lp_rows, n, dev)
        raw_lp = (torch.log_softmax(_take(logits, lp_index), dim=-1)
                  if lp_rows else None)                                 # [l, V]
        x = logits
        if pen_rows:
            idx = row_index(pen_rows, n, dev)
            pen = apply_penalties(_take(x, idx), [rows[i] for i in pen_rows])
            x = pen if idx is None else x.index_copy(0, idx, pen)
        if mask_rows:
            x = x.clone() if x is logits else x
            ri = to_device(mask_rows, torch.int64, dev)                 # [k]
            ci = to_device(mask_cols, torch.int64, dev)                 # [k]
            x.index_put_((ri, ci), x.new_full((), float("-inf")))
        idx = row_index(rand_rows, n, dev)
        if idx is None:
            tokens = self._sample(x, rows)                              # [n] int64
        else:
            tokens = x.argmax(dim=-1)                                   # [n] int64
            if rand_rows:
                tokens.index_copy_(0, idx, self._sample(x.index_select(0, idx),
                                                        [rows[i] for i in rand_rows]))
        return PendingSample(self, tokens, raw_lp, lp_rows, rows, lp_index)

    # -- steps -------------------------------------------------------------------------

    def _min_tokens_mask(self, rows: list[SamplingRow], vocab: int) -> tuple[list[int], list[int]]:
        """(row, col) pairs to mask: eos + stop ids of rows still below min_tokens."""
        mask_rows: list[int] = []
        mask_cols: list[int] = []
        for i, r in enumerate(rows):
            if len(r.output_token_ids) >= r.params.min_tokens:
                continue
            ids = {t for t in (*self.eos_token_ids, *r.params.stop_token_ids) if t < vocab}
            mask_rows.extend([i] * len(ids))
            mask_cols.extend(ids)
        return mask_rows, mask_cols

    def _sample(self, x: Tensor, rows: list[SamplingRow]) -> Tensor:
        """x: [m, V] processed logits of the random rows -> [m] int64 sampled tokens."""
        m, vocab = x.shape
        dev = x.device
        kernel = self.use_kernel(x)
        if not kernel:
            temp = _col([r.params.temperature for r in rows], x)             # [m, 1]
            x = filter_logits(x / temp, [r.params.top_k for r in rows],
                              [r.params.top_p for r in rows], [r.params.min_p for r in rows])
            x = x.softmax(dim=-1)                                             # [m, V] probs
        q = torch.empty(m, vocab, dtype=torch.float32, device=dev)            # [m, V] ~ Exp(1)
        unseeded = [j for j, r in enumerate(rows) if r.generator is None]
        for j, r in enumerate(rows):
            if r.generator is not None:
                if r.generator.device.type != dev.type:
                    raise ValueError(f"row generator is on {r.generator.device}, logits on {dev}")
                # Exactly V draws per step from the row's own stream: batch-independent.
                q[j].exponential_(generator=r.generator)
        if len(unseeded) == m:
            q.exponential_(generator=self._generator(dev))
        elif unseeded:
            q.index_copy_(0, to_device(unseeded, torch.int64, dev),
                          torch.empty(len(unseeded), vocab, device=dev).exponential_(
                              generator=self._generator(dev)))
        if kernel:
            # One pass a row per search digit instead of a sort (kernels/triton_sampling.py).
            from pdserve.kernels import triton_sampling
            return triton_sampling.sample(
                x.float(), to_device([r.params.temperature for r in rows], torch.float32, dev),
                to_device([min(r.params.top_k, vocab) for r in rows], torch.int32, dev),
                to_device([r.params.top_p for r in rows], torch.float32, dev),
                to_device([r.params.min_p for r in rows], torch.float32, dev), q)
        # q can be exactly 0 on some backends; 0/0 would be NaN and win the argmax.
        q.clamp_min_(torch.finfo(q.dtype).tiny)
        return (x / q).argmax(dim=-1)

    def use_kernel(self, x: Tensor) -> bool:
        """Sample with the Triton kernel: on CUDA with PDSERVE_SAMPLER_KERNEL=1, or where
        the sampler was built with kernel=True (tests, sampler_bench.py)."""
        if self.kernel is not None:
            return self.kernel
        return x.is_cuda and env.sampler_kernel()

    def _results(self, tokens: Tensor, raw_lp: Tensor | None, lp_rows: list[int],
                 rows: list[SamplingRow], lp_index: Tensor | None) -> list[SampleResult]:
        n = tokens.shape[0]
        if raw_lp is None:
            return [SampleResult(t, None, None) for t in tokens.tolist()]
        vocab = raw_lp.shape[1]
        top_n = min(vocab, max(rows[i].params.logprobs or 0 for i in lp_rows))
        sel = _take(tokens, lp_index).unsqueeze(1)                           # [l, 1]
        sampled_lp = raw_lp.gather(1, sel).squeeze(1)                        # [l]
        top_v, top_i = raw_lp.topk(top_n, dim=-1)                            # [l, top_n] each
        # One host sync: token ids (< 2**53) and float32 logprobs are exact in float64.
        packed = torch.cat([tokens.double(), sampled_lp.double(),
                            top_v.double().flatten(), top_i.double().flatten()]).tolist()
        tok_list = [int(t) for t in packed[:n]]
        l = len(lp_rows)
        lp_list = packed[n:n + l]
        tv = packed[n + l:n + l + l * top_n]
        ti = packed[n + l + l * top_n:]
        results = [SampleResult(t, None, None) for t in tok_list]
        for j, i in enumerate(lp_rows):
            want = min(top_n, rows[i].params.logprobs or 0)
            base = j * top_n
            top = [(int(ti[base + c]), tv[base + c]) for c in range(want)]
            results[i] = SampleResult(tok_list[i], lp_list[j], top)
        return results

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = make_generator(self.seed, device)
            self._generators[device] = gen
        return gen


@dataclass(frozen=True)
class PendingSample:
    """One step's sampling, queued on the device (Sampler.launch)."""
    sampler: Sampler
    tokens: Tensor                 # [n] int64 sampled ids, on the logits' device
    raw_lp: Tensor | None
    lp_rows: list[int]
    rows: list[SamplingRow]
    lp_index: Tensor | None = None  # lp_rows on the device (row_index): None = all rows

    def results(self) -> list[SampleResult]:
        """Wait for the device and read the tokens (and logprobs): one host sync."""
        return self.sampler._results(self.tokens, self.raw_lp, self.lp_rows, self.rows,
                                     self.lp_index)


def _padded(lists: Sequence[Sequence[int]], pad: int, device: torch.device) -> Tensor:
    """Ragged int lists -> [m, max(len, 1)] int64, padded with `pad`."""
    width = max(1, max(len(x) for x in lists))
    data = [list(x) + [pad] * (width - len(x)) for x in lists]
    return to_device(data, torch.int64, device)


def _take(x: Tensor, index: Tensor | None) -> Tensor:
    """x's rows at `index` (row_index), or x itself for None (all rows)."""
    return x if index is None else x.index_select(0, index)


def _col(values: list[float], like: Tensor) -> Tensor:
    """Per-row scalars as a [m, 1] column matching `like`'s dtype and device."""
    return to_device(values, like.dtype, like.device).unsqueeze(1)
