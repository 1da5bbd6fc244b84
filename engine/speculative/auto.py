"""SpecMethod.AUTO: n-gram drafts only where the request's own tokens offer a match, each as
long as its match makes it likely to be accepted, and within a batch only what pays.

Decided at every step, per decoding request (never once at admission: a summary of a
passage starts paraphrasing and then copies a sentence, so matches come and go):
- No earlier occurrence of the request's last token in its prompt or output: no draft. The
  step verifies one row, exactly a plain decode step (no proposer model runs, ever).
- A match of n tokens (the longest suffix n-gram, n <= ngram_max, that occurred before)
  drafts `auto_draft_length(n, k)` tokens of what followed it: 1 for a one-token match,
  up to SHORT_MATCH_TOKENS for a shorter match than ngram_max, the request's full k for a
  match of ngram_max tokens. Along SmolLM2-135M-Instruct's greedy answers to the chat
  prompts of bench/spec_prompts.json, the lookup's next token was the model's 23% of the
  time after a one-token match, 50% after 2 tokens, 69% after 3 and 89% after 4, and its
  next 8 tokens were all the model's 2%, 11%, 18% and 56% of the time (BENCHMARKS.md,
  issue 17: `bench/speculative_chat.py --analysis`).
- Several decoding requests in a step: their drafts are cut, longest first, until the step
  verifies at most `SpeculativeConfig.auto_batch_rows` rows (one per request plus the
  drafted tokens). On the CPU kernels a forward of 4 rows costs about 1.4 times one row and
  8 rows 2.1 times: a lone request gains from 8 rows, while a batch already fills the rows
  that come cheap, and longer drafts there cost more than they save.
Nothing here runs a model or changes what is accepted: verification keeps greedy output
exactly the target's, whatever is drafted.
"""
from __future__ import annotations

from lumen.engine.core.sequence import Sequence
from lumen.engine.speculative.draft import Draft
from lumen.engine.speculative.ngram import find_ngram_match

# Draft tokens after a match shorter than ngram_max (and longer than one token): 3 tokens
# make 4 verified rows, the most that the CPU kernels compute in one tile of rows.
SHORT_MATCH_TOKENS = 3


def auto_draft_length(match_len: int, k: int, ngram_max: int) -> int:
    """How many tokens to draft after a match of `match_len` tokens, for a request whose
    draft length is at most k (0: no match, no draft)."""
    if match_len <= 0:
        return 0
    if match_len == 1:
        return 1
    if match_len < ngram_max:
        return min(k, SHORT_MATCH_TOKENS)
    return k


def propose_auto(items: list[tuple[Sequence, int]], num_decoding: int, ngram_max: int, ngram_min: int,
                 batch_rows: int) -> None:
    """Set each (sequence, k)'s draft (or None); num_decoding: the step's decoding requests."""
    drafts: list[list[int]] = []
    for seq, k in items:
        tokens = seq.token_ids
        n, end = find_ngram_match(tokens, ngram_max, ngram_min)
        drafts.append(tokens[end + 1: end + 1 + auto_draft_length(n, k, ngram_max)])
    if num_decoding > 1:
        cut_to_rows(drafts, max(0, batch_rows - num_decoding))
    for (seq, _), tokens in zip(items, drafts):
        seq.draft = Draft(tokens) if tokens else None


def cut_to_rows(drafts: list[list[int]], budget: int) -> None:
    """Shorten the longest drafts, one token at a time, until they hold at most `budget`
    tokens in all (in place)."""
    excess = sum(len(d) for d in drafts) - budget
    while excess > 0:
        longest = max(drafts, key=len)
        del longest[-1]
        excess -= 1
