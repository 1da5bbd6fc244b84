"""Log-probabilities of chosen tokens and their top alternatives.

Reported from the model's raw distribution (before temperature and filters), as vLLM does by
default: they describe the model, not the sampler.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, token_ids: list[int], top_n: int) -> list[TokenLogprob]:
    """logits [n, vocab] fp32 -> each row's logprob of token_ids[row] and its top-n alternatives."""
    if not token_ids:
        return []
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(token_ids, dtype=torch.long).unsqueeze(1)).squeeze(1).tolist()
    if top_n:
        values, indices = torch.topk(logp, top_n, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        tops = [[] for _ in token_ids]
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(token_ids, chosen, tops)]


def logprob_tensors(logits: torch.Tensor, tokens: torch.Tensor, top_n: int) -> list[torch.Tensor]:
    """token_logprobs for rows on a device, as tensors left there (the caller reads them with the
    sampled tokens, in one synchronisation): each row's logprob of tokens[row] [R], and its top_n
    logprobs [R, top_n] and their ids [R, top_n] (as float32: exact below 2^24) when top_n > 0."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = [logp.gather(1, tokens.view(-1, 1)).view(-1)]
    if top_n:
        values, indices = torch.topk(logp, top_n, dim=-1)
        out += [values.flatten(), indices.to(torch.float32).flatten()]
    return out


def unpack_logprobs(tokens: list[int], flat: list[float], top_ns: list[int], top_n: int) -> list[TokenLogprob]:
    """The TokenLogprobs of logprob_tensors' tensors, read to the host as one flat list; row i
    keeps its own top_ns[i] <= top_n alternatives."""
    rows = len(tokens)
    chosen, values, ids = flat[:rows], flat[rows: rows + rows * top_n], flat[rows + rows * top_n:]
    return [TokenLogprob(token, chosen[i], [(int(ids[i * top_n + j]), values[i * top_n + j])
                                             for j in range(top_ns[i])])
            for i, token in enumerate(tokens)]
