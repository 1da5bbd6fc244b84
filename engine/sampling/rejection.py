"""Verification: the target's logits for [last token, draft tokens] decide what is kept.

Greedy: the longest draft prefix that equals the target's own choices is accepted, then the
target's token at the first disagreement (or after the whole draft). Sampling: standard
speculative sampling (Leviathan et al. 2023, Chen et al. 2023): draft token x is accepted
with probability min(1, p(x) / q(x)); on rejection the token is drawn from the normalized
max(0, p - q); after a fully accepted draft one more token is drawn from p. p and q are the
sampler's filtered distributions (penalty, temperature, top-k, top-p, min-p) for the target
and the draft alike, so the output follows the target's sampling distribution exactly.
A deterministic draft (n-gram lookup, greedy draft model) has one-hot q.
"""
from __future__ import annotations

import torch

from lumen.engine.sampling.sampler import Sampler
from lumen.engine.speculative.draft import Draft


def verify(sampler: Sampler, logits: torch.Tensor, draft: Draft, history: list[int]) -> tuple[list[int], int]:
    """logits [len(draft.tokens) + 1, vocab]: row i is the target's prediction after history and
    draft.tokens[:i]. Returns (the tokens to append, how many of them are accepted draft tokens)."""
    out: list[int] = []
    for i, token in enumerate(draft.tokens):
        seen = history + out if sampler.params.repetition_penalty != 1.0 else history
        p = sampler.distribution(logits[i], seen)
        if p is None:  # greedy
            chosen = sampler.greedy_token(logits[i], seen)
            out.append(chosen)
            if chosen != token:
                return out, i
            continue
        p = p / p.sum()
        q = draft.probs[i] if draft.probs is not None else None
        q_token = float(q[token]) if q is not None else 1.0
        if sampler.uniform() * q_token < float(p[token]):
            out.append(token)
            continue
        if q is None:
            residual = p.clone()
            residual[token] = 0.0
        else:
            residual = (p - q).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: a rejection had probability ~0
            residual = p
        out.append(sampler.draw(residual))
        return out, i
    seen = history + out if sampler.params.repetition_penalty != 1.0 else history
    out.append(sampler.sample(logits[len(draft.tokens)], seen))
    return out, len(draft.tokens)


def verify_greedy_choices(choices: list[int], draft: list[int]) -> tuple[list[int], int]:
    """verify() for a greedy request without repetition penalty, from the target's argmax at each
    row (choices[i]: its choice after draft[:i]; one more than the draft): the longest agreeing
    prefix, then the target's token at the first disagreement or after the whole draft."""
    accepted = next((i for i, (c, d) in enumerate(zip(choices, draft)) if c != d), len(draft))
    return choices[:accepted + 1], accepted
