"""Speculative decoding on a real chat model: SmolLM2-135M-Instruct answering input-grounded
prompts (bench/spec_prompts.json), per method against plain decoding (engine, in-process).

    .venv/bin/python bench/speculative_chat.py [--streams 1 8] [--repeats 3] [--tokens 128]
                                               [--methods none ngram:4 layer_skip:4 auto:7]

Each prompt is a ChatML conversation, rendered with the model's own chat template and
tokenized the way the server does it (lumen.engine.chat.prompt). Greedy, at most --tokens new
tokens, stopping at the model's end of turn (<|im_end|>, EOS id 2). A method is NAME[:K] (K:
its draft length, for auto the longest). At 1 stream the prompts run one after another; at 8,
all are queued and 8 run at a time (continuous batching). Every method has its own engine
(prefix cache on, as served) and the engines take turns, one step each, so that a shared
machine's slow seconds hit every method alike; a method's wall time is the sum of its steps.
Each repeat (--repeats) starts fresh engines. Figures are medians over the repeats; a speedup
is the median of each repeat's ratio to the plain run of the same repeat.

Columns: acceptance = accepted / drafted tokens; mean accepted / draft = accepted tokens per
verified draft; tokens / target forward = tokens emitted in decode steps per request per step
(1.00 for plain decoding); decode tok/s = those tokens over those steps' time (steps that
admitted nothing); wall = the whole run, prefill included; same output = every request's tokens
equal plain decoding's. At 8 streams the server default applies (no speculation in steps with
more than SpeculativeConfig.max_batch = 4 decoding requests); `--forced` adds rows with it on
at every batch size. The matmul mode is the server's default (auto).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import REPO, RESULTS, SHARED  # sets sys.path

from lumen.engine.chat.prompt import chat_prompt_ids
from lumen.engine.chat.template import ChatTemplate
from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
from lumen.engine.core.request import GenerationRequest
from lumen.engine.core.scheduler import SchedulerConfig
from lumen.engine.model.llama import Chunk, build_batch
from lumen.engine.native import library
from lumen.engine.native.kernels import describe_auto
from lumen.engine.sampling.sampler import SamplingParams
from lumen.engine.speculative import SpecMethod, SpeculativeConfig, SpeculativeParams
from lumen.engine.speculative.ngram import find_ngram_match
from lumen.engine.weights.model_files import load_model

MODEL = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = REPO / "bench" / "spec_prompts.json"


@dataclass(frozen=True)
class Case:
    """One row of the table: a method, its draft length, and the batch limit it runs under."""
    method: SpecMethod
    k: int
    max_batch: int

    def label(self, streams: int) -> str:
        if self.method is SpecMethod.NONE:
            return "none"
        forced = " (forced on)" if self.max_batch >= streams > 4 else ""
        return f"{self.method.value} k={self.k}{forced}"


def chat_prompts(model, path: Path) -> list[tuple[str, list[int]]]:
    """(name, prompt ids) of every conversation in the file, as the server renders them."""
    template = ChatTemplate(model.chat_template)
    return [(item["name"], chat_prompt_ids(model.tokenizer, template, item["messages"]))
            for item in json.loads(path.read_text())]


class Run:
    """One case's engine working through the prompts, a step at a time, with its figures."""

    def __init__(self, model, case: Case, streams: int, prompts: list[tuple[str, list[int]]], args) -> None:
        spec = SpeculativeConfig(method=case.method, num_tokens=case.k, max_batch=case.max_batch,
                                 layer_skip_layers=args.layer_skip_layers)
        config = EngineConfig(scheduler=SchedulerConfig(max_running=streams, max_tokens_per_step=4096),
                              speculative=spec, matmul_mode=args.matmul_mode, kv_cache_bytes=256 << 20)
        self.steps: list = []
        self.engine = LLMEngine(model, config, on_step=self.steps.append)
        for name, ids in prompts:
            self.engine.add_request(GenerationRequest(name, ids, args.tokens, SamplingParams(temperature=0),
                                                      speculative=SpeculativeParams(case.method, case.k)))
        self.outputs: dict[str, list[int]] = {name: [] for name, _ in prompts}
        self.wall = self.decode_s = 0.0
        self.tokens = self.rows = self.drafted = self.accepted = 0

    def step(self) -> bool:
        """One engine step; False once every prompt is answered."""
        start = time.perf_counter()
        outs = self.engine.step()
        self.wall += time.perf_counter() - start
        # A decode step (one that admitted nothing) emits only tokens after each request's first.
        if self.steps and self.steps[-1].admitted == 0:
            self.tokens += sum(len(o.token_ids) for o in outs)
            self.decode_s += self.steps[-1].duration_s
            self.rows += self.steps[-1].batch_size
        for out in outs:
            self.outputs[out.request_id] += out.token_ids
            if out.finished:
                self.drafted += out.draft_tokens
                self.accepted += out.accepted_tokens
        return self.engine.has_unfinished()

    def figures(self) -> dict:
        drafts = sum(s.spec_drafts for s in self.steps)
        return {"wall_s": self.wall, "decode_tok_s": self.tokens / self.decode_s,
                "outside_decode_s": self.wall - self.decode_s, "tokens_per_forward": self.tokens / self.rows,
                "acceptance": self.accepted / self.drafted if self.drafted else 0.0,
                "mean_accepted": self.accepted / drafts if drafts else 0.0,
                "generated": sum(len(v) for v in self.outputs.values()), "outputs": self.outputs}


