"""Prefix caching: time to first token of a request sharing a 512-token prefix with a finished one.

    .venv/bin/python bench/prefix_cache.py [--model PATH] [--prefix 512] [--repeats 3] [--threads 2]

Each repeat uses a fresh engine: request A (prefix + suffix A) runs cold and finishes;
request B (same prefix + suffix B) then finds the prefix's blocks in the cache. Also
runs B with prefix caching off, as the side-by-side cold figure for the same prompt.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import ensure_tinyllama, prompt_ids  # noqa: E402  (sets sys.path)

from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
from lumen.engine.core.request import GenerationRequest, RequestOutput
from lumen.engine.sampling.sampler import SamplingParams
from lumen.engine.weights.gguf_loader import load_gguf


def first_token(engine: LLMEngine, rid: str, prompt: list[int]) -> tuple[float, RequestOutput]:
    engine.add_request(GenerationRequest(rid, prompt, 2, SamplingParams(temperature=0), ignore_eos=True))
    start = time.perf_counter()
    ttft, first = None, None
    while engine.has_unfinished():
        for out in engine.step():
            if first is None:
                ttft, first = time.perf_counter() - start, out
    return ttft, first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prefix", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_gguf(args.model or ensure_tinyllama(), dtype=getattr(torch, args.dtype))
    vocab, bos = loaded.config.vocab_size, loaded.tokenizer.bos_id or 1
    prefix = prompt_ids(vocab, bos, args.prefix, seed=1)
    a, b = prefix + prompt_ids(vocab, 5, 16, seed=2)[1:], prefix + prompt_ids(vocab, 6, 16, seed=3)[1:]
    cold, warm, uncached, cached_tokens = [], [], [], 0
    for i in range(args.repeats):
        engine = LLMEngine(loaded, EngineConfig(block_size=16))
        cold.append(first_token(engine, f"a{i}", a)[0])
        ttft, out = first_token(engine, f"b{i}", b)
        warm.append(ttft)
        cached_tokens = out.cached_tokens
        off = LLMEngine(loaded, EngineConfig(block_size=16, prefix_caching=False))
        uncached.append(first_token(off, f"c{i}", b)[0])
    med = statistics.median
    print(f"prompt B: {len(b)} tokens, {cached_tokens} cached")
    print("| request | TTFT ms (median) |")
    print("|---|---|")
    print(f"| A, cold ({len(a)} tokens) | {1000 * med(cold):.1f} |")
    print(f"| B, prefix cached ({cached_tokens} of {len(b)} tokens) | {1000 * med(warm):.1f} |")
    print(f"| B, prefix caching off | {1000 * med(uncached):.1f} |")
    print(f"speed-up of B from the cache: {med(uncached) / med(warm):.1f}x")


if __name__ == "__main__":
    main()
