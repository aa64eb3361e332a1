"""The sort-free sampling kernel (pdserve/kernels/triton_sampling.py) against the torch
sort path (pdserve.sampling.sampler.filter_logits), under the Triton interpreter; the GPU
case at the Llama-3 vocabulary is in test_triton_gpu.py."""
from __future__ import annotations

import math

import pytest
import torch

from pdserve.kernels import triton_sampling as ts
from pdserve.sampling.params import SamplingParams
from pdserve.sampling.sampler import Sampler, SamplingRow, filter_logits, make_generator

PROBS = [0.5, 0.3, 0.15, 0.05]


def knobs(m: int, top_k, top_p, min_p) -> tuple[torch.Tensor, ...]:
    def col(v, dtype):
        return torch.tensor(v if isinstance(v, list) else [v] * m, dtype=dtype)
    return col(top_k, torch.int32), col(top_p, torch.float32), col(min_p, torch.float32)


def kernel_filter(x, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    return ts.filter_logits(x, *knobs(x.shape[0], top_k, top_p, min_p))


def torch_filter(x, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    m = x.shape[0]
    def lst(v):
        return v if isinstance(v, list) else [v] * m
    return filter_logits(x, lst(top_k), lst(top_p), lst(min_p))


@pytest.mark.parametrize("kw, keep", [
    (dict(top_k=2), [0, 1]),
    (dict(top_k=10), [0, 1, 2, 3]),
    (dict(top_p=0.7), [0, 1]),
    (dict(top_p=0.85), [0, 1, 2]),
    (dict(top_p=0.1), [0]),               # the top token always stays
    (dict(min_p=0.2), [0, 1, 2]),
    (dict(min_p=0.7), [0]),
    (dict(top_k=3, top_p=0.6), [0, 1]),   # top-p over the renormalised top-3
    (dict(top_p=0.85, min_p=0.4), [0, 1]),
])
def test_kernel_filter_exact_distribution(kw, keep):
    x = torch.tensor([PROBS, PROBS[::-1]]).log()
    out = kernel_filter(x, **kw)
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == set(keep)
    assert set(torch.isfinite(out[1]).nonzero().flatten().tolist()) == {3 - i for i in keep}
    kept = torch.isfinite(out)
    assert torch.equal(out[kept], x[kept])      # kept logits pass through unchanged


@pytest.mark.parametrize("top_k, top_p, min_p", [
    (5, 1.0, 0.0), (0, 0.9, 0.0), (0, 1.0, 0.05), (40, 0.8, 0.1), (1, 1.0, 0.0),
    (0, 0.02, 0.0), (1999, 0.5, 0.0), (5000, 0.95, 0.0),
    ([0, 7, 300, 0], [0.3, 1.0, 0.9, 0.999], [0.0, 0.0, 0.02, 0.5]),   # per-row knobs
])
def test_kernel_filter_matches_torch_sort_path(top_k, top_p, min_p):
    # 1999 columns: two whole 1024-wide blocks would hide a bad tail mask. Distinct random
    # values, mixed signs, and -inf entries as min_tokens masking leaves them.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1999, generator=gen) * 3
    x[1, :50] = float("-inf")
    x[2, 1000] = float("-inf")
    got, want = kernel_filter(x, top_k, top_p, min_p), torch_filter(x, top_k, top_p, min_p)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    assert torch.equal(got[torch.isfinite(got)], want[torch.isfinite(want)])


def test_kernel_filter_keeps_ties_at_both_cutoffs():
    x = torch.tensor([[1.0, 2.0, 2.0, 0.0, -0.0, 3.0]])
    assert torch.isfinite(kernel_filter(x, top_k=2)).tolist() == [[False, True, True, False, False, True]]
    # probs: 3 -> 0.51, each 2 -> 0.19. 0.6 is reached inside the tie, which stays whole
    # (a sort keeps one of the two).
    assert torch.isfinite(kernel_filter(x, top_p=0.6)).tolist() == [[False, True, True, False, False, True]]
    # A very negative logit and negative zero order as floats do.
    y = torch.tensor([[-0.0, 0.0, -1e30, 5.0]])
    assert torch.isfinite(kernel_filter(y, top_k=3)).tolist() == [[True, True, False, True]]


def test_kernel_sample_matches_torch_race_with_the_same_noise():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 1500, generator=gen) * 2
    x[3, 7] = float("-inf")
    temp = torch.tensor([1.0, 0.7, 1.3, 0.5, 2.0])
    top_k, top_p, min_p = [0, 20, 0, 300, 0], [1.0, 0.9, 0.5, 0.95, 1.0], [0.0, 0.0, 0.1, 0.0, 0.05]
    for seed in range(4):
        q = torch.empty_like(x).exponential_(generator=torch.Generator().manual_seed(seed))
        got = ts.sample(x, temp, *knobs(5, top_k, top_p, min_p), q)
        probs = torch_filter(x / temp[:, None], top_k, top_p, min_p).softmax(dim=-1)
        assert got.tolist() == (probs / q).argmax(dim=-1).tolist()


def test_kernel_sample_never_draws_a_dropped_token():
    x = torch.tensor([PROBS] * 64).log()
    q = torch.empty_like(x).exponential_(generator=torch.Generator().manual_seed(2))
    ones = torch.ones(64)
    assert set(ts.sample(x, ones, *knobs(64, 2, 1.0, 0.0), q).tolist()) <= {0, 1}
    assert set(ts.sample(x, ones, *knobs(64, 0, 0.85, 0.0), q).tolist()) <= {0, 1, 2}
    assert set(ts.sample(x, ones, *knobs(64, 0, 1.0, 0.7), q).tolist()) == {0}
    assert set(ts.sample(x, ones, *knobs(64, 0, 1.0, 0.0), q).tolist()) == {0, 1, 2, 3}


def test_kernel_rejects_bad_inputs():
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="top_p"):
        ts.filter_logits(x, torch.zeros(2, dtype=torch.int32), torch.ones(3), torch.zeros(2))
    with pytest.raises(ValueError, match="float32"):
        kernel_filter(x.double())
    with pytest.raises(ValueError, match="q must be"):
        ts.sample(x, torch.ones(2), *knobs(2, 0, 1.0, 0.0), torch.ones(2, 9))
    assert ts.filter_logits(torch.zeros(0, 8), *knobs(0, [], [], [])).shape == (0, 8)