def cases_for(streams: int, methods: list[tuple[SpecMethod, int]], forced: bool) -> list[Case]:
    default = SpeculativeConfig().max_batch
    cases = [Case(m, k, default) for m, k in methods]
    if forced and streams > default:
        cases += [Case(m, k, streams) for m, k in methods if m is not SpecMethod.NONE]
    return cases


def measure(model, prompts, streams: int, cases: list[Case], args) -> list[dict]:
    """Every case `args.repeats` times, its engine's steps alternating with the other cases'
    (fresh engines each repeat). One summary row per case."""
    results: dict[Case, list[dict]] = {c: [] for c in cases}
    for rep in range(args.repeats):
        runs = {c: Run(model, c, streams, prompts, args) for c in cases}
        active = list(cases)
        while active:
            active = [c for c in active if runs[c].step()]
        for case in cases:
            results[case].append(runs[case].figures())
        print(f"  streams {streams} repeat {rep + 1}: " + ", ".join(
            f"{c.label(streams)} {results[c][-1]['wall_s']:.1f} s" for c in cases), flush=True)
    plain = results[cases[0]]
    return [summary(streams, case, results[case], plain) for case in cases]


def summary(streams: int, case: Case, rs: list[dict], plain: list[dict]) -> dict:
    """Medians over the repeats; speedups against the plain run of the same repeat."""
    return {
        "streams": streams, "method": case.label(streams), "k": case.k, "max_batch": case.max_batch,
        "acceptance": rs[0]["acceptance"], "mean_accepted": rs[0]["mean_accepted"],
        "tokens_per_forward": rs[0]["tokens_per_forward"],
        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in rs),
        "wall_s": statistics.median(r["wall_s"] for r in rs),
        "speedup": statistics.median(p["wall_s"] / r["wall_s"] for p, r in zip(plain, rs)),
        "decode_speedup": statistics.median(r["decode_tok_s"] / p["decode_tok_s"] for p, r in zip(plain, rs)),
        "same_output": all(r["outputs"] == plain[0]["outputs"] for r in rs),
        "generated": rs[0]["generated"], "walls": [r["wall_s"] for r in rs],
        "outside_decode_s": statistics.median(r["outside_decode_s"] for r in rs), "outputs": rs[0]["outputs"]}


def verify_costs(model, args, rows=(1, 2, 3, 4, 5, 6, 8)) -> dict[int, float]:
    """Forward time (ms, median of 15, sizes alternating) of one request computing `rows` rows at
    a 250-token context: what verifying a draft of rows - 1 tokens costs."""
    engine = Run(model, Case(SpecMethod.NONE, 1, 4), 1, [], args).engine
    table = list(range(24))  # any blocks of the empty pool: positions up to 384
    batches = {r: build_batch([Chunk(list(range(100, 100 + r)), 250, table, range(r))],
                              engine.blocks.block_size)[0] for r in rows}
    times: dict[int, list[float]] = {r: [] for r in rows}
    for _ in range(15):
        for r in rows:
            start = time.perf_counter()
            engine.model.forward(batches[r])
            times[r].append(1e3 * (time.perf_counter() - start))
    return {r: statistics.median(t) for r, t in times.items()}


