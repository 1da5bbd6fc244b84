"""Quantized weights on CPU: Lumen against llama.cpp on the same files, same 2 threads, one run.

    .venv/bin/python bench/quant_cpu.py [--types Q8_0 Q4_0 Q4_K_M Q6_K] [--decode 64] [--streams 16]

Files: the synthetic TinyLlama-shaped model (bench/make_tinyllama.py's shape and vocabulary)
written once as F16 into bench/results/, then quantized by llama.cpp's own quantizer
(`llama_model_quantize`, as `llama-quantize` does) into each type, so both engines read the very
same bytes. Per file: single-stream prefill tokens/s (a 128-token prompt: 128 / time to first
token) and decode tokens/s (median of --repeats greedy runs), for Lumen's engine and for
llama.cpp (llama-cpp-python); then Lumen's aggregate decode tokens/s with --streams concurrent
requests (llama.cpp's bound: its single-stream figure times the streams). Peak memory is
measured separately by `--memory FILE`, in a fresh process: VmHWM (peak resident set) while
loading and serving 16 streams, against the file size plus the KV pool bytes that were touched.
Results: a Markdown table on stdout and bench/results/quant_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from baseline import llamacpp_figures, lumen_run, median_runs  # noqa: E402
from common import RESULTS, ensure_tinyllama, fresh_prompts, prompt_ids  # noqa: E402  (sets sys.path)

from lumen.engine.core.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from lumen.engine.core.request import GenerationRequest  # noqa: E402
from lumen.engine.core.scheduler import SchedulerConfig  # noqa: E402
from lumen.engine.sampling.sampler import SamplingParams  # noqa: E402
from lumen.engine.weights.model_files import load_model  # noqa: E402

# llama.cpp's llama_ftype values (llama.h) for the file types benchmarked.
FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_S": 14}


def ensure_file(qtype: str) -> Path:
    """bench/results/tinyllama-synthetic-{qtype}.gguf, quantized by llama.cpp from the F16 file."""
    path = RESULTS / f"tinyllama-synthetic-{qtype.lower()}-llamacpp.gguf"
    if path.exists():
        return path
    source = ensure_tinyllama(qtype="F16")
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    params.nthread = 2
    tmp = path.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if rc != 0:
        sys.exit(f"llama.cpp could not quantize {source} to {qtype} (code {rc})")
    os.replace(tmp, path)
    return path


def serve_streams(loaded, config: EngineConfig, streams: int, prompt_len: int, tokens: int,
                  on_step=None) -> LLMEngine:
    """Submit `streams` greedy requests (seeded prompts) together and step until all finish."""
    engine = LLMEngine(loaded, config, on_step=on_step)
    vocab, bos = loaded.config.vocab_size, loaded.tokenizer.bos_id or 1
    for i in range(streams):
        engine.add_request(GenerationRequest(str(i), prompt_ids(vocab, bos, prompt_len, seed=i), tokens,
                                             SamplingParams(temperature=0), ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    return engine


def streams_run(loaded, streams: int, tokens: int) -> float:
    """Aggregate decode tokens/s over the steps where all `streams` requests decode together."""
    steps = []
    config = EngineConfig(scheduler=SchedulerConfig(max_running=streams, max_tokens_per_step=2048))
    serve_streams(loaded, config, streams, 32, tokens, on_step=steps.append)
    decode = [s for s in steps if s.batch_size == streams and s.num_tokens == streams]
    return streams * len(decode) / sum(s.duration_s for s in decode)


def bench_file(qtype: str, path: Path, args) -> dict:
    torch.set_num_threads(args.threads)
    loaded = load_model(path)
    engine = LLMEngine(loaded, EngineConfig(scheduler=SchedulerConfig(max_running=1)))
    vocab, bos = loaded.config.vocab_size, loaded.tokenizer.bos_id or 1
    lumen_run(engine, prompt_ids(vocab, bos, 128), 4)  # warm-up
    prompts = fresh_prompts(vocab, bos, 128)
    row = {"type": qtype, "file": path.name, "file_bytes": path.stat().st_size,
           "lumen": median_runs(lambda: lumen_run(engine, next(prompts), args.decode), args.repeats)}
    del engine
    row["lumen"][f"decode_tok_s_{args.streams}_streams"] = streams_run(loaded, args.streams, args.stream_tokens)
    del loaded
    row["llama.cpp"] = llamacpp_figures(path, vocab, bos, args)
    if row["llama.cpp"] is None:
        sys.exit("bench/quant_cpu.py compares with llama.cpp: install the bench extra (llama-cpp-python)")
    return row


def memory(path: Path, streams: int, tokens: int) -> None:
    """In this (fresh) process: load, serve `streams` requests, print peak RSS and its budget as JSON."""
    loaded = load_model(path)
    engine = serve_streams(loaded, EngineConfig(scheduler=SchedulerConfig(max_running=streams)), streams, 128, tokens)
    status = Path("/proc/self/status").read_text()
    peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) * 1024
    spec = engine.kv.spec
    per_block = spec.bytes_per_block(loaded.config, spec.block_size, loaded.weights.dtype)
    kv_used = int(streams * (128 + tokens) * per_block / spec.block_size)   # cache rows written (pages touched)
    kv_pool = per_block * spec.num_blocks
    print(json.dumps({"file_bytes": path.stat().st_size, "peak_rss": peak, "kv_touched": kv_used,
                      "kv_pool": kv_pool}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", nargs="+", default=["Q8_0", "Q4_0", "Q4_K_M", "Q6_K"], choices=sorted(FTYPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--stream-tokens", type=int, default=16)
    p.add_argument("--memory", type=Path, help="measure peak RSS serving this file (run in a fresh process)")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args()
    if args.memory:
        torch.set_num_threads(args.threads)
        memory(args.memory, args.streams, args.stream_tokens)
        return
    files = {t: ensure_file(t) for t in args.types}
    rows = [] if args.skip_speed else [bench_file(t, path, args) for t, path in files.items()]
    mem = {}
    for t, path in ({} if args.skip_memory else files).items():
        out = subprocess.run([sys.executable, __file__, "--memory", str(path), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True).stdout
        mem[t] = json.loads(out.strip().splitlines()[-1])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quant_cpu.json").write_text(json.dumps({"speed": rows, "memory": mem}, indent=2))
    print_tables(rows, mem, args.streams)


def print_tables(rows: list[dict], mem: dict, streams: int) -> None:
    if rows:
        print(f"| type | file MB | Lumen prefill tok/s | llama.cpp prefill tok/s | ratio | Lumen decode tok/s | "
              f"llama.cpp decode tok/s | ratio | Lumen {streams} streams tok/s | llama.cpp bound (x{streams}) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            lu, lc = r["lumen"], r["llama.cpp"]
            pre_l, pre_c = 128 / (lu["ttft_ms"] / 1000), 128 / (lc["ttft_ms"] / 1000)
            print(f"| {r['type']} | {r['file_bytes'] / 1e6:.0f} | {pre_l:.1f} | {pre_c:.1f} | {pre_l / pre_c:.2f}x | "
                  f"{lu['decode_tok_s']:.2f} | {lc['decode_tok_s']:.2f} | {lu['decode_tok_s'] / lc['decode_tok_s']:.2f}x | "
                  f"{lu[f'decode_tok_s_{streams}_streams']:.1f} | {lc['decode_tok_s'] * streams:.1f} |")
    if not mem:
        return
    print("\n| type | file MB | KV touched MB | peak RSS MB | budget 1.2 x file + KV MB | within |")
    print("|---|---|---|---|---|---|")
    for t, m in mem.items():
        budget = 1.2 * m["file_bytes"] + m["kv_touched"]
        print(f"| {t} | {m['file_bytes'] / 1e6:.0f} | {m['kv_touched'] / 1e6:.0f} | {m['peak_rss'] / 1e6:.0f} | "
              f"{budget / 1e6:.0f} | {'yes' if m['peak_rss'] <= budget else 'NO'} |")


if __name__ == "__main__":
    main()
