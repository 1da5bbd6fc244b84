"""N-gram prompt lookup: no model, only the request's own tokens.

The proposal continues the most recent earlier occurrence of the longest suffix n-gram
(at most ngram_max tokens, at least ngram_min) found in the prompt or the output so far,
as llama.cpp's lookup decoding and vLLM's `[ngram]` proposer do.
"""
from __future__ import annotations


def find_ngram_match(tokens: list[int], ngram_max: int, ngram_min: int) -> tuple[int, int]:
    """(n, end): the longest suffix n-gram (n <= ngram_max) that also ends earlier, at index
    `end`, its latest such occurrence; (0, -1) when none of at least ngram_min tokens exists."""
    length = len(tokens)
    if length < 2:
        return 0, -1
    last = tokens[-1]
    best_len, best_end = 0, -1
    # Scan candidate ends latest first; a match ends at i (tokens[i] == the last token) and
    # grows backwards. Ties keep the latest, so only a strictly longer match replaces it.
    for i in range(length - 2, -1, -1):
        if tokens[i] != last:
            continue
        n = 1
        while n < ngram_max and n <= i and tokens[i - n] == tokens[length - 1 - n]:
            n += 1
        if n > best_len:
            best_len, best_end = n, i
            if n == ngram_max:
                break
    if best_len < ngram_min:
        return 0, -1
    return best_len, best_end


def propose_ngram(tokens: list[int], k: int, ngram_max: int, ngram_min: int) -> list[int]:
    """Up to k tokens that followed the latest earlier match of the tokens' last n-gram."""
    if k < 1:
        return []
    n, end = find_ngram_match(tokens, ngram_max, ngram_min)
    return tokens[end + 1: end + 1 + k] if n else []
