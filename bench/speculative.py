"""Speculative decoding against plain decoding, per proposer, 1 and 8 concurrent streams (engine, in-process).

    .venv/bin/python bench/speculative.py [--models stories tinyllama] [--streams 1 8] [--tokens 64] [--k 4]

stories: stories260K as target, llama2xs-stories-tok512 as draft model, prompts from BOS.
tinyllama: the synthetic TinyLlama-shaped Q8_0 model (random weights), layer-skip and n-gram,
32-token random prompts. Greedy, ignore_eos, the same requests for every method, one run each,
side by side. Decode tok/s counts the tokens after each request's first over the steps that
admitted nothing (drafting, verification and plain decode steps), so prefill does not blur it.
Speculation is forced on at every batch size here (max_batch = streams); the row "auto"
at 8 streams uses the server default (off above 4 decoding requests). With --adaptive, each
method also runs with the adaptive draft length (SpeculativeConfig.adaptive).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from common import RESULTS, SHARED, ensure_tinyllama, prompt_ids  # noqa: E402  (sets sys.path)

from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
from lumen.engine.core.request import GenerationRequest
from lumen.engine.core.scheduler import SchedulerConfig
from lumen.engine.sampling.sampler import SamplingParams
from lumen.engine.speculative import SpecMethod, SpeculativeConfig, SpeculativeParams
from lumen.engine.weights.gguf_loader import load_gguf


def run(target, draft, prompts: list[list[int]], tokens: int, method: SpecMethod, k: int, max_batch: int,
        adaptive: bool = False) -> dict:
    steps = []
    config = EngineConfig(scheduler=SchedulerConfig(max_running=max(len(prompts), 1), max_tokens_per_step=2048),
                          speculative=SpeculativeConfig(method=method, num_tokens=k, max_batch=max_batch,
                                                        adaptive=adaptive))
    engine = LLMEngine(target, config, on_step=steps.append, draft=draft)
    for i, prompt in enumerate(prompts):
        engine.add_request(GenerationRequest(str(i), prompt, tokens, SamplingParams(temperature=0), ignore_eos=True,
                                             speculative=SpeculativeParams(method, k)))
    finals, outputs = {}, {str(i): [] for i in range(len(prompts))}
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id] += out.token_ids
            if out.finished:
                finals[out.request_id] = out
    wall = time.perf_counter() - start
    decode = [s for s in steps if s.admitted == 0]
    drafts = sum(s.spec_drafts for s in steps)
    draft_tokens = sum(f.draft_tokens for f in finals.values())
    accepted = sum(f.accepted_tokens for f in finals.values())
    return {
        "method": method.value, "streams": len(prompts), "max_batch": max_batch,
        "decode_tok_s": len(prompts) * (tokens - 1) / sum(s.duration_s for s in decode),
        "end_to_end_tok_s": len(prompts) * tokens / wall,
        "target_forwards": len(decode), "drafts": drafts, "draft_tokens": draft_tokens, "accepted": accepted,
        "acceptance_rate": accepted / draft_tokens if draft_tokens else 0.0,
        "mean_accepted": accepted / drafts if drafts else 0.0,
        "tokens_per_forward": len(prompts) * (tokens - 1) / len(decode) / len(prompts),
        "outputs": outputs,
    }


def models(names: list[str]):
    for name in names:
        if name == "stories":
            target = load_gguf(SHARED / "models" / "stories260K.gguf")
            draft = load_gguf(SHARED / "models" / "llama2xs-stories-tok512.gguf")
            bos = target.tokenizer.bos_id
            yield name, target, draft, [SpecMethod.DRAFT, SpecMethod.NGRAM, SpecMethod.LAYER_SKIP], \
                lambda n: [[bos] for _ in range(n)]
        else:
            target = load_gguf(ensure_tinyllama())
            vocab, bos = target.config.vocab_size, target.tokenizer.bos_id or 1
            yield name, target, None, [SpecMethod.NGRAM, SpecMethod.LAYER_SKIP], \
                lambda n: [prompt_ids(vocab, bos, 32, seed=i) for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["stories", "tinyllama"], choices=["stories", "tinyllama"])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--adaptive", action="store_true",
                   help="also run every method with the adaptive draft length (rows marked 'adaptive k')")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print("| model | streams | method | decode tok/s | speedup | acceptance | mean accepted / draft | "
          "tokens / target forward | same output |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, target, draft, methods, make_prompts in models(args.models):
        run(target, draft, make_prompts(2), 4, SpecMethod.NONE, args.k, 64)  # warm-up
        for n in args.streams:
            prompts = make_prompts(n)
            base = run(target, draft, prompts, args.tokens, SpecMethod.NONE, args.k, n)
            cases = [(m, n, False) for m in methods] + ([(m, n, True) for m in methods] if args.adaptive else []) \
                + ([(m, 4, False) for m in methods] if n > 4 else [])
            results = [(base, "none")] + [(run(target, draft, prompts, args.tokens, m, args.k, mb, adaptive),
                                          m.value + (" (adaptive k)" if adaptive else "")
                                          + (" (auto: off above 4)" if mb < n else "")) for m, mb, adaptive in cases]
            for r, label in results:
                same = r["outputs"] == base["outputs"]
                print(f"| {name} | {n} | {label} | {r['decode_tok_s']:.1f} | "
                      f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x | {r['acceptance_rate']:.2f} | "
                      f"{r['mean_accepted']:.2f} | {r['tokens_per_forward']:.2f} | {'yes' if same else 'NO'} |",
                      flush=True)
                rows.append({"model": name, **{k: v for k, v in r.items() if k != "outputs"}, "label": label,
                             "same_output": same})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speculative.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
