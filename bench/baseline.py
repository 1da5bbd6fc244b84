"""Single-stream baseline: decode tokens/s and time to first token (128-token prompt),
Lumen's engine and llama.cpp side by side, same GGUF file, same threads, one run.

    .venv/bin/python bench/baseline.py [--threads 2] [--decode 64] [--repeats 3]

Models: stories260K (from ../shared/data) and a synthetic TinyLlama-shaped Q8_0 file
written by bench/make_tinyllama.py into bench/results/ if it is not there yet.
Results go to stdout as a Markdown table and to bench/results/baseline.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, SHARED, ensure_tinyllama, fresh_prompts, prompt_ids  # noqa: E402  (sets sys.path)

from lumen.engine.core.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from lumen.engine.core.request import GenerationRequest  # noqa: E402
from lumen.engine.core.scheduler import SchedulerConfig  # noqa: E402
from lumen.engine.sampling.sampler import SamplingParams  # noqa: E402
from lumen.engine.weights.gguf_loader import load_gguf  # noqa: E402


def lumen_run(engine: LLMEngine, prompt: list[int], decode: int) -> tuple[float, float]:
    """(time to first token s, decode tokens/s) for one greedy request."""
    req = GenerationRequest("bench", prompt, decode, SamplingParams(temperature=0), ignore_eos=True)
    start = time.perf_counter()
    engine.add_request(req)
    first = last = None
    n = 0
    while engine.has_unfinished():
        for out in engine.step():
            n += len(out.token_ids)
            last = time.perf_counter()
            first = first or last
    return first - start, (n - 1) / (last - first)


def llamacpp_run(llm, prompt: list[int], decode: int) -> tuple[float, float]:
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    first = time.perf_counter()
    for _ in range(decode - 1):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    last = time.perf_counter()
    return first - start, (decode - 1) / (last - first)


def median_runs(fn, repeats: int) -> dict:
    runs = [fn() for _ in range(repeats)]
    return {"ttft_ms": 1000 * statistics.median(r[0] for r in runs),
            "decode_tok_s": statistics.median(r[1] for r in runs)}


def bench_model(path: Path, args) -> dict:
    loaded = load_gguf(path, dtype=getattr(torch, args.dtype))
    engine = LLMEngine(loaded, EngineConfig(scheduler=SchedulerConfig(max_running=1)))
    vocab, bos = loaded.config.vocab_size, loaded.tokenizer.bos_id or 1
    lumen_run(engine, prompt_ids(vocab, bos, 128), 4)  # warm-up
    prompts = fresh_prompts(vocab, bos, 128)
    row = {"model": path.name, "lumen": median_runs(lambda: lumen_run(engine, next(prompts), args.decode), args.repeats)}
    del engine, loaded
    row["llama.cpp"] = llamacpp_figures(path, vocab, bos, args)
    return row


def llamacpp_figures(path: Path, vocab: int, bos: int, args) -> dict | None:
    """llama.cpp's median TTFT and decode tok/s on the same file and threads; None without llama_cpp."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_threads=args.threads, n_threads_batch=args.threads, n_ctx=512,
                n_batch=512, use_extra_bufts=False, verbose=False)
    llamacpp_run(llm, prompt_ids(vocab, bos, 128), 4)  # warm-up
    prompts = fresh_prompts(vocab, bos, 128)         # the same prompts as Lumen's runs
    return median_runs(lambda: llamacpp_run(llm, next(prompts), args.decode), args.repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--shared", type=Path, default=SHARED)
    p.add_argument("--skip-tinyllama", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = [args.shared / "models" / "stories260K.gguf"]
    if not args.skip_tinyllama:
        models.append(ensure_tinyllama(args.shared / "vocab" / "ggml-vocab-llama-spm.gguf"))
    rows = [bench_model(m, args) for m in models]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "baseline.json").write_text(json.dumps({"args": vars(args) | {"shared": str(args.shared)},
                                                       "rows": rows}, indent=2))
    print(f"| model | Lumen ({args.dtype}) decode tok/s | llama.cpp decode tok/s | ratio | "
          "Lumen TTFT ms | llama.cpp TTFT ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        lu, lc = r["lumen"], r["llama.cpp"] or {"decode_tok_s": float("nan"), "ttft_ms": float("nan")}
        print(f"| {r['model']} | {lu['decode_tok_s']:.1f} | {lc['decode_tok_s']:.1f} | "
              f"{lu['decode_tok_s'] / lc['decode_tok_s']:.2f}x | {lu['ttft_ms']:.1f} | {lc['ttft_ms']:.1f} |")


if __name__ == "__main__":
    main()
