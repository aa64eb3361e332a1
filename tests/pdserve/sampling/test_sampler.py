from __future__ import annotations

import math

import pytest
import torch
from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from pdserve.sampling.params import SamplingParams
from pdserve.sampling.sampler import (Sampler, SamplingRow, apply_penalties, filter_logits,
                                      make_generator)

EOS = 9
NEG_INF = float("-inf")


def row(prompt=(), output=(), generator=None, **kw) -> SamplingRow:
    return SamplingRow(SamplingParams(**kw), list(prompt), list(output), generator)


def finite_set(x: torch.Tensor) -> set[int]:
    return set(torch.isfinite(x).nonzero().flatten().tolist())


# -- penalties (hand-computed) -------------------------------------------------------------

def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    # token 0 in the prompt, token 1 in the output, token 3 in neither.
    out = apply_penalties(logits, [row(prompt=[0], output=[1], repetition_penalty=2.0)])
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0, -2.0]]
    # Same as HF's processor over input_ids = prompt + output.
    hf = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0, 1]]), logits.clone())
    torch.testing.assert_close(out, hf)


def test_frequency_and_presence_penalties_count_output_only():
    logits = torch.zeros(1, 5)
    r = row(prompt=[4, 4], output=[2, 2, 3], frequency_penalty=0.5, presence_penalty=1.0)
    out = apply_penalties(logits, [r])
    # token 2: 2 * 0.5 + 1 = 2; token 3: 0.5 + 1 = 1.5; prompt token 4 untouched.
    assert out.tolist() == [[0.0, 0.0, -2.0, -1.5, 0.0]]


def test_negative_presence_penalty_encourages_and_rows_are_independent():
    logits = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    rows = [row(output=[0], presence_penalty=-1.0), row(output=[2, 2], frequency_penalty=1.0)]
    assert apply_penalties(logits, rows).tolist() == [[2.0, 1.0, 1.0], [1.0, 1.0, -1.0]]


def test_penalty_ids_outside_the_head_are_ignored():
    logits = torch.tensor([[1.0, 1.0]])
    out = apply_penalties(logits, [row(prompt=[7], output=[5, 1], repetition_penalty=2.0)])
    assert out.tolist() == [[1.0, 0.5]]


def test_penalties_apply_to_greedy():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    sampler = Sampler([EOS])
    assert sampler(logits, [row(temperature=0.0)])[0].token_id == 0
    res = sampler(logits, [row(output=[0], temperature=0.0, repetition_penalty=2.0)])
    assert res[0].token_id == 1          # 3 / 2 = 1.5 < 2
    res = sampler(logits, [row(output=[0, 0], temperature=0.0, frequency_penalty=0.6)])
    assert res[0].token_id == 1          # 3 - 1.2 = 1.8 < 2


# -- filtering -----------------------------------------------------------------------------

PROBS = [0.5, 0.3, 0.15, 0.05]


