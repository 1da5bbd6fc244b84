"""Batched sampling against the per-row Sampler (the reference) on fresh random batches."""
from __future__ import annotations

import random

import pytest
import torch

from lumen.engine.sampling.batched import batched_distribution, sample_rows
from lumen.engine.sampling.sampler import Sampler, SamplingParams


def random_params(rng: random.Random, vocab: int) -> SamplingParams:
    """Mixed parameters; every filter is off about half the time so rows differ within a batch."""
    return SamplingParams(
        temperature=rng.choice([0.0, 0.0, 0.5, 1.0, 1.7]),
        top_k=rng.choice([0, 0, 1, 5, 40, vocab, vocab + 3]),
        top_p=rng.choice([1.0, 1.0, 0.3, 0.8, 0.95]),
        min_p=rng.choice([0.0, 0.0, 0.05, 0.2]),
        repetition_penalty=rng.choice([1.0, 1.0, 0.8, 1.3]),
        seed=rng.choice([None, rng.randrange(2**64)]),
    )


def random_batch(seed: int, rows: int) -> tuple[torch.Tensor, list[SamplingParams], list[list[int]]]:
    rng = random.Random(seed)
    vocab = rng.randrange(50, 500)
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    params = [random_params(rng, vocab) for _ in range(rows)]
    histories = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 20))] for _ in range(rows)]
    return logits, params, histories


@pytest.mark.parametrize("seed", range(8))
def test_greedy_rows_match_greedy_token(seed):
    logits, params, histories = random_batch(seed, 24)
    samplers = [Sampler(p) for p in params]
    tokens = sample_rows(logits, samplers, histories)
    assert tokens.dtype == torch.int64 and tokens.shape == (24,)
    for row, p in enumerate(params):
        if p.greedy:
            assert int(tokens[row]) == Sampler(p).greedy_token(logits[row], histories[row])


@pytest.mark.parametrize("seed", range(8))
def test_distribution_matches_sampler_row_by_row(seed):
    logits, params, histories = random_batch(100 + seed, 24)
    probs = batched_distribution(logits, [Sampler(p) for p in params], histories)
    for row, p in enumerate(params):
        if p.greedy:
            continue
        expected = Sampler(p).distribution(logits[row], histories[row])
        torch.testing.assert_close(probs[row], expected, rtol=1e-6, atol=1e-9)
        assert torch.equal(probs[row] == 0, expected == 0), f"row {row}: {p}"


def test_seeded_rows_do_not_depend_on_the_batch():
    logits, params, histories = random_batch(7, 12)
    seeded = SamplingParams(temperature=1.2, top_k=30, top_p=0.9, repetition_penalty=1.3, seed=2**63 + 5)
    row, history = torch.randn(logits.shape[1]) * 2, [1, 2, 3]

    def tokens_at(position: int, others: list[int]) -> list[int]:
        """The seeded row's tokens over 6 steps, placed at `position` among the rows `others`."""
        order = others[:position] + [-1] + others[position:]
        batch = torch.stack([row if i < 0 else logits[i] for i in order])
        hist = [history if i < 0 else histories[i] for i in order]
        samplers = [Sampler(seeded if i < 0 else params[i]) for i in order]
        return [int(sample_rows(batch, samplers, hist)[position]) for _ in range(6)]

    alone = tokens_at(0, [])
    assert len(set(alone)) > 1  # the steps really draw fresh noise
    assert tokens_at(0, list(range(12))) == alone
    assert tokens_at(5, list(range(11, -1, -1))) == alone
    assert tokens_at(3, [0, 4, 9]) == alone


def test_frequencies_follow_the_filtered_distribution():
    expected_probs = torch.tensor([0.35, 0.25, 0.2, 0.12, 0.05, 0.03])
    params = SamplingParams(temperature=1.0, top_k=5)
    logits = expected_probs.log()
    expected = Sampler(params).distribution(logits, [])  # renormalised over the top 5
    torch.manual_seed(0)
    n = 4000  # 4000 rows of one call: independent draws from the default generator
    tokens = sample_rows(logits.expand(n, -1).contiguous(), [Sampler(params) for _ in range(n)], [[]] * n)
    freq = torch.bincount(tokens, minlength=6).double() / n
    assert freq[5] == 0
    # The largest standard deviation of a frequency here is sqrt(0.5 * 0.5 / 4000) = 0.008; 0.03 is ~4 sigma.
    assert (freq - expected.double()).abs().max() < 0.03, freq


@pytest.mark.parametrize("seed", range(6))
def test_sampled_tokens_have_nonzero_probability(seed):
    logits, params, histories = random_batch(200 + seed, 64)
    params = [p if not p.greedy else SamplingParams(top_k=3, seed=p.seed) for p in params]
    samplers = [Sampler(p) for p in params]
    reference = [Sampler(p).distribution(logits[r], histories[r]) for r, p in enumerate(params)]
    for _ in range(10):
        tokens = sample_rows(logits, samplers, histories).tolist()
        assert all(float(reference[r][t]) > 0 for r, t in enumerate(tokens))


def test_filter_boundaries_match_the_sampler():
    """Exact ties, where random logits never land: top-p mass reaching top_p exactly, min_p = 1, tied top-k."""
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    params = [SamplingParams(top_p=0.5), SamplingParams(min_p=1.0), SamplingParams(top_k=2)]
    probs = batched_distribution(logits, [Sampler(p) for p in params], [[]] * 3)
    for row, p in enumerate(params):
        assert torch.equal(probs[row], Sampler(p).distribution(logits[row], [])), p
    assert (probs > 0).sum(dim=-1).tolist() == [2, 2, 3]


def test_empty_batch_gives_no_tokens():
    assert sample_rows(torch.zeros(0, 10), [], []).shape == (0,)


@pytest.mark.parametrize("logits, n_samplers, n_histories, message", [
    (torch.zeros(3, 10), 2, 3, "3 rows, 2 samplers, 3 histories"),
    (torch.zeros(3, 10), 3, 4, "3 rows, 3 samplers, 4 histories"),
    (torch.zeros(10), 1, 1, "must be \\[rows, vocab\\]"),
    (torch.zeros(2, 0), 2, 2, "vocab > 0"),
    (torch.zeros(2, 10, dtype=torch.float16), 2, 2, "float32"),
])
def test_bad_input_raises_value_error(logits, n_samplers, n_histories, message):
    samplers = [Sampler(SamplingParams()) for _ in range(n_samplers)]
    with pytest.raises(ValueError, match=message):
        sample_rows(logits, samplers, [[]] * n_histories)
    with pytest.raises(ValueError, match=message):
        batched_distribution(logits, samplers, [[]] * n_histories)


def test_history_ids_outside_the_vocabulary_raise():
    samplers = [Sampler(SamplingParams(repetition_penalty=1.2))]
    with pytest.raises(ValueError, match="outside \\[0, 10\\)"):
        sample_rows(torch.zeros(1, 10), samplers, [[3, 10]])
