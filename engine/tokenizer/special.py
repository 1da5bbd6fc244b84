"""Special tokens as llama.cpp treats them: which ones end generation, and splitting their
text out of a prompt.

The end-of-generation (EOG) set is llama.cpp's (llama-vocab.cpp): EOS, the end-of-turn and
end-of-message ids the metadata names, the fill-in-the-middle pad/repo/separator tokens, and
every token whose text is a known end-of-turn marker, so that a ChatML conversion whose EOS is
`<|endoftext|>` still stops at `<|im_end|>`. Splitting (`split_special`) is llama.cpp's
`tokenizer_st_partition`: longest special text first, every occurrence, except inside the
character ranges a caller protects (a chat message's content is never parsed as control).
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence

# Token texts that end generation whatever their metadata says (llama.cpp's list).
EOG_TEXTS = frozenset(
    "<|eot_id|> <|im_end|> <|end|> <|return|> <|call|> <|flush|> <|calls|> <end_of_turn> <|endoftext|> "
    "</s> <|eom_id|> <EOT> _<EOT> [EOT] [EOS] <|end_of_text|> <end_of_utterance> <eos> <turn|> "
    "<|tool_response>".split())
# Fill-in-the-middle pad, repository and file-separator texts: llama.cpp stops on these too.
FIM_EOG_TEXTS = (("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
                 ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
                 ("<|file_sep|>",))


def eog_ids(tokens: Sequence[str], eos_id: int | None, meta_ids: Sequence[int]) -> frozenset[int]:
    """The ids whose generation ends a request (unless it ignores EOS)."""
    by_text: dict[str, int] = {}
    for i, text in enumerate(tokens):
        by_text[text] = i  # later duplicates win, as in llama.cpp's token_to_id
    ids = {i for t, i in by_text.items() if t in EOG_TEXTS}
    ids |= {by_text[t] for group in FIM_EOG_TEXTS for t in group if t in by_text}
    ids |= {i for i in (eos_id, *meta_ids) if i is not None}
    texts = {tokens[i] for i in ids}
    # gpt-oss and solar-open end a message with <|end|> but a turn with <|return|>/<|call|>.
    if "<|end|>" in texts and texts & {"<|call|>", "<|calls|>"} and texts & {"<|return|>", "<|flush|>"}:
        ids.discard(by_text["<|end|>"])
    # Gemma 4 and PaddleOCR use </s> inside a turn.
    if "<|tool_response>" in texts and "</s>" in texts and by_text["</s>"] != eos_id:
        ids.discard(by_text["</s>"])
    return frozenset(ids)


def _overlaps(start: int, end: int, spans: Sequence[tuple[int, int]], starts: list[int]) -> bool:
    """Whether [start, end) meets one of the sorted, disjoint `spans` (`starts`: their starts)."""
    k = bisect.bisect_right(starts, start) - 1
    if k >= 0 and spans[k][1] > start:
        return True
    return k + 1 < len(spans) and spans[k + 1][0] < end


def split_special(text: str, specials: Sequence[tuple[str, int]], protected: Sequence[tuple[int, int]] = (),
                  always: frozenset[int] = frozenset()) -> list[str | int]:
    """`text` as plain-text pieces and the ids of the special tokens found in it.

    specials: (text, id) pairs, longest text first; protected: sorted, disjoint [start, end)
    character ranges in which no special token but those in `always` (the user-defined ones,
    which plain text splits out too) is recognised: an occurrence that overlaps one stays text.
    Plain text around a protected range is not cut at its edges, so it tokenizes as one piece,
    exactly as it would without protection."""
    starts = [a for a, _ in protected]
    parts: list[tuple[int, int] | int] = [(0, len(text))] if text else []
    for piece, tid in specials:
        if piece not in text:
            continue
        guarded = bool(protected) and tid not in always
        out: list[tuple[int, int] | int] = []
        for part in parts:
            if isinstance(part, int):
                out.append(part)
                continue
            start, end = part
            pos = text.find(piece, start, end)
            while pos >= 0:
                if not (guarded and _overlaps(pos, pos + len(piece), protected, starts)):
                    if pos > start:
                        out.append((start, pos))
                    out.append(tid)
                    start = pos + len(piece)
                    pos = text.find(piece, start, end)
                else:
                    pos = text.find(piece, pos + 1, end)
            if start < end:
                out.append((start, end))
        parts = out
    return [p if isinstance(p, int) else text[p[0]:p[1]] for p in parts]
