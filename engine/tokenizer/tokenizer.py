"""Text <-> token ids for GGUF models, reproducing llama.cpp's tokenizer exactly.

The vocabulary comes from a GGUF file's `tokenizer.ggml.*` metadata (or from a Hugging Face
tokenizer.json restated in those terms by `hf_vocab`): "llama" models are
SentencePiece-style (scores, byte-fallback `<0xNN>` tokens), "gpt2" models are byte-level BPE
(merges plus a pre-tokenizer named by `tokenizer.ggml.pre`). Encoding is llama.cpp's: by
default (`parse_special=False`) text such as "<s>" is tokenized as ordinary text and only
user-defined tokens are split out first; with `parse_special=True` control tokens' text
becomes the control token, except inside `protected` ranges (a chat message's content).
Decoding works on bytes (`token_bytes`) so that the streaming detokenizer reproduces it
exactly. `eog_ids` is the set of tokens that end generation (special.eog_ids).
"""

from __future__ import annotations

import heapq
import logging
import operator
from pathlib import Path

import gguf
from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from lumen.engine.tokenizer.hf_vocab import read_hf_vocab
from lumen.engine.tokenizer.pretokenizers import BPE_PRE, DEFAULT_SPEC
from lumen.engine.tokenizer.special import EOG_TEXTS, eog_ids, split_special
from lumen.engine.tokenizer.vocab import GGUFVocab

log = logging.getLogger(__name__)

_T = gguf.TokenType


# llama.cpp makes the end-of-generation texts (and two end-of-turn texts it detects as EOT)
# CONTROL tokens whatever the file says, so they decode to "" and are never split out of raw
# text (e.g. Phi-3's user-defined "</s>").
_CONTROL_TEXTS = EOG_TEXTS | {"<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~["}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level map reversed: printable bytes stand for themselves, the other 68
    bytes were moved, in byte order, to U+0100 and up."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(0x100 + k): b for k, b in enumerate(moved)}


_BYTE_DECODER = _byte_decoder()


def _token_bytes(text: str, kind: int, spm: bool) -> bytes:
    """Bytes a token adds to decoded text (llama.cpp's token_to_piece with special=false)."""
    if kind == _T.USER_DEFINED:
        return text.encode("utf-8")
    if kind == _T.BYTE:  # "<0xNN>"
        return bytes([int(text[3:5], 16)])
    if kind != _T.NORMAL:
        return b""  # control, unknown, unused and undefined tokens print nothing
    if spm:
        return text.replace("\u2581", " ").encode("utf-8")
    # Byte-level BPE: undo GPT-2's byte map. A character outside it cannot come from
    # byte-level encoding; keep it as UTF-8 rather than llama.cpp's "[UNK_BYTE_...]" marker.
    return b"".join(bytes([_BYTE_DECODER[c]]) if c in _BYTE_DECODER else c.encode("utf-8") for c in text)


def _spm_merge(text: str, token_to_id: dict[str, int], scores: list[float]) -> list[str]:
    """llama.cpp's SentencePiece merge: repeatedly join the adjacent pair that forms the
    highest-scoring vocabulary token (leftmost on ties), starting from single characters.

    Written by hand because this greedy score-ordered merge (no merge table) is not a model
    the `tokenizers` library offers; converting scores to BPE merges changes tie-breaking.
    """
    syms = list(text)
    n = len(syms)
    prev = list(range(-1, n - 1))
    nxt = [*range(1, n), -1]
    heap: list[tuple[float, int, int, int]] = []

    def push(left: int, right: int) -> None:
        if left < 0 or right < 0:
            return
        joined = syms[left] + syms[right]
        tid = token_to_id.get(joined)
        if tid is not None:
            heapq.heappush(heap, (-scores[tid], left, right, len(joined)))

    for i in range(1, n):
        push(i - 1, i)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        # Stale: a side was merged away or grew since queued (symbols only grow, so lengths tell).
        if not syms[left] or not syms[right] or len(syms[left]) + len(syms[right]) != size:
            continue
        syms[left] += syms[right]
        syms[right] = ""
        nxt[left] = nxt[right]
        if nxt[left] >= 0:
            prev[nxt[left]] = left
        push(prev[left], left)
        push(left, nxt[left])
    return [s for s in syms if s]


