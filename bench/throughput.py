"""Aggregate decode throughput of continuous batching at 1..32 concurrent streams (engine, in-process).

    .venv/bin/python bench/throughput.py [--model PATH | --synthetic-type F16] [--streams 1 2 4 8 16 32]
                                         [--tokens 32] [--threads 2]

Each run submits N greedy requests (different 32-token prompts) at once and measures
decode tokens/s over the steps in which every running request decodes one token (pure
decode steps: batch size N, N tokens), so prefill does not blur the figure.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from common import RESULTS, ensure_tinyllama, prompt_ids  # noqa: E402  (sets sys.path)

from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
from lumen.engine.core.request import GenerationRequest
from lumen.engine.core.scheduler import SchedulerConfig
from lumen.engine.sampling.sampler import SamplingParams
from lumen.engine.weights.gguf_loader import load_gguf


def run(loaded, streams: int, tokens: int) -> dict:
    steps = []
    config = EngineConfig(scheduler=SchedulerConfig(max_running=max(streams, 1), max_tokens_per_step=2048))
    engine = LLMEngine(loaded, config, on_step=steps.append)
    vocab, bos = loaded.config.vocab_size, loaded.tokenizer.bos_id or 1
    for i in range(streams):
        engine.add_request(GenerationRequest(str(i), prompt_ids(vocab, bos, 32, seed=i), tokens,
                                             SamplingParams(temperature=0), ignore_eos=True))
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    wall = time.perf_counter() - start
    decode = [s for s in steps if s.batch_size == streams and s.num_tokens == streams]
    decode_s = sum(s.duration_s for s in decode)
    return {"streams": streams, "decode_steps": len(decode),
            "decode_tok_s": streams * len(decode) / decode_s, "wall_s": wall,
            "end_to_end_tok_s": streams * tokens / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: the synthetic TinyLlama-shaped model)")
    p.add_argument("--synthetic-type", default="Q8_0", help="weight type of the synthetic model (Q8_0, F16, ...)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_gguf(args.model or ensure_tinyllama(qtype=args.synthetic_type), dtype=getattr(torch, args.dtype))
    run(loaded, 2, 4)  # warm-up
    rows = [run(loaded, n, args.tokens) for n in args.streams]
    single = rows[0]["decode_tok_s"] if args.streams[0] == 1 else None
    print("| streams | decode tok/s | x single stream | end-to-end tok/s (with prefill) |")
    print("|---|---|---|---|")
    for r in rows:
        ratio = f"{r['decode_tok_s'] / single:.2f}x" if single else "-"
        print(f"| {r['streams']} | {r['decode_tok_s']:.1f} | {ratio} | {r['end_to_end_tok_s']:.1f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
