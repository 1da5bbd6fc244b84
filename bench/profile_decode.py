"""Where one decode step's time goes, for greedy requests decoding together (one by default): the C
layers, the output matmul, the rest of the forward (embedding, final norm, Python) and the engine
around it (scheduler, sampler).

    .venv/bin/python bench/profile_decode.py [--model PATH] [--mode exact|int8|auto] [--variant x86-64-v3]
                                             [--tokens 128] [--threads 2] [--streams 1]

Default model: SmolLM2-135M-Instruct Q4_1 from ../shared/data/models (30 layers of width 576 and a
49152 x 576 output matrix: the per-layer costs matter as much as the big matmuls). The timers wrap
lumen.engine.native.kernels.layer_forward (each layer, one C call), the model's output linear and
LlamaModel.forward; a step's remainder is the engine's own work.
"""
from __future__ import annotations

import argparse
import os
import time

from common import SHARED  # noqa: E402  (sets sys.path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--mode", choices=("exact", "int8", "auto"), default="exact")
    p.add_argument("--variant", default=None, help="the C kernel build (default: the one this CPU gets)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", type=int, default=1, help="requests decoding together (distinct prompts)")
    args = p.parse_args()
    if args.variant:                     # before Lumen is imported: library() reads it once
        os.environ["LUMEN_NATIVE_VARIANT"] = args.variant
    import torch

    from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
    from lumen.engine.core.request import GenerationRequest
    from lumen.engine.core.scheduler import SchedulerConfig
    from lumen.engine.model import llama
    from lumen.engine.native import library
    from lumen.engine.sampling.sampler import SamplingParams
    from lumen.engine.weights.model_files import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    engine = LLMEngine(model, EngineConfig(scheduler=SchedulerConfig(max_running=args.streams),
                                           matmul_mode=args.mode))
    spent = {"layers": 0.0, "output": 0.0, "forward": 0.0}

    def timed(key, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - start
        return wrapper

    llama.native.layer_forward = timed("layers", llama.native.layer_forward)
    model.weights.output = timed("output", model.weights.output)
    engine.model.forward = timed("forward", engine.model.forward)
    if engine.model.layer_structs is None:
        print("note: this model's layers do not run as one C call each; 'layers' stays 0")

    def add(tokens: int, rid: str) -> None:
        for i in range(args.streams):    # distinct prompts: the prefix cache shares nothing
            engine.add_request(GenerationRequest(f"{rid}-{i}", [1, 504 + i, 3355, 1159, 260, 1300], tokens,
                                                 SamplingParams(temperature=0), ignore_eos=True))

    def run() -> int:
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        return steps

    add(8, "warm-up")
    run()
    add(args.tokens + 1, "timed")
    engine.step()                        # the prefills (the scheduler's first step): not timed
    spent.update(dict.fromkeys(spent, 0.0))
    start = time.perf_counter()
    steps = run()
    total = time.perf_counter() - start
    ms = {k: 1e3 * v / steps for k, v in spent.items()}
    print(f"{library.describe()}; matmul mode {args.mode}; {args.threads} threads; {args.streams} streams")
    print("| per decode step | ms | share |")
    print("|---|---|---|")
    rows = [("C layers (all, one call each)", ms["layers"]), ("output matmul", ms["output"]),
            ("rest of the forward (embedding, final norm, Python)", ms["forward"] - ms["layers"] - ms["output"]),
            ("engine around the forward (scheduler, sampler, outputs)", 1e3 * total / steps - ms["forward"])]
    for name, value in rows + [("step", 1e3 * total / steps)]:
        print(f"| {name} | {value:.2f} | {100 * value / (1e3 * total / steps):.0f}% |")


if __name__ == "__main__":
    main()
