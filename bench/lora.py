"""Decode throughput with LoRA adapters against the base model (engine, in-process, CPU).

    .venv/bin/python bench/lora.py [--model PATH] [--streams 1 16] [--tokens 48] [--repeats 3] [--threads 2]
                                   [--device cuda]

--device cuda: the engine on the GPU (Triton kernels, bfloat16; the adapters stacked for the
BGMV kernels); default: the CPU with the C kernels.

For each stream count, alternating the configurations round after round (so a drift of the
machine's speed hits them all alike) and keeping each one's median:
- base: no adapter loaded;
- base, 4 loaded: the same requests while four adapters are loaded (they must cost nothing);
- r16: every request with one rank-16 adapter on all seven projections;
- r64: every request with one rank-64 adapter;
- mixed: requests spread over four adapters (rank 8, 8, 64, 64) and the base, round robin
  (at one stream: the rank-64 adapter).
Decode tok/s counts only the steps in which every request decodes one token (as throughput.py).
Adapters are random (their values do not change the cost); the model defaults to SmolLM2-135M-Instruct.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import RESULTS, SHARED, prompt_ids  # noqa: E402  (sets sys.path)

from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
from lumen.engine.core.request import GenerationRequest
from lumen.engine.core.scheduler import SchedulerConfig
from lumen.engine.sampling.sampler import SamplingParams
from lumen.engine.weights.gguf_loader import load_gguf
from tests.engine.lora.helpers import random_adapter

CONFIGS = ["base", "base, 4 loaded", "r16", "r64", "mixed"]


def run(engine: LLMEngine, streams: int, tokens: int, adapters: list[str]) -> float:
    steps = []
    engine.on_step = steps.append
    cfg = engine.loaded.config
    for i in range(streams):
        engine.add_request(GenerationRequest(f"{time.perf_counter_ns()}-{i}", prompt_ids(cfg.vocab_size, 1, 32, seed=i),
                                             tokens, SamplingParams(temperature=0), ignore_eos=True,
                                             adapter=adapters[i % len(adapters)]))
    while engine.has_unfinished():
        engine.step()
    decode = [s for s in steps if s.batch_size == streams and s.num_tokens == streams]
    return streams * len(decode) / sum(s.duration_s for s in decode)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    placement = None
    if args.device == "cuda":
        from lumen.engine.model.linear import plain_weights
        from lumen.engine.model.placement import resolve_placement
        placement = resolve_placement("cuda", "triton")
        with plain_weights():
            loaded = load_gguf(args.model)
    else:
        loaded = load_gguf(args.model)
    cfg = loaded.config
    # Small values, as trained adapters have: large random ones would overflow the activations.
    adapters = {name: random_adapter(cfg, rank, seed, size=0.02) for seed, (name, rank) in enumerate(
        [("r8a", 8), ("r8b", 8), ("r64a", 64), ("r64b", 64), ("r16", 16)])}
    rows = []
    for streams in args.streams:
        config = EngineConfig(scheduler=SchedulerConfig(max_running=streams, max_tokens_per_step=2048),
                              prefix_caching=False, placement=placement)
        bare = LLMEngine(loaded, config)
        engine = LLMEngine(loaded, config)
        for name, adapter in adapters.items():
            engine.load_adapter(name, adapter)
        plans = {"base": (bare, [""]), "base, 4 loaded": (engine, [""]), "r16": (engine, ["r16"]),
                 "r64": (engine, ["r64a"]),
                 "mixed": (engine, ["r8a", "r64a", "", "r8b", "r64b"] if streams > 1 else ["r64a"])}
        run(bare, streams, 4, [""])   # warm-up
        run(engine, streams, 4, ["r16"])
        results = {name: [] for name in CONFIGS}
        for _ in range(args.repeats):
            for name in CONFIGS:
                results[name].append(run(*plans[name][:1], streams, args.tokens, plans[name][1]))
        base = statistics.median(results["base"])
        for name in CONFIGS:
            tok_s = statistics.median(results[name])
            rows.append({"streams": streams, "config": name, "decode_tok_s": tok_s, "vs_base": tok_s / base,
                         "runs": results[name]})
    print(f"{args.device}: {placement.describe() if placement else 'the C kernels, float32'}")
    print("| streams | configuration | decode tok/s | vs base | throughput lost |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['streams']} | {r['config']} | {r['decode_tok_s']:.1f} | {r['vs_base']:.3f}x | "
              f"{(1 - r['vs_base']) * 100:.1f}% |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lora.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
