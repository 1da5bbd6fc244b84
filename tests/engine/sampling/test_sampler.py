"""The sampler against slow, obviously-correct references on fresh random logits."""
from __future__ import annotations

import math

import pytest
import torch

from lumen.engine.errors import InvalidRequestError
from lumen.engine.sampling.logprobs import token_logprobs
from lumen.engine.sampling.sampler import Sampler, SamplingParams, apply_repetition_penalty


def support(params: SamplingParams, logits: torch.Tensor, draws: int = 400) -> set[int]:
    sampler = Sampler(params)
    return {sampler.sample(logits, []) for _ in range(draws)}


def reference_allowed(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    probs = torch.softmax(logits / p.temperature, -1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    allowed = set(order[: p.top_k] if p.top_k else order)
    mass, kept = 0.0, set()
    for i in order:
        if mass >= p.top_p:
            break
        kept.add(i)
        mass += probs[i]
    top = max(probs)
    return allowed & kept & {i for i in order if probs[i] >= p.min_p * top}


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=0.7, top_p=0.5),
    SamplingParams(temperature=1.3, min_p=0.3),
    SamplingParams(temperature=1.0, top_k=8, top_p=0.8, min_p=0.05),
])
def test_filters_never_sample_outside_the_reference_set(params):
    logits = torch.randn(32) * 2
    assert support(params, logits) <= reference_allowed(logits, params)


def test_greedy_is_argmax_and_seed_is_reproducible():
    logits = torch.randn(100)
    assert Sampler(SamplingParams(temperature=0)).sample(logits, []) == int(logits.argmax())
    p = SamplingParams(temperature=1.0, seed=42)
    a, b = Sampler(p), Sampler(p)
    assert [a.sample(logits, []) for _ in range(50)] == [b.sample(logits, []) for _ in range(50)]


def test_sampling_frequencies_follow_softmax():
    logits = torch.tensor([0.0, 1.0, 2.0])
    sampler = Sampler(SamplingParams(temperature=1.0, seed=3))
    n = 6000
    counts = torch.bincount(torch.tensor([sampler.sample(logits, []) for _ in range(n)]), minlength=3)
    expected = torch.softmax(logits, -1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 13.8  # chi-square, 2 degrees of freedom: false-failure rate 0.1%


def test_repetition_penalty():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_token_logprobs():
    logits = torch.randn(2, 10)
    lps = token_logprobs(logits, [3, 7], 4)
    ref = torch.log_softmax(logits, -1)
    assert [lp.token_id for lp in lps] == [3, 7]
    assert math.isclose(lps[1].logprob, float(ref[1, 7]), rel_tol=1e-6)
    assert [t for t, _ in lps[0].top] == ref[0].topk(4).indices.tolist()


@pytest.mark.parametrize("kw,field", [
    ({"temperature": -1}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.01}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"min_p": 2}, "min_p"), ({"repetition_penalty": -1}, "repetition_penalty"),
])
def test_invalid_params(kw, field):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kw)