def row(generator=None, output=(), **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), [], list(output), generator)


def test_sampler_kernel_path_follows_the_distribution():
    # logits [0, ln 2] at temperature 0.5 -> probs proportional to [1, 4].
    n = 1500
    logits = torch.tensor([[0.0, math.log(2.0)]] * n)
    res = Sampler([9], seed=1, kernel=True)(logits, [row(temperature=0.5) for _ in range(n)])
    share = sum(r.token_id for r in res) / n
    assert abs(share - 0.8) < 0.052        # ~5 standard deviations


def test_sampler_kernel_path_seeded_row_is_batch_independent():
    # The same q as the torch path (drawn from the row's own generator), so the same tokens.
    def tokens(kernel: bool, companions: int) -> list[int]:
        sampler = Sampler([9], seed=companions, kernel=kernel)
        gen = make_generator(7, "cpu")
        noise = torch.Generator().manual_seed(companions)
        out: list[int] = []
        for step in range(4):
            mine = torch.linspace(0.0, 3.0, 400).roll(step).unsqueeze(0)
            logits = torch.cat([torch.randn(companions, 400, generator=noise), mine])
            rows = [row(temperature=1.0, top_p=0.8) for _ in range(companions)]
            rows.append(row(generator=gen, output=out, temperature=0.9, top_k=100, top_p=0.9, seed=7))
            out.append(sampler(logits, rows)[-1].token_id)
        return out
    ref = tokens(False, 0)
    assert tokens(True, 0) == ref
    assert tokens(True, 3) == ref