def match_stats(prompts, outputs: dict[str, list[int]], ngram_max: int = 4, ahead: int = 8) -> dict:
    """Along each plain answer: per length of the n-gram match before a position (0: none), how
    often the lookup's next token, and its next `ahead` tokens, are what the model wrote."""
    stats: dict[int, list[int]] = {}
    for name, prompt in prompts:
        out = outputs[name]
        for pos in range(1, len(out)):
            tokens = prompt + out[:pos]
            n, end = find_ngram_match(tokens, ngram_max, 1)
            guess = tokens[end + 1: end + 1 + ahead] if n else []
            row = stats.setdefault(n, [0, 0, 0])
            row[0] += 1
            row[1] += bool(guess) and guess[0] == out[pos]
            row[2] += len(guess) == ahead and guess == out[pos: pos + ahead]
    return {n: (c, first / c, whole / c) for n, (c, first, whole) in sorted(stats.items())}


def print_analysis(model, prompts, rows: list[dict], args) -> None:
    """Why the speedup is what it is: verification cost by rows, the share of plain decoding's
    wall time spent outside decode steps, and how well n-gram lookup predicts the answers."""
    costs = verify_costs(model, args)
    print("\n| rows computed | forward ms | vs 1 row |\n|---|---|---|")
    for r, ms in costs.items():
        print(f"| {r} | {ms:.2f} | {ms / costs[1]:.2f}x |")
    plain = next(r for r in rows if r["streams"] == 1 and r["method"] == "none")
    print(f"\nplain, 1 stream: {100 * plain['outside_decode_s'] / plain['wall_s']:.0f}% of the wall time "
          "outside decode steps (prefill, first tokens)")
    print("\n| n-gram match before the position | positions | next token right | next 8 right |\n|---|---|---|---|")
    for n, (count, first, whole) in match_stats(prompts, plain["outputs"]).items():
        print(f"| {n or 'none'} | {count} | {first:.2f} | {whole:.2f} |")


def machine() -> dict:
    """The CPU (lscpu's model name and its vector extensions), the kernel build, the load now."""
    lscpu = dict(line.split(":", 1) for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines() if ":" in line)
    flags = set(lscpu.get("Flags", "").split())
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return {"cpu": lscpu.get("Model name", "?").strip(), "isa": " ".join(isa), "kernels": library.describe(),
            "load": _uptime()}


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def parse_method(text: str) -> tuple[SpecMethod, int]:
    name, _, k = text.partition(":")
    return SpecMethod.parse(name, "--methods"), int(k or 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--prompts", type=Path, default=PROMPTS)
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    p.add_argument("--methods", nargs="+", default=["none", "ngram:4", "layer_skip:4", "auto:7"],
                   help="NAME[:K] each; the first must be none (the baseline)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layer-skip-layers", type=int, default=None, help="default: a quarter of the layers")
    p.add_argument("--forced", action="store_true", help="at 8 streams, also every method forced on")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--analysis", action="store_true",
                   help="also: forward time by rows, plain decoding's time outside decode steps, and how "
                        "often n-gram lookup predicts the plain answers, by match length")
    args = p.parse_args()
    methods = [parse_method(m) for m in args.methods]
    if methods[0][0] is not SpecMethod.NONE:
        p.error("--methods must start with none (the baseline)")
    torch.set_num_threads(args.threads)
    args.matmul_mode = "auto"
    model = load_model(args.model)
    prompts = chat_prompts(model, args.prompts)
    info = machine()
    print(f"{info['cpu']} ({info['isa']}); {info['kernels']}; matmul mode auto ({describe_auto()}); {args.threads} threads")
    print(f"{len(prompts)} prompts, {statistics.mean(len(ids) for _, ids in prompts):.0f} tokens on average; "
          f"load before: {info['load']}")
    warm = Run(model, Case(SpecMethod.NONE, 1, 4), 2, prompts[:2], argparse.Namespace(**{**vars(args), "tokens": 8}))
    while warm.step():
        pass
    rows = []
    for streams in args.streams:
        rows += measure(model, prompts, streams, cases_for(streams, methods, args.forced), args)
    print(f"load after: {_uptime()}")
    print("\n| streams | method | acceptance | mean accepted / draft | tokens / target forward | "
          "decode tok/s | decode speedup | wall s | wall speedup | same output |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['streams']} | {r['method']} | {r['acceptance']:.2f} | {r['mean_accepted']:.2f} | "
              f"{r['tokens_per_forward']:.2f} | {r['decode_tok_s']:.1f} | {r['decode_speedup']:.2f}x | "
              f"{r['wall_s']:.1f} | {r['speedup']:.2f}x | {'yes' if r['same_output'] else 'NO'} |")
    if args.analysis and 1 in args.streams:
        print_analysis(model, prompts, rows, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speculative_chat.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "machine": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
