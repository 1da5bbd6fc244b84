"""A Hugging Face `tokenizer.json` (+ `tokenizer_config.json`) read into a `GGUFVocab`.

`lumen.engine.tokenizer.tokenizer.Tokenizer` then encodes and decodes it exactly as llama.cpp would the same
model's GGUF file. Two families are understood, each only in the forms that encode the same way:

- SentencePiece-style BPE with byte fallback (Llama 1/2, TinyLlama, Mistral): a `Metaspace`
  pre-tokenizer or the legacy `Prepend("▁")` + `Replace(" ", "▁")` normalizer. tokenizer.json has
  no SentencePiece scores, only merges ordered by them; a piece's score is minus the rank of the
  first merge that forms it, which orders pieces as the scores did.
- Byte-level BPE whose pre-tokenizer regex is one llama.cpp knows (GPT-2's, Llama 3's).

Anything else is refused with a ModelLoadError naming the file and the field: a tokenizer that
splits text differently from the model's training would be silently wrong.
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from gguf import TokenType

from lumen.engine.errors import ModelLoadError
from lumen.engine.hf_json import read_json
from lumen.engine.tokenizer.pretokenizers import BPE_PRE, GPT2
from lumen.engine.tokenizer.vocab import GGUFVocab

log = logging.getLogger(__name__)

_SPACE = "\u2581"
# Llama 3's tokenizer.json spells llama.cpp's "llama3" regex with a case-insensitive group.
_HF_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama3",
}
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def read_hf_vocab(directory: Path, vocab_size: int | None = None, model_config: dict | None = None) -> GGUFVocab:
    """The vocabulary of `directory`'s tokenizer.json, padded with unused tokens to `vocab_size`.

    BOS/EOS come from tokenizer_config.json, else from `model_config` (config.json's ids).
    """
    path = directory / "tokenizer.json"
    data = read_json(path, "the tokenizer")
    config_path = directory / "tokenizer_config.json"
    config = read_json(config_path, "the tokenizer") if config_path.exists() else {}
    gen_path = directory / "generation_config.json"
    generation = read_json(gen_path, "the generation config") if gen_path.exists() else {}
    try:
        return _HFVocabReader(data, config, model_config or {}, generation).vocab(vocab_size)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise ModelLoadError(f"{path}: malformed tokenizer ({type(exc).__name__}: {exc})") from exc


class _HFVocabReader:
    def __init__(self, data: dict, config: dict, model_config: dict, generation: dict | None = None) -> None:
        self.data, self.config, self.model_config = data, config, model_config
        self.generation = generation or {}
        self.model = data["model"]
        if self.model.get("type") != "BPE":
            raise ModelLoadError(f"model.type {self.model.get('type')!r} is not supported (only BPE tokenizers)")
        if self.model.get("dropout") not in (None, 0, 0.0):
            raise ModelLoadError("model.dropout is set; BPE dropout cannot reproduce llama.cpp")
        self.spm = bool(self.model.get("byte_fallback"))

    def vocab(self, vocab_size: int | None) -> GGUFVocab:
        tokens, types = self._tokens(vocab_size)
        to_id = {t: i for i, t in enumerate(tokens)}
        raw_merges = self.model.get("merges", [])  # "a b" strings, or [a, b] pairs in newer files
        merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
        pre, add_space_prefix = ("default", self._spm_space_prefix()) if self.spm else (self._bpe_pre(), False)
        bos, eos = self._special_id("bos", to_id), self._special_id("eos", to_id)
        return GGUFVocab(
            model="llama" if self.spm else "gpt2", pre=pre, tokens=tokens,
            scores=_scores_from_merges(tokens, raw_merges) if self.spm else [0.0] * len(tokens),
            types=types, merges=[] if self.spm else merges, bos_id=bos, eos_id=eos,
            unk_id=self._token_id(self._unk_piece(), to_id), pad_id=self._pad_id(to_id),
            add_bos=self._adds("bos", bos, tokens, 0), add_eos=self._adds("eos", eos, tokens, -1),
            add_space_prefix=add_space_prefix, eog_meta_ids=self._eos_ids(len(tokens)),
        )

    def _eos_ids(self, n: int) -> tuple[int, ...]:
        """Every id config.json and generation_config.json name as eos_token_id (Llama 3 lists
        <|end_of_text|>, <|eom_id|> and <|eot_id|>): generation ends on any of them."""
        ids: list[int] = []
        for source in (self.model_config, self.generation):
            value = source.get("eos_token_id")
            for tid in value if isinstance(value, list) else [value]:
                if isinstance(tid, int) and 0 <= tid < n and tid not in ids:
                    ids.append(tid)
        return tuple(ids)

    def _tokens(self, vocab_size: int | None) -> tuple[list[str], list[int]]:
        """Pieces by id and their llama.cpp token types; holes and padding are unused `[PAD{i}]`."""
        pieces: dict[int, tuple[str, int]] = {}
        unk = self._unk_piece()
        for piece, tid in self.model["vocab"].items():
            kind = TokenType.NORMAL
            if piece == f"[PAD{tid}]":  # llama.cpp's padding, carried over by conversions from GGUF
                kind = TokenType.UNUSED
            elif piece == unk:
                kind = TokenType.UNKNOWN
            elif self.spm and _BYTE_PIECE.fullmatch(piece):
                kind = TokenType.BYTE
            pieces[int(tid)] = (piece, kind)
        for added in self.data.get("added_tokens", []):
            kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
            pieces[int(added["id"])] = (added["content"], TokenType.UNKNOWN if added["content"] == unk else kind)
        n = max(pieces, default=-1) + 1
        if n > 2 * len(pieces) + 256:  # mostly holes: a damaged id, not a vocabulary
            raise ModelLoadError(f"token ids go up to {n - 1} for only {len(pieces)} tokens")
        if vocab_size is not None:
            if n > vocab_size:
                raise ModelLoadError(f"the tokenizer has {n} tokens, more than the model's vocab_size {vocab_size}")
            n = vocab_size
        if n == 0 or min(pieces, default=0) < 0:
            raise ModelLoadError("model.vocab is empty or has negative ids")
        entries = [pieces.get(i, (f"[PAD{i}]", TokenType.UNUSED)) for i in range(n)]
        return [p for p, _ in entries], [int(k) for _, k in entries]

    def _spm_space_prefix(self) -> bool:
        """Whether encoding prefixes "▁", after checking that spaces become "▁" and nothing else changes."""
        pre, norm = self.data.get("pre_tokenizer"), self.data.get("normalizer")
        steps = [] if norm is None else norm["normalizers"] if norm.get("type") == "Sequence" else [norm]
        if pre is not None:
            if pre.get("type") != "Metaspace" or pre.get("replacement") != _SPACE or pre.get("split", False) or steps:
                raise ModelLoadError(f"pre_tokenizer {json.dumps(pre)} with normalizer {json.dumps(norm)} is not "
                                     "supported with byte fallback (only Metaspace('▁', split=false) and no "
                                     "normalizer, or the legacy normalizer alone)")
            scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
            return scheme != "never"
        kinds = []
        for step in steps:
            if step.get("type") == "Prepend" and step.get("prepend") == _SPACE:
                kinds.append("prepend")
            elif step.get("type") == "Replace" and step.get("pattern") == {"String": " "} \
                    and step.get("content") == _SPACE:
                kinds.append("replace")
            else:
                raise ModelLoadError(f"normalizer step {json.dumps(step)[:200]} is not supported with byte "
                                     "fallback (only Prepend('▁') and Replace(' ', '▁'), as SentencePiece does)")
        if "replace" not in kinds:
            raise ModelLoadError("no Metaspace pre-tokenizer and no Replace(' ', '▁') normalizer: spaces would "
                                 "not become '▁' as SentencePiece requires")
        return "prepend" in kinds

    def _bpe_pre(self) -> str:
        """llama.cpp's pre-tokenizer name for a byte-level BPE pre_tokenizer."""
        pre = self.data.get("pre_tokenizer") or {}
        steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
        *splits, last = steps or [{}]
        if last.get("type") != "ByteLevel" or last.get("add_prefix_space"):
            raise ModelLoadError(f"pre_tokenizer {json.dumps(pre)[:200]} is not supported (byte-level BPE must end "
                                 "in ByteLevel(add_prefix_space=false); SentencePiece-style needs byte_fallback)")
        for step in splits:
            if step.get("type") != "Split" or step.get("behavior") != "Isolated" or step.get("invert") \
                    or "Regex" not in step.get("pattern", {}):
                raise ModelLoadError(f"pre_tokenizer step {json.dumps(step)[:200]} is not supported "
                                     "(only Split(Regex, 'Isolated') before ByteLevel)")
        regexes = [s["pattern"]["Regex"] for s in splits] + ([GPT2] if last.get("use_regex", True) else [])
        if len(regexes) == 1 and regexes[0] in _HF_REGEXES:
            return _HF_REGEXES[regexes[0]]
        ignore_merges = bool(self.model.get("ignore_merges", False))
        names = [name for name, (known, _, _) in BPE_PRE.items() if known == regexes]
        if not names:
            raise ModelLoadError(f"the pre-tokenizer regexes {regexes} are not ones llama.cpp knows, so its "
                                 "tokenization cannot be reproduced")
        return next((n for n in names if BPE_PRE[n][1] == ignore_merges), names[0])

    def _unk_piece(self) -> str | None:
        return self.model.get("unk_token") or _content(self.config.get("unk_token"))

    def _special_id(self, which: str, to_id: dict[str, int]) -> int | None:
        piece = _content(self.config.get(f"{which}_token"))
        if piece is not None:
            return self._token_id(piece, to_id)
        tid = self.model_config.get(f"{which}_token_id")
        tid = tid[0] if isinstance(tid, list) and tid else tid
        return tid if isinstance(tid, int) and 0 <= tid < len(to_id) else None

    @staticmethod
    def _token_id(piece: Any, to_id: dict[str, int]) -> int | None:
        piece = _content(piece)
        if piece is None:
            return None
        if piece not in to_id:
            raise ModelLoadError(f"special token {piece!r} (tokenizer_config.json or model.unk_token) is not "
                                 "in the vocabulary")
        return to_id[piece]

    def _pad_id(self, to_id: dict[str, int]) -> int | None:
        """Padding is never generated or encoded: an unknown pad token is ignored, as llama.cpp does."""
        piece = _content(self.config.get("pad_token"))
        if piece is not None and piece not in to_id:
            log.warning("ignoring pad_token %r of tokenizer_config.json: not in the vocabulary", piece)
            return None
        return self._token_id(piece, to_id)

    def _adds(self, which: str, tid: int | None, tokens: list[str], at: int) -> bool:
        """tokenizer_config.json's add_{bos,eos}_token, else whether the post-processor adds it."""
        flag = self.config.get(f"add_{which}_token")
        if flag is not None:
            return bool(flag)
        template = _single_template(self.data.get("post_processor"))
        if tid is None or not template:
            return False
        special = template[at].get("SpecialToken")
        return special is not None and special.get("id") == tokens[tid]


def _content(token: Any) -> str | None:
    """A tokenizer_config.json token: a string, or an AddedToken object with "content"."""
    return token.get("content") if isinstance(token, dict) else token


def _single_template(processor: dict | None) -> list[dict]:
    """The `single` template of a TemplateProcessing post-processor, possibly inside a Sequence."""
    if not processor:
        return []
    if processor.get("type") == "Sequence":
        return next((t for p in processor["processors"] if (t := _single_template(p))), [])
    return processor.get("single", []) if processor.get("type") == "TemplateProcessing" else []


def _scores_from_merges(tokens: list[str], merges: list) -> list[float]:
    """SentencePiece scores recovered from merge ranks: merges were sorted by the score of the
    piece they form, so minus the first rank forming a piece orders pieces as their scores did.
    Pieces no merge forms (characters, bytes, specials) score -inf: if two pieces ever join into
    one, they do so last."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        if isinstance(merge, str):  # "a b": split as llama.cpp does, at the first space after the first character
            pos = merge.find(" ", 1)
            merge = [merge[:pos], merge[pos + 1:]] if pos > 0 else [merge]
        rank.setdefault("".join(merge), r)
    return [-float(rank[t]) if t in rank else -math.inf for t in tokens]
