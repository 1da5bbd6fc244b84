"""Speculative verification of sampled drafts on the logits' device, for a whole batch at once.

The same rule as rejection.verify (Leviathan et al. 2023): draft token x at row i is accepted with
probability min(1, p(x) / q(x)); the first rejection draws from the normalised max(0, p - q); a
fully accepted draft adds one token drawn from the last row's p. Every row's verdict is computed at
once (acceptance, residual draw, bonus draw) and the host keeps the prefix up to the first
rejection, so the outcome follows the target's distribution exactly as verify's does, though its
random numbers are drawn differently (a seed reproduces it on the same device).

Only for requests whose rows are independent of the accepted prefix: sampled (not greedy) and
without a repetition penalty. It never synchronises with the device: the runner reads `flat`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lumen.engine.sampling.batched import batched_distribution, exponential_noise, uniforms
from lumen.engine.sampling.sampler import Sampler


@dataclass(slots=True)
class DraftRows:
    """One sequence's part: its sampler, its draft tokens (rows first .. first + k - 1 scored them)
    and their draft probabilities [k, V] (None: a deterministic draft, one-hot q)."""
    sampler: Sampler
    tokens: list[int]
    probs: torch.Tensor | None
    first: int


def verify_on_device(logits: torch.Tensor, drafts: list[DraftRows]) -> torch.Tensor:
    """flat float32 tensor to read: every draft row's acceptance (0/1) and residual token, then each
    sequence's bonus token. logits [R, V] float32 holds each sequence's k + 1 rows from `first`."""
    dev, vocab = logits.device, logits.shape[1]
    row_samplers = [d.sampler for d in drafts for _ in range(len(d.tokens) + 1)]
    rows = torch.tensor([d.first + i for d in drafts for i in range(len(d.tokens) + 1)], device=dev)
    p = batched_distribution(logits.index_select(0, rows), row_samplers, [[]] * len(row_samplers))
    p = p / p.sum(dim=-1, keepdim=True)
    is_draft = [i < len(d.tokens) for d in drafts for i in range(len(d.tokens) + 1)]
    draft_at = torch.tensor([i for i, flag in enumerate(is_draft) if flag], device=dev)
    bonus_at = torch.tensor([i for i, flag in enumerate(is_draft) if not flag], device=dev)
    x = torch.tensor([t for d in drafts for t in d.tokens], device=dev)
    q = torch.cat([d.probs.to(dev, torch.float32) if d.probs is not None
                   else torch.nn.functional.one_hot(torch.tensor(d.tokens, device=dev), vocab).float()
                   for d in drafts])                                                    # [D, V]
    q = q / q.sum(dim=-1, keepdim=True)
    pd = p.index_select(0, draft_at)
    draft_samplers = [d.sampler for d in drafts for _ in d.tokens]
    p_x, q_x = pd.gather(1, x[:, None])[:, 0], q.gather(1, x[:, None])[:, 0]
    accept = uniforms(draft_samplers, dev) * q_x < p_x
    residual = (pd - q).clamp_min(0.0)
    empty = residual.sum(dim=-1, keepdim=True) <= 0.0        # p == q up to rounding: draw from p
    residual = torch.where(empty, pd, residual)
    redraw = residual.div_(exponential_noise(draft_samplers, residual.shape, dev)).argmax(dim=-1)
    pb = p.index_select(0, bonus_at)
    bonus = pb.div_(exponential_noise([d.sampler for d in drafts], pb.shape, dev)).argmax(dim=-1)
    return torch.cat([accept.float(), redraw.float(), bonus.float()])


def verdicts(drafts: list[DraftRows], flat: list[float]) -> list[tuple[list[int], int]]:
    """Each sequence's (tokens to append, accepted draft tokens) from verify_on_device's values."""
    total = sum(len(d.tokens) for d in drafts)
    accept, redraw, bonus = flat[:total], flat[total:2 * total], flat[2 * total:]
    out, offset = [], 0
    for s, d in enumerate(drafts):
        k = len(d.tokens)
        j = next((i for i in range(k) if not accept[offset + i]), k)
        out.append((d.tokens[:j] + [int(redraw[offset + j])], j) if j < k else (d.tokens + [int(bonus[s])], k))
        offset += k
    return out
