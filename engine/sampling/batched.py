"""Batched sampling on the logits' device: one token per row of a [rows, vocab] logits tensor.

Makes exactly the choices `Sampler` makes (greedy rows: the argmax after the repetition penalty;
the others: a draw from exactly `Sampler.distribution`), for the whole batch with tensor ops, so
the model runner syncs with the device once, when it reads the returned tokens. This module must
never sync with the device itself (.item(), .tolist(), .cpu(), boolean-mask indexing, nonzero)
nor loop over the vocabulary in Python; its only Python loop on the device side is over seeded
rows, whose noise comes from their own generators so that their tokens do not depend on the rest
of the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lumen.engine.sampling.sampler import Sampler

# Noise is clamped away from 0: exponential_ may return 0, and 0 / 0 is NaN, which argmax would pick.
_TINY = torch.finfo(torch.float32).tiny


@dataclass(slots=True, frozen=True)
class _RowParams:
    """Each row's parameters as [R] tensors on the device, and host-side flags saying which
    filters some row needs, so that unneeded sort/topk work is skipped without a sync."""
    temperature: torch.Tensor  # [R] float32; 1 on greedy rows so that they stay finite
    top_k: torch.Tensor  # [R] int64; 0 = off (also when k >= vocab)
    top_p: torch.Tensor  # [R] float32
    min_p: torch.Tensor  # [R] float32
    penalty: torch.Tensor  # [R] float32
    greedy: torch.Tensor  # [R] bool
    noise_row: torch.Tensor  # [R] int64; the row of the shared unseeded noise each row reads
    max_k: int
    any_top_p: bool
    any_min_p: bool
    num_unseeded: int  # rows drawing from the default generator


def sample_rows(logits: torch.Tensor, samplers: list[Sampler], histories: list[list[int]]) -> torch.Tensor:
    """logits [R, V] float32 on any device; samplers[i] and histories[i] (prompt + output ids) belong to row i.

    Returns [R] int64 on logits.device: greedy rows the argmax after the repetition penalty (exactly
    Sampler.greedy_token's choice), others a draw from exactly Sampler.distribution's probabilities."""
    _check(logits, samplers, histories)
    rows = _row_params(samplers, logits.shape[1], logits.device)
    logits = _penalize(logits, samplers, histories, rows.penalty)
    num_greedy = sum(s.params.greedy for s in samplers)
    if num_greedy == len(samplers):
        return logits.argmax(dim=-1)
    probs = _filtered_probs(logits, rows)
    # Exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. picks token i with probability p_i.
    sampled = probs.div_(_exponential_noise(samplers, rows, probs.shape, logits.device)).argmax(dim=-1)
    if num_greedy == 0:
        return sampled
    return torch.where(rows.greedy, logits.argmax(dim=-1), sampled)


def batched_distribution(logits: torch.Tensor, samplers: list[Sampler], histories: list[list[int]]) -> torch.Tensor:
    """probs [R, V]: row i is Sampler.distribution(logits[i], histories[i]) (greedy rows: anything)."""
    _check(logits, samplers, histories)
    rows = _row_params(samplers, logits.shape[1], logits.device)
    return _filtered_probs(_penalize(logits, samplers, histories, rows.penalty), rows)


def _check(logits: torch.Tensor, samplers: list[Sampler], histories: list[list[int]]) -> None:
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be [rows, vocab] with vocab > 0, got shape {tuple(logits.shape)}")
    if logits.dtype != torch.float32:
        raise ValueError(f"logits must be float32 (convert with .float()), got {logits.dtype}")
    if not len(samplers) == len(histories) == logits.shape[0]:
        raise ValueError(f"need one sampler and one history per logits row: {logits.shape[0]} rows, "
                         f"{len(samplers)} samplers, {len(histories)} histories")


def _row_params(samplers: list[Sampler], vocab: int, device: torch.device) -> _RowParams:
    params = [s.params for s in samplers]
    top_k = [p.top_k if p.top_k < vocab else 0 for p in params]
    unseeded = [not p.greedy and p.seed is None for p in params]
    noise_row, slot = [], 0
    for is_unseeded in unseeded:
        noise_row.append(slot if is_unseeded else 0)
        slot += is_unseeded
    # One host->device copy for every per-row number. Integers stay exact in float32 below 2^24,
    # far above any vocabulary or batch size. Keeping float32 rounds the floats as the per-row
    # Sampler's scalar arithmetic does, so both give the same bits.
    table = torch.tensor([
        [p.temperature or 1.0 for p in params], top_k, [p.top_p for p in params],
        [p.min_p for p in params], [p.repetition_penalty for p in params],
        [float(p.greedy) for p in params], noise_row,
    ], dtype=torch.float32, device=device)
    temperature, k, top_p, min_p, penalty, greedy, noise = table.unbind(0)
    return _RowParams(temperature, k.long(), top_p, min_p, penalty, greedy.bool(), noise.long(),
                      max(top_k, default=0), any(p.top_p < 1.0 for p in params),
                      any(p.min_p > 0.0 for p in params), slot)


def _penalize(logits: torch.Tensor, samplers: list[Sampler], histories: list[list[int]],
              penalty: torch.Tensor) -> torch.Tensor:
    """apply_repetition_penalty on every row whose penalty is not 1, through flat (row, id) pairs."""
    vocab = logits.shape[1]
    row_ids: list[int] = []
    token_ids: list[int] = []
    for row, (sampler, history) in enumerate(zip(samplers, histories)):
        if sampler.params.repetition_penalty == 1.0 or not history:
            continue
        seen = set(history)
        # Checked here because an out-of-range index on an accelerator is a device assert, not an error.
        if min(seen) < 0 or max(seen) >= vocab:
            raise ValueError(f"history of row {row} has token ids outside [0, {vocab})")
        row_ids.extend([row] * len(seen))
        token_ids.extend(seen)
    if not token_ids:
        return logits
    pairs = torch.tensor([row_ids, token_ids], dtype=torch.long, device=logits.device)  # [2, N]
    r, t = pairs.unbind(0)
    seen_logits, row_penalty = logits[r, t], penalty[r]
    logits = logits.clone()
    # The ids are distinct within a row, so no pair is written twice.
    logits[r, t] = torch.where(seen_logits > 0, seen_logits / row_penalty, seen_logits * row_penalty)
    return logits


def _filtered_probs(logits: torch.Tensor, rows: _RowParams) -> torch.Tensor:
    """Temperature, top-k, softmax, top-p, min-p: Sampler.distribution's steps, in its order."""
    logits = logits / rows.temperature[:, None]
    if rows.max_k:
        # The k-th largest logit of each row; rows with top-k off keep everything.
        kth = logits.topk(rows.max_k, dim=-1).values.gather(-1, (rows.top_k - 1).clamp(min=0)[:, None])
        kth = kth.masked_fill(rows.top_k[:, None] == 0, -math.inf)
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if rows.any_top_p:
        probs = _top_p_rows(probs, rows.top_p)
    if rows.any_min_p:
        # min_p = 0 gives a threshold of 0, which drops nothing.
        probs = probs.masked_fill(probs < rows.min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs


def _top_p_rows(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """_top_p_filter per row; rows with top_p = 1 come back unchanged, as the Sampler skips them."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays). Rounding
    # can push the mass before the last token to 1, so rows with top_p = 1 are masked out of the rule.
    drop = ((cumulative - sorted_probs) >= top_p[:, None]) & (top_p < 1.0)[:, None]
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def _exponential_noise(samplers: list[Sampler], rows: _RowParams, shape: torch.Size,
                       device: torch.device) -> torch.Tensor:
    """Exp(1) noise [R, V]: one default-generator call for the unseeded rows, the request's own
    generator for each seeded row; greedy rows draw nothing (their noise is never used)."""
    if rows.num_unseeded == len(samplers):
        noise = torch.empty(shape, device=device).exponential_()
    elif rows.num_unseeded:
        shared = torch.empty((rows.num_unseeded, shape[1]), device=device).exponential_()
        noise = shared.index_select(0, rows.noise_row)
    else:
        noise = torch.empty(shape, device=device)
    for row, sampler in enumerate(samplers):
        if not sampler.params.greedy and sampler.params.seed is not None:
            noise[row].exponential_(generator=sampler.generator_on(device))
    return noise.clamp_(min=_TINY)


def exponential_noise(samplers: list[Sampler], shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Exp(1) noise [R, V] for rows drawn by `samplers` (seeded ones from their own generator), for
    other exponential races (speculative verification on the device)."""
    return _exponential_noise(samplers, _row_params(samplers, shape[1], device), shape, device)


def uniforms(samplers: list[Sampler], device: torch.device) -> torch.Tensor:
    """U[0, 1) [R], one per row; seeded rows from their own generator, the rest in one call."""
    u = torch.rand(len(samplers), device=device)
    for row, sampler in enumerate(samplers):
        if sampler.params.seed is not None:
            u[row] = torch.rand((), device=device, generator=sampler.generator_on(device))
    return u

