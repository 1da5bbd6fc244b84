"""Sampled drafts verified on the device (sampling.device_verify) against the rule verify() follows:
the emitted tokens follow the target's distribution, whatever the draft's; seeds reproduce."""
from __future__ import annotations

import torch

from lumen.engine.sampling.device_verify import DraftRows, verdicts, verify_on_device
from lumen.engine.sampling.sampler import Sampler, SamplingParams

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 0.3], [0.1, 0.2, 2.5, -0.5, 1.0, 0.0]])
TRIALS = 4000


def target(row: int) -> torch.Tensor:
    return torch.softmax(LOGITS[row], dim=-1)


def run(drafts: list[DraftRows], logits: torch.Tensor) -> list[tuple[list[int], int]]:
    return verdicts(drafts, verify_on_device(logits, drafts).tolist())


def frequencies(tokens: list[int]) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=6).float() / len(tokens)


def test_emitted_tokens_follow_the_target_for_sampled_and_one_hot_drafts():
    torch.manual_seed(0)
    q = torch.tensor([0.05, 0.4, 0.05, 0.3, 0.1, 0.1])
    xs = torch.multinomial(q, TRIALS, replacement=True).tolist()
    logits = LOGITS.repeat(TRIALS, 1)                    # each trial: 2 rows (the draft's, the bonus)
    for probs in (q, None):                              # a draft model's q, an n-gram's one-hot q
        drafts = [DraftRows(Sampler(SamplingParams()), [x], None if probs is None else probs[None], 2 * i)
                  for i, x in enumerate(xs)]
        out = run(drafts, logits)
        first = frequencies([tokens[0] for tokens, _ in out])
        assert (first - target(0)).abs().max() < 0.03, (first, target(0))
        for (tokens, accepted), x in zip(out, xs):
            assert accepted in (0, 1) and len(tokens) == accepted + 1
            assert (tokens[0] == x) == (accepted == 1)


def test_a_fully_accepted_draft_adds_a_bonus_token_from_the_last_row():
    torch.manual_seed(1)
    p0 = target(0)
    xs = torch.multinomial(p0, TRIALS, replacement=True).tolist()
    # q = p: every draft token is accepted (u * q(x) < p(x) for u < 1), then the bonus follows row 1.
    drafts = [DraftRows(Sampler(SamplingParams()), [x], p0[None], 2 * i) for i, x in enumerate(xs)]
    out = run(drafts, LOGITS.repeat(TRIALS, 1))
    assert all(accepted == 1 and tokens[0] == x for (tokens, accepted), x in zip(out, xs))
    bonus = frequencies([tokens[1] for tokens, _ in out])
    assert (bonus - target(1)).abs().max() < 0.03


def test_a_seed_gives_the_same_verdicts_alone_and_in_a_batch():
    def draft(first: int, seed: int | None) -> DraftRows:
        return DraftRows(Sampler(SamplingParams(temperature=1.5, seed=seed)), [3, 1], None, first)

    logits = torch.cat([LOGITS, LOGITS[:1], LOGITS, LOGITS[:1]])   # two sequences of 3 rows each
    for trial in range(20):
        alone = run([draft(0, 100 + trial)], logits[:3])
        together = run([draft(0, None), draft(3, 100 + trial)], logits)
        assert together[1] == alone[0]
