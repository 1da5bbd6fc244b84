"""A model's vocabulary as llama.cpp reads it from GGUF metadata (`tokenizer.ggml.*`).

`GGUFVocab` is what the tokenizer is built from, whether the vocabulary came from a GGUF file
or from a Hugging Face tokenizer.json restated in the same terms (hf_vocab.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import gguf

from lumen.engine.tokenizer.pretokenizers import BPE_PRE, DEFAULT_SPEC

log = logging.getLogger(__name__)

_T = gguf.TokenType
_NO_ID = 0xFFFFFFFF  # how GGUF files spell "no such token"
_K = "tokenizer.ggml."


@dataclass(slots=True)
class GGUFVocab:
    """The tokenizer metadata of one GGUF file, with llama.cpp's defaults filled in."""

    model: str
    pre: str
    tokens: list[str]
    scores: list[float]
    types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    # Tokens the metadata names as ending generation besides EOS: end of turn, end of message,
    # and the fill-in-the-middle pad/repo/separator tokens (llama.cpp's EOG sources).
    eog_meta_ids: tuple[int, ...] = ()

    @classmethod
    def from_reader(cls, reader: gguf.GGUFReader) -> GGUFVocab:
        def get(key: str, default: Any = None) -> Any:
            field = reader.get_field(key)
            return default if field is None else field.contents()

        model = get(_K + "model")
        if model is None:
            raise ValueError("the GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
        if model not in ("llama", "gpt2"):
            raise ValueError(f"unsupported tokenizer.ggml.model {model!r}; "
                             "Lumen supports 'llama' (SentencePiece) and 'gpt2' (byte-level BPE)")
        # llama.cpp renames empty pieces so that every token has a distinct, non-empty text.
        tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(get(_K + "tokens", []))]
        if not (n := len(tokens)):
            raise ValueError("the GGUF file has no tokenizer.ggml.tokens vocabulary")
        scores, types = get(_K + "scores", [0.0] * n), get(_K + "token_type", [int(_T.NORMAL)] * n)
        if len(scores) != n or len(types) != n:
            raise ValueError(f"tokenizer.ggml.scores/token_type have {len(scores)}/{len(types)} "
                             f"entries for {n} tokens; the file is damaged")
        pre = get(_K + "pre", "default")
        spm = model == "llama"
        defaults = (1, 2, 0) if spm else (11, 11, None)  # llama.cpp's defaults when keys are absent

        def special(key: str, default: int | None) -> int | None:
            value = get(_K + key, default)
            if value is None or value == _NO_ID:
                return None
            if not 0 <= value < n:
                log.warning("ignoring %s%s = %d: outside the %d-token vocabulary", _K, key, value, n)
                return None
            return int(value)

        return cls(
            model=model, pre=pre, tokens=tokens, scores=[float(s) for s in scores],
            types=[int(t) for t in types], merges=get(_K + "merges", []),
            bos_id=special("bos_token_id", defaults[0]), eos_id=special("eos_token_id", defaults[1]),
            unk_id=special("unknown_token_id", defaults[2]), pad_id=special("padding_token_id", None),
            add_bos=bool(get(_K + "add_bos_token", spm or BPE_PRE.get(pre, DEFAULT_SPEC)[2])),
            add_eos=bool(get(_K + "add_eos_token", False)),
            add_space_prefix=bool(get(_K + "add_space_prefix", spm)),
            eog_meta_ids=tuple(t for key in ("eot_token_id", "eom_token_id", "fim_pad_token_id",
                                             "fim_rep_token_id", "fim_sep_token_id")
                               if (t := special(key, None)) is not None),
        )