def filt(logits: torch.Tensor, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    m = logits.shape[0]
    return filter_logits(logits, [top_k] * m, [top_p] * m, [min_p] * m)


@pytest.mark.parametrize("kw, keep", [
    (dict(top_k=2), [0, 1]),
    (dict(top_k=10), [0, 1, 2, 3]),
    (dict(top_p=0.7), [0, 1]),            # 0.5 < 0.7 <= 0.8
    (dict(top_p=0.85), [0, 1, 2]),
    (dict(top_p=0.1), [0]),               # the top token always stays
    (dict(min_p=0.2), [0, 1, 2]),         # threshold 0.1
    (dict(min_p=0.7), [0]),               # threshold 0.35
    (dict(top_k=3, top_p=0.6), [0, 1]),   # top-p over the renormalised top-3: 0.526, 0.842
    (dict(top_p=0.85, min_p=0.4), [0, 1]),
])
def test_filter_exact_distribution(kw, keep):
    logits = torch.tensor([PROBS]).log()
    probs = filt(logits, **kw).softmax(dim=-1)[0]
    total = sum(PROBS[i] for i in keep)
    expected = [PROBS[i] / total if i in keep else 0.0 for i in range(len(PROBS))]
    torch.testing.assert_close(probs, torch.tensor(expected))


def test_filter_top_k_keeps_ties():
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert finite_set(filt(logits, top_k=1)[0]) == {1, 2}


def test_filter_per_row_knobs():
    logits = torch.tensor([PROBS, PROBS]).log()
    out = filter_logits(logits, [1, 0], [1.0, 0.85], [0.0, 0.0])
    assert finite_set(out[0]) == {0}
    assert finite_set(out[1]) == {0, 1, 2}


def test_filter_matches_hf_warpers_on_random_logits():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 50, generator=gen) * 3
    for top_k, top_p, min_p in [(5, 1.0, 0.0), (0, 0.9, 0.0), (0, 1.0, 0.05), (10, 0.8, 0.1)]:
        ours = filt(logits / 0.7, top_k, top_p, min_p)
        hf = TemperatureLogitsWarper(0.7)(None, logits.clone())
        if top_k:
            hf = TopKLogitsWarper(top_k)(None, hf)
        if top_p < 1.0:
            hf = TopPLogitsWarper(top_p)(None, hf)
        if min_p:
            hf = MinPLogitsWarper(min_p)(None, hf)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(hf)), (top_k, top_p, min_p)


# -- sampling ------------------------------------------------------------------------------

def draw_counts(logits_row: list[float], n: int, **kw) -> list[int]:
    """One call with n identical unseeded rows -> counts per token."""
    logits = torch.tensor([logits_row] * n)
    res = Sampler([EOS], seed=1)(logits, [row(**kw) for _ in range(n)])
    counts = [0] * len(logits_row)
    for r in res:
        counts[r.token_id] += 1
    return counts


def test_top_k_top_p_min_p_restrict_what_can_be_sampled():
    logits = [math.log(p) for p in PROBS]
    assert draw_counts(logits, 3000, top_k=2)[2:] == [0, 0]
    assert draw_counts(logits, 3000, top_p=0.85)[3] == 0
    counts = draw_counts(logits, 3000, min_p=0.7)
    assert counts == [3000, 0, 0, 0]
    counts = draw_counts(logits, 3000)
    assert all(c > 0 for c in counts)


def test_sampling_frequencies_follow_temperature_scaled_distribution():
    # logits [0, ln 2] at temperature 0.5 -> probs proportional to [1, 4].
    n = 20000
    counts = draw_counts([0.0, math.log(2.0)], n, temperature=0.5)
    assert abs(counts[1] / n - 0.8) < 0.015      # ~5 standard deviations


def test_greedy_batch_is_argmax_and_does_not_mutate_logits():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 32, generator=gen)
    before = logits.clone()
    res = Sampler([EOS])(logits, [row(temperature=0.0) for _ in range(6)])
    assert [r.token_id for r in res] == logits.argmax(dim=-1).tolist()
    assert all(r.logprob is None and r.top_logprobs is None for r in res)
    assert torch.equal(logits, before)


def test_mixed_batch_greedy_rows_unaffected_by_random_rows():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 32, generator=gen)
    before = logits.clone()
    rows = [row(temperature=0.0), row(temperature=1.0, top_p=0.9),
            row(temperature=0.0, output=[1], repetition_penalty=1.5), row(temperature=0.8)]
    res = Sampler([EOS])(logits, rows)
    assert res[0].token_id == int(logits[0].argmax())
    pen = apply_penalties(logits[2:3], [rows[2]])
    assert res[2].token_id == int(pen.argmax())
    assert torch.equal(logits, before)


