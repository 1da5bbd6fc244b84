"""The byte-level BPE pre-tokenizers llama.cpp knows, by `tokenizer.ggml.pre` name.

Each name maps to (regexes, ignore_merges, default add_bos). The regexes are copied from
llama.cpp's llama-vocab.cpp; lumen.engine.tokenizer.tokenizer applies each list in turn to the pieces of the
previous one, and lumen.engine.tokenizer.hf_vocab names a Hugging Face tokenizer's pre-tokenizer by them.
"""
from __future__ import annotations

# Each list is applied in turn to the pieces of the previous one, keeping matches and gaps
# as separate pieces.
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
# DeepSeek's cased-letter class. Python (not the regex engine, which has no \u escapes)
# expands the escapes; they are escapes because several of these characters (U+1F7D,
# U+1FBE, U+2126, U+212A, ...) do not survive Unicode normalisation of source text.
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
    "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd"
    "\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d"
    "\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4"
    "\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec"
    "\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b"
    "\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787"
    "\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_DEEPSEEK_LLM = [
    "[\r\n]",
    r"\s?[" + _DEEPSEEK_LETTERS + "]+",
    # llama.cpp turns U+3000 into a plain whitespace before matching, so its class starts at U+3001.
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3001-\u3002]+",
    r"\s+\z",  # std::regex `$` is end of piece; Oniguruma's `$` would also match before "\n"
    _CJK,
    r"\p{N}+",
]
_DEEPSEEK_CODER = ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"]
_FALCON = [r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"]
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"]
_STARCODER = [r"\p{N}", GPT2]
_BLOOM = [r" ?[^(\s|.,!?…。，、।۔،)]+"]

# tokenizer.ggml.pre -> (regexes, ignore_merges, default add_bos); names as llama.cpp knows them.
BPE_PRE: dict[str, tuple[list[str], bool, bool]] = {"default": (_DEFAULT, False, False)}
for _names, _spec in (
    ("gpt-2 gpt2 phi-2 jina-es jina-de gigachat jina-v1-en jina-v2-es jina-v2-de jina-v2-code "
     "roberta-bpe a.x-4.0 mellum modern-bert exaone4 mpt olmo jais", ([GPT2], False, False)),
    ("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2", ([_LLAMA3], True, True)),
    ("dbrx smaug-bpe chatglm-bpe", ([_LLAMA3], False, False)),
    ("glm4 glm5", ([_LLAMA3], True, False)),
    ("qwen2 deepseek-r1-qwen stablelm2 megrez", ([_QWEN2], False, False)),
    ("deepseek-llm", (_DEEPSEEK_LLM, False, False)),
    ("deepseek-coder", (_DEEPSEEK_CODER, False, False)),
    ("falcon", (_FALCON, False, False)),
    ("starcoder refact command-r smollm codeshell exaone minerva-7b", (_STARCODER, False, False)),
    ("bloom poro-chat gpt3-finnish", (_BLOOM, False, False)),
):
    BPE_PRE.update(dict.fromkeys(_names.split(), _spec))
DEFAULT_SPEC = BPE_PRE["default"]
