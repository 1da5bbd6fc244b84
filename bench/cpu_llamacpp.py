"""Lumen against llama.cpp's own benchmark tools: same files, same threads, one run, one kernel variant.

    LLAMA_CPP_BIN=/tmp/llama/build-avx2/bin .venv/bin/python bench/cpu_llamacpp.py \
        [--variant x86-64-v3] [--types Q4_0 Q4_1 Q8_0 Q4_K_M Q6_K] [--no-smollm2] [--streams 16]
        [--modes exact int8]

llama.cpp: `llama-bench -p 128` (prefill tokens/s of a 128-token prompt), `llama-bench -n 64 -d 128`
(decode tokens/s after a 128-token context) and `llama-batched-bench -npp 128 -ntg 32 -npl 16`
(aggregate decode tokens/s of 16 sequences), binaries built with cmake from the llama-cpp-python
sdist's vendored llama.cpp for the instruction set under test (BENCHMARKS.md has the commands).

Lumen, in this process with `LUMEN_NATIVE_VARIANT=--variant` (the kernel build a CPU of that
level gets): one greedy request with a 128-token prompt, a distinct one each run (prefill tokens/s = 128 / time to first
token; decode tokens/s over --decode tokens, median of --repeats), then --streams requests of 128
+ 32 tokens together (aggregate decode tokens/s over the steps where all of them decode), in
each matmul mode of --modes (exact, int8, auto: EngineConfig.matmul_mode), each against the same
llama.cpp figures.

Files: the TinyLlama-shaped synthetic model (bench/make_tinyllama.py's shape, Llama 2 vocabulary)
written once as F16 into bench/results/ and quantized by llama.cpp's own `llama-quantize`, so both
engines read the same bytes; and SmolLM2-135M-Instruct Q4_1 from ../shared/data/models.
Prints a Markdown table and writes bench/results/cpu_llamacpp.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--variant", default=None, help="Lumen's kernel variant (default: the one this CPU gets)")
p.add_argument("--types", nargs="*", default=["Q4_0", "Q4_1", "Q8_0", "Q4_K_M", "Q6_K"])
p.add_argument("--no-smollm2", action="store_true")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--decode", type=int, default=64)
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--streams", type=int, default=16)
p.add_argument("--stream-tokens", type=int, default=32)
p.add_argument("--modes", nargs="+", default=["exact", "int8"], choices=["exact", "int8", "auto", "int8-file-layout"],
               help="int8-file-layout: the int8 mode with Q4_0 and Q4_1 weights kept in the file's layout (the "
                    "row by row kernels, as before the interleaved layout): an A/B of that layout in one run")
ARGS = p.parse_args()
if ARGS.variant:        # before Lumen is imported: library() reads it once
    os.environ["LUMEN_NATIVE_VARIANT"] = ARGS.variant

import torch
from baseline import lumen_run, median_runs
from common import RESULTS, SHARED, ensure_tinyllama, fresh_prompts, prompt_ids

from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
from lumen.engine.core.request import GenerationRequest
from lumen.engine.core.scheduler import SchedulerConfig
from lumen.engine.model.linear import NativeQuantLinear
from lumen.engine.native import library
from lumen.engine.sampling.sampler import SamplingParams
from lumen.engine.weights.model_files import load_model

PREPARE = NativeQuantLinear.prepare

BIN = Path(os.environ.get("LLAMA_CPP_BIN", ""))
PROMPT = 128


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        sys.exit(f"{path} not found: set LLAMA_CPP_BIN to the bin/ folder of a llama.cpp cmake build "
                 "(BENCHMARKS.md, sections: Lumen against llama.cpp's own tools on AVX2, and on AVX-512)")
    return str(path)


def tinyllama(qtype: str) -> Path:
    path = RESULTS / f"tinyllama-synthetic-{qtype.lower()}-llamacpp.gguf"
    if path.exists():
        return path
    source = ensure_tinyllama(qtype="F16")      # the one F16 file every type is quantized from
    tmp = path.with_suffix(".tmp")
    subprocess.run([tool("llama-quantize"), str(source), str(tmp), qtype, str(ARGS.threads)], check=True,
                   capture_output=True)
    os.replace(tmp, path)
    return path


def llamacpp(path: Path) -> dict:
    def bench(*extra: str) -> float:
        out = subprocess.run([tool("llama-bench"), "-m", str(path), "-t", str(ARGS.threads), "-r", str(ARGS.repeats),
                              "-o", "json", *extra], check=True, capture_output=True, text=True).stdout
        (row,) = json.loads(out)
        return row["avg_ts"]

    prefill = bench("-p", str(PROMPT), "-n", "0")
    decode = bench("-p", "0", "-n", str(ARGS.decode), "-d", str(PROMPT))
    out = subprocess.run([tool("llama-batched-bench"), "-m", str(path), "-t", str(ARGS.threads), "-tb", str(ARGS.threads),
                          "-c", str(ARGS.streams * (PROMPT + ARGS.stream_tokens) + 256), "-npp", str(PROMPT),
                          "-ntg", str(ARGS.stream_tokens), "-npl", str(ARGS.streams), "--output-format", "jsonl"],
                         check=True, capture_output=True, text=True)
    lines = [json.loads(line) for line in (out.stdout + out.stderr).splitlines() if line.startswith('{"n_kv_max"')]
    return {"prefill_tok_s": prefill, "decode_tok_s": decode, "streams_tok_s": lines[-1]["speed_tg"]}


def lumen(path: Path, mode: str) -> dict:
    torch.set_num_threads(ARGS.threads)
    file_layout = mode == "int8-file-layout"
    mode = "int8" if file_layout else mode
    NativeQuantLinear.prepare = (lambda self: None) if file_layout else PREPARE
    loaded = load_model(path)
    engine = LLMEngine(loaded, EngineConfig(scheduler=SchedulerConfig(max_running=1), matmul_mode=mode))
    vocab, bos = loaded.config.vocab_size, loaded.tokenizer.bos_id or 1
    prompt = prompt_ids(vocab, bos, PROMPT)
    lumen_run(engine, prompt, 4)  # warm-up
    prompts = fresh_prompts(vocab, bos, PROMPT)     # the prefix cache must not serve the prefill
    single = median_runs(lambda: lumen_run(engine, next(prompts), ARGS.decode), ARGS.repeats)
    del engine
    steps = []
    engine = LLMEngine(loaded, EngineConfig(scheduler=SchedulerConfig(max_running=ARGS.streams, max_tokens_per_step=2048),
                                            matmul_mode=mode), on_step=steps.append)
    for i in range(ARGS.streams):      # distinct prompts: the prefix cache does not help
        engine.add_request(GenerationRequest(str(i), prompt_ids(vocab, bos, PROMPT, seed=100 + i), ARGS.stream_tokens,
                                             SamplingParams(temperature=0), ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    decode = [s for s in steps if s.batch_size == ARGS.streams and s.num_tokens == ARGS.streams]
    return {"prefill_tok_s": PROMPT / (single["ttft_ms"] / 1000), "decode_tok_s": single["decode_tok_s"],
            "streams_tok_s": ARGS.streams * len(decode) / sum(s.duration_s for s in decode)}


def main() -> None:
    files = {f"TinyLlama-shaped {t}": tinyllama(t) for t in ARGS.types}
    if not ARGS.no_smollm2:
        files["SmolLM2-135M-Instruct Q4_1"] = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    print(library.describe())
    rows = []
    for name, path in files.items():
        reference = llamacpp(path)
        for mode in ARGS.modes:
            rows.append({"model": name, "mode": mode, "file": path.name, "lumen": lumen(path, mode),
                         "llama.cpp": reference})
        print(f"measured {name}", file=sys.stderr, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu_llamacpp.json").write_text(json.dumps({"kernels": library.describe(), "rows": rows}, indent=2))
    s = ARGS.streams
    print(f"| model | mode | Lumen prefill tok/s | llama.cpp | ratio | Lumen decode tok/s | llama.cpp | ratio | "
          f"Lumen {s} streams tok/s | llama.cpp | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for key in ("prefill_tok_s", "decode_tok_s", "streams_tok_s"):
            a, b = r["lumen"][key], r["llama.cpp"][key]
            cells.append(f"{a:.1f} | {b:.1f} | {a / b:.2f}x")
        print(f"| {r['model']} | {r['mode']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