def seeded_tokens(seed: int, steps: int, companions: int, vocab: int = 1000) -> list[int]:
    """Sample `steps` tokens for one seeded row, with `companions` other rows around it."""
    sampler = Sampler([EOS], seed=companions)
    gen = make_generator(seed, "cpu")
    noise = torch.Generator().manual_seed(99 + companions)
    out: list[int] = []
    for step in range(steps):
        # The seeded row's logits depend on the step only; companions vary per call.
        mine = torch.linspace(0.0, 1.0, vocab).roll(step).unsqueeze(0)
        others = torch.randn(companions, vocab, generator=noise)
        half = companions // 2
        logits = torch.cat([others[:half], mine, others[half:]])
        rows = [row(temperature=1.0) for _ in range(companions)]
        rows.insert(half, row(output=out, generator=gen, temperature=1.0, top_k=500, seed=seed))
        out.append(sampler(logits, rows)[half].token_id)
    return out


def test_seed_reproducible_regardless_of_batch_companions():
    alone = seeded_tokens(seed=123, steps=12, companions=0)
    assert alone == seeded_tokens(seed=123, steps=12, companions=0)
    assert alone == seeded_tokens(seed=123, steps=12, companions=3)
    assert alone == seeded_tokens(seed=123, steps=12, companions=7)
    assert alone != seeded_tokens(seed=124, steps=12, companions=0)


def test_unseeded_rows_use_sampler_seed():
    logits = torch.zeros(4, 1000)
    rows = [row() for _ in range(4)]
    a = [r.token_id for r in Sampler([EOS], seed=5)(logits, rows)]
    b = [r.token_id for r in Sampler([EOS], seed=5)(logits, rows)]
    assert a == b


# -- logprobs ------------------------------------------------------------------------------

def test_logprobs_come_from_the_raw_distribution():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 40, generator=gen)
    rows = [row(logprobs=3, temperature=0.5, output=[1, 2], repetition_penalty=1.3),
            row(temperature=0.0),
            row(logprobs=0, temperature=0.0, presence_penalty=1.0, output=[7])]
    res = Sampler([EOS])(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)
    assert res[0].logprob == pytest.approx(float(raw[0, res[0].token_id]), abs=1e-6)
    vals, idx = raw[0].topk(3)
    assert [t for t, _ in res[0].top_logprobs] == idx.tolist()
    assert [v for _, v in res[0].top_logprobs] == pytest.approx(vals.tolist(), abs=1e-6)
    assert res[1].logprob is None and res[1].top_logprobs is None
    assert res[2].top_logprobs == []
    assert res[2].logprob == pytest.approx(float(raw[2, res[2].token_id]), abs=1e-6)


def test_logprobs_wider_than_vocab_are_capped():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    res = Sampler([EOS])(logits, [row(logprobs=20, temperature=0.0)])[0]
    assert res.token_id == 2 and [t for t, _ in res.top_logprobs] == [2, 1, 0]


# -- min_tokens ----------------------------------------------------------------------------

def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, 10)
    logits[0, EOS] = 5.0
    logits[0, 3] = 4.0
    logits[0, 1] = 3.0
    sampler = Sampler([EOS])
    kw = dict(temperature=0.0, min_tokens=2, stop_token_ids=[3], max_tokens=8)
    assert sampler(logits, [row(output=[0], **kw)])[0].token_id == 1
    # ignore_eos only changes stopping, not masking.
    assert sampler(logits, [row(output=[0], ignore_eos=True, **kw)])[0].token_id == 1
    assert sampler(logits, [row(output=[0, 0], **kw)])[0].token_id == EOS


def test_min_tokens_masked_token_never_sampled():
    logits = torch.zeros(500, 10)
    res = Sampler([EOS])(logits, [row(min_tokens=1) for _ in range(500)])
    assert EOS not in {r.token_id for r in res}


def test_bad_shapes_raise_value_error():
    with pytest.raises(ValueError):
        Sampler([EOS])(torch.zeros(2, 5), [row()])
