"""Shared by the benchmarks: the synthetic TinyLlama-shaped model and prompts."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SHARED = REPO.parent / "shared" / "data"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def ensure_tinyllama(vocab: Path = SHARED / "vocab" / "ggml-vocab-llama-spm.gguf", qtype: str = "Q8_0") -> Path:
    """dim 2048, 22 layers, 32/4 heads, ffn 5632, the Llama 2 vocabulary, random weights stored as
    `qtype` (a type lumen.engine.demo.synthetic writes: Q8_0, F16, BF16, ...)."""
    path = RESULTS / f"tinyllama-synthetic-{qtype.lower()}.gguf"
    if not path.exists():
        from gguf import GGMLQuantizationType

        from lumen.engine.demo.synthetic import TINYLLAMA, VocabMetadata, write_synthetic_llama
        RESULTS.mkdir(parents=True, exist_ok=True)
        write_synthetic_llama(path, TINYLLAMA, VocabMetadata.from_gguf(vocab), qtype=GGMLQuantizationType[qtype],
                              seed=0, name="tinyllama-synthetic")
    return path


def prompt_ids(vocab: int, bos: int, n: int, seed: int = 0) -> list[int]:
    """BOS + n - 1 seeded random ids (skipping the first special ids)."""
    rng = np.random.default_rng(seed)
    return [bos] + rng.integers(3, vocab, size=n - 1).tolist()


def fresh_prompts(vocab: int, bos: int, n: int):
    """An endless run of distinct n-token prompts (seeds 1000, 1001, ...): a timed request must not
    find its prompt in the prefix cache (a repeated prompt's prefill is mostly a cache hit: 128
    SmolLM2 tokens took 33 ms cached against 180 ms computed)."""
    seed = 1000
    while True:
        yield prompt_ids(vocab, bos, n, seed=seed)
        seed += 1