def _build_bpe(vocab: GGUFVocab, token_to_id: dict[str, int]) -> HFTokenizer:
    """A `tokenizers` BPE with llama.cpp's pre-tokenizer for `vocab.pre`."""
    spec = BPE_PRE.get(vocab.pre)
    if spec is None:
        log.warning("unknown tokenizer.ggml.pre %r; using llama.cpp's 'default' pre-tokenizer", vocab.pre)
        spec = DEFAULT_SPEC
    regexes, ignore_merges, _ = spec
    merges: dict[tuple[str, str], None] = {}
    for line in vocab.merges:
        pos = line.find(" ", 1)  # llama.cpp splits at the first space after the first character
        pair = (line[:pos], line[pos + 1:])
        # The library rejects merges whose parts or result are not tokens; llama.cpp could
        # never emit such a merge's result as one token either. Earlier ranks win, as in llama.cpp.
        if pos > 0 and pair not in merges and pair[0] in token_to_id and pair[1] in token_to_id \
                and pair[0] + pair[1] in token_to_id:
            merges[pair] = None
    hf = HFTokenizer(models.BPE(vocab=token_to_id, merges=list(merges), ignore_merges=ignore_merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return hf


class Tokenizer:
    """A GGUF vocabulary's tokenizer: `encode` text to ids, `decode` ids to text."""

    def __init__(self, vocab: GGUFVocab) -> None:
        self._vocab = vocab
        types = [_T.CONTROL if t in _CONTROL_TEXTS else k for t, k in zip(vocab.tokens, vocab.types)]
        # Later duplicates win, as in llama.cpp's token_to_id map.
        self._token_to_id = {t: i for i, t in enumerate(vocab.tokens)}
        spm = vocab.model == "llama"
        self._bytes = [_token_bytes(t, k, spm) for t, k in zip(vocab.tokens, types)]
        self._max_token_bytes = max(4, max(map(len, self._bytes), default=0))   # per request: computed once
        def longest_first(kinds: tuple[int, ...]) -> list[tuple[str, int]]:
            found = [(vocab.tokens[i], i) for i, k in enumerate(types) if k in kinds]
            return sorted(found, key=lambda p: -len(p[0].encode()))

        self._user_defined = longest_first((_T.USER_DEFINED,))
        # What parse_special splits out (llama.cpp's special-token cache): control, user-defined, unknown.
        self._specials = longest_first((_T.CONTROL, _T.USER_DEFINED, _T.UNKNOWN))
        self._user_defined_ids = frozenset(i for _, i in self._user_defined)
        self._eog_ids = eog_ids(vocab.tokens, vocab.eos_id, vocab.eog_meta_ids)
        self._byte_ids = [self._byte_token(b) for b in range(256)] if spm else []
        self._bpe = None if spm else _build_bpe(vocab, self._token_to_id)

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Read the tokenizer of a GGUF file (a model or a vocab-only file)."""
        return cls.from_reader(gguf.GGUFReader(path))

    @classmethod
    def from_reader(cls, reader: gguf.GGUFReader) -> Tokenizer:
        """Build from an already open reader, so a model loader parses the file once."""
        return cls(GGUFVocab.from_reader(reader))

    @classmethod
    def from_hf_dir(cls, path: str | Path, vocab_size: int | None = None,
                    model_config: dict | None = None) -> Tokenizer:
        """Read a Hugging Face model directory's tokenizer.json and tokenizer_config.json.

        `vocab_size` pads the vocabulary with unused tokens up to the model's embedding rows;
        `model_config` (config.json) supplies BOS/EOS ids that tokenizer_config.json leaves out.
        """
        return cls(read_hf_vocab(Path(path), vocab_size, model_config))

    @property
    def max_token_bytes(self) -> int:
        """Bytes of text one token can stand for: the longest token's, and at least a whole UTF-8
        character (an unknown one may become a single token). A text of B bytes needs at least
        B / max_token_bytes tokens."""
        return self._max_token_bytes

    @property
    def vocab_size(self) -> int:
        return len(self._vocab.tokens)

    @property
    def model(self) -> str:
        """"llama" (SentencePiece-style) or "gpt2" (byte-level BPE)."""
        return self._vocab.model

    @property
    def bos_id(self) -> int | None:
        return self._vocab.bos_id

    @property
    def eos_id(self) -> int | None:
        return self._vocab.eos_id

    @property
    def unk_id(self) -> int | None:
        return self._vocab.unk_id

    @property
    def pad_id(self) -> int | None:
        return self._vocab.pad_id

    @property
    def eog_ids(self) -> frozenset[int]:
        """Tokens that end generation: EOS, end of turn or message, and llama.cpp's known markers."""
        return self._eog_ids

    @property
    def add_bos(self) -> bool:
        return self._vocab.add_bos

    @property
    def add_eos(self) -> bool:
        return self._vocab.add_eos

    @property
    def add_space_prefix(self) -> bool:
        """True when encoding prefixes a space, so decoding drops the first leading space."""
        return self._vocab.add_space_prefix

    @property
    def pieces(self) -> list[str]:
        """The raw vocabulary strings, indexed by token id."""
        return self._vocab.tokens

    def piece(self, token_id: int) -> str:
        return self._vocab.tokens[self._check_id(token_id)]

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes this token contributes to decoded text (b"" for control tokens)."""
        return self._bytes[self._check_id(token_id)]

    def encode(self, text: str, add_special_tokens: bool = False, parse_special: bool = False,
               protected: list[tuple[int, int]] | tuple[tuple[int, int], ...] = ()) -> list[int]:
        """Token ids of `text`; BOS/EOS are added only if asked and the model wants them.

        parse_special: special-token text becomes the token, except where it overlaps one of
        the sorted, disjoint `protected` [start, end) character ranges."""
        ids: list[int] = []
        if add_special_tokens and self.add_bos:
            ids.append(_required(self.bos_id, "BOS"))
        prev_special = True
        if parse_special:
            parts = split_special(text, self._specials, protected, self._user_defined_ids)
        else:  # user-defined tokens are split out of plain text too, as llama.cpp does
            parts = split_special(text, self._user_defined)
        for part in parts:
            if isinstance(part, int):
                ids.append(part)
                prev_special = True
            elif self._bpe is not None:
                ids.extend(self._bpe.encode(part, add_special_tokens=False).ids)
            else:
                # SentencePiece's dummy prefix goes at the start and after every special token.
                prefix = " " if self.add_space_prefix and prev_special else ""
                ids.extend(self._encode_spm(prefix + part))
                prev_special = False
        if add_special_tokens and self.add_eos:
            ids.append(_required(self.eos_id, "EOS"))
        return ids

    def find_special(self, text: str) -> str | None:
        """The first control or unknown token text found in `text` (what parse_special would turn
        into a control token where plain encoding keeps characters), or None."""
        return next((piece for piece, tid in self._specials
                     if tid not in self._user_defined_ids and piece in text), None)

    def _encode_spm(self, text: str) -> list[int]:
        ids: list[int] = []
        for sym in _spm_merge(text.replace(" ", "\u2581"), self._token_to_id, self._vocab.scores):
            tid = self._token_to_id.get(sym)
            if tid is not None:
                ids.append(tid)
            else:  # byte fallback: one token per UTF-8 byte
                ids.extend(self._byte_ids[b] for b in sym.encode("utf-8"))
        if -1 in ids:
            raise ValueError(f"cannot encode {text!r}: the vocabulary lacks a byte-fallback token "
                             "for one of its bytes and has no unknown token")
        return ids

    def _byte_token(self, byte: int) -> int:
        tid = self._token_to_id.get(f"<0x{byte:02X}>")
        if tid is None and byte < 0x80:
            tid = self._token_to_id.get(chr(byte))
        tid = self._vocab.unk_id if tid is None else tid
        return -1 if tid is None else tid

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The bytes of `ids`, with SentencePiece's leading-space rule applied.

        With `add_space_prefix`, the first token that produces any bytes loses one leading
        space; tokens before it that print nothing (BOS, other control tokens) are skipped,
        as SentencePiece does. No "clean up tokenization spaces" pass is applied, so the
        result is lossless and a streaming decode can reproduce it exactly.
        """
        out = bytearray()
        strip = self.add_space_prefix
        for tid in ids:
            data = self.token_bytes(tid)
            if strip and data:
                strip = False
                data = data[1:] if data[:1] == b" " else data
            out += data
        return bytes(out)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def _check_id(self, token_id: int) -> int:
        tid = operator.index(token_id)
        if not 0 <= tid < len(self._bytes):
            raise ValueError(f"token id {tid} is out of range for a vocabulary of {len(self._bytes)} tokens")
        return tid


def _required(tid: int | None, what: str) -> int:
    if tid is None:
        raise ValueError(f"the model asks for a {what} token but its vocabulary defines none")
    return tid
