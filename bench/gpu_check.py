"""Issue 16's GPU run: ONE command of under 8 minutes on a lent H100/H200 (README, "Serving on a GPU").

1. The GPU tests (tests/gpu/test_cuda.py) on CUDA: the stories260K oracle in float32, eager and
   with CUDA graphs; the quantized files' and SmolLM2's logits in bfloat16 against the float64
   references (the bounds that file states); batched against solo; graphs against eager; a cancel.
2. Timings through the engine (in process, greedy, distinct random 128-token prompts): TTFT,
   single-stream decode, and aggregate decode tokens/s at 1, 8, 32 and 64 streams, eager and with
   graphs, on SmolLM2 and on a Llama-3-8B-shaped model written here (bench/gpu_models.py) in
   Q4_K_M, Q8_0 and F16.
3. Batch-1 decode as bandwidth: the bytes of every matrix a token reads over the time per token,
   against a device-to-device copy measured in the same run.
4. Hugging Face transformers' generate on a model of the same shape and dtype as the F16 one, at
   batch 1 and 32, beside Lumen on the same workload (128-token prompts, 32 new tokens).
5. Issue 18: the LoRA kernels' tests compiled for CUDA (tests/engine/triton_kernels/test_lora.py,
   with step 1), and bench/lora.py --device cuda (decode with no adapter, one of rank 16 or 64,
   four mixed, at 1 and 16 streams) into lora.txt.

Writes gpu_check.json and gpu_check.md (the tables for BENCHMARKS.md, each target marked met or
not) under --out. Run on the device (bench/gpu_stage.sh prepares what travels):
    python3 bench/gpu_check.py --data /root/lumen-data --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STREAMS = (1, 8, 32, 64)
PROMPT_LEN, DECODE_TOKENS = 128, 32
DEVICE = "cuda"   # --dry-run-cpu: "cpu", the Triton interpreter and tiny shapes (checks this script)
# The dry run's stand-in for the 8B shape.
TINY_VOCAB = 600


def _tiny():
    from lumen.engine.demo.synthetic import SyntheticShape
    return SyntheticShape(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, context_length=256)


def package_view() -> Path:
    """A `lumen` package over this checkout without installing it (the device has no compiler
    toolchain for the C kernels' build and no grpcio-tools; the Triton path needs neither)."""
    root = Path(tempfile.mkdtemp(prefix="lumen-view-"))
    pkg = root / "lumen"
    pkg.mkdir()
    (pkg / "__init__.py").write_text((REPO / "lumen" / "__init__.py").read_text())
    for name in ("engine", "service", "telemetry", "load"):
        (pkg / name).symlink_to(REPO / name)
    if (REPO / "lumen" / "v1").is_dir():
        (pkg / "v1").symlink_to(REPO / "lumen" / "v1")
    return root


def _sync() -> None:
    import torch
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run_tests(env: dict, out: Path) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu",
                           "tests/engine/triton_kernels/test_lora.py", "-x",
                           "--timeout", "240"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    (out / "gpu_tests.log").write_text(proc.stdout + proc.stderr)
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    return {"returncode": proc.returncode, "summary": tail, "seconds": round(time.perf_counter() - started, 1)}


def run_lora_bench(env: dict, out: Path) -> dict:
    """bench/lora.py on the GPU (issue 18), its table into lora.txt."""
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "bench/lora.py", "--device", "cuda", "--tokens", "32", "--repeats", "3"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired as exc:
        return {"returncode": None, "error": f"timed out: {exc}"}
    (out / "lora.txt").write_text(proc.stdout + proc.stderr)
    return {"returncode": proc.returncode, "seconds": round(time.perf_counter() - started, 1)}


def copy_bandwidth() -> float:
    """Bytes read plus written per second of a 1 GiB device-to-device copy (best of 10)."""
    import torch
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / best


def matrix_bytes(w) -> int:
    """Bytes of every matrix one decoded token reads (the embedding row aside)."""
    from lumen.engine.model.device_weights import LAYER_LINEARS, nbytes_on_device
    return nbytes_on_device(*[getattr(layer, n) for layer in w.layers for n in LAYER_LINEARS], w.output)


def make_engine(loaded, eager: bool, dtype: str = "auto"):
    from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
    from lumen.engine.core.scheduler import SchedulerConfig
    from lumen.engine.model.placement import resolve_placement
    config = EngineConfig(placement=resolve_placement(DEVICE, "triton", "float32" if DEVICE == "cpu" else dtype),
                          enforce_eager=eager,
                          scheduler=SchedulerConfig(max_running=max(STREAMS), max_tokens_per_step=8192),
                          prefix_caching=False, gpu_memory_utilization=0.85)
    return LLMEngine(loaded, config)


def timed_run(engine, n: int, vocab: int, seed: int, decode: int = DECODE_TOKENS) -> dict:
    """n requests at once: TTFT of the first token, then decode tokens/s over the steps after
    every request has its first token; and the whole run's wall time."""
    import torch

    from lumen.engine.core.request import GenerationRequest
    from lumen.engine.sampling.sampler import SamplingParams
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        prompt = torch.randint(300, vocab, (PROMPT_LEN,), generator=gen).tolist()
        engine.add_request(GenerationRequest(f"r{i}", prompt, decode + 1, SamplingParams(temperature=0),
                                             ignore_eos=True))
    _sync()
    start = time.perf_counter()
    ttft = decode_start = None
    decoded, started = 0, set()
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.request_id in started:
                decoded += len(o.token_ids)
            started.add(o.request_id)
        if ttft is None and outs:
            ttft = now - start
        if decode_start is None and len(started) == n:
            decode_start = now
    end = time.perf_counter()
    return {"ttft_ms": 1e3 * ttft, "decode_tok_s": decoded / (end - decode_start), "wall_s": end - start,
            "ms_per_step": 1e3 * (end - decode_start) / decode}


def bench_model(label: str, loaded, results: dict, copy_bw: float, dtype: str = "auto") -> None:
    rows = results.setdefault("models", {}).setdefault(label, {})
    for eager in (True, False):
        engine = make_engine(loaded, eager, dtype)
        mode = "eager" if eager else "graphs"
        timed_run(engine, 1, loaded.config.vocab_size, 0, 4)          # compiles the kernels
        for n in STREAMS:
            rows[f"{mode}@{n}"] = timed_run(engine, n, loaded.config.vocab_size, n)
        rows[f"{mode}@1"]["bandwidth_of_copy"] = (matrix_bytes(engine.runner.model.w)
                                                  / (rows[f"{mode}@1"]["ms_per_step"] / 1e3) / copy_bw)
        rows["weights_gib"] = engine.runner.weights_bytes / 2**30
        del engine
        _empty_cache()
    print(label, json.dumps(rows, indent=1), flush=True)


def _empty_cache() -> None:
    """Give the GPU memory of the models just measured back before the next one loads."""
    import gc

    import torch
    gc.collect()   # an engine's objects may hold each other: their tensors go only with a collection
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def bench_transformers(results: dict) -> None:
    """HF generate on a model of the Llama-3-8B shape in float16 (random weights of its own)."""
    import torch
    from gpu_models import LLAMA3_8B, LLAMA3_VOCAB
    from transformers import LlamaConfig, LlamaForCausalLM
    shape, vocab = (_tiny(), TINY_VOCAB) if DEVICE == "cpu" else (LLAMA3_8B, LLAMA3_VOCAB)
    cfg = LlamaConfig(hidden_size=shape.dim, intermediate_size=shape.ffn_dim, num_hidden_layers=shape.n_layers,
                      num_attention_heads=shape.n_heads, num_key_value_heads=shape.n_kv_heads, vocab_size=vocab,
                      max_position_embeddings=shape.context_length, rope_theta=shape.rope_base)
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(DEVICE):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    out = results.setdefault("transformers", {})
    for batch in (1, STREAMS[-1] if DEVICE == "cpu" else 32):
        ids = torch.randint(300, cfg.vocab_size, (batch, PROMPT_LEN), device=DEVICE)
        mask = torch.ones_like(ids)
        model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        _sync()
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS,
                       do_sample=False, pad_token_id=0)
        _sync()
        out[f"@{batch}"] = {"tok_s": batch * DECODE_TOKENS / (time.perf_counter() - start)}
    del model
    _empty_cache()


def lumen_end_to_end(loaded, batch: int, dtype: str) -> float:
    """Lumen on transformers' workload: batch prompts of 128 tokens, 32 new tokens, tokens/s."""
    engine = make_engine(loaded, False, dtype)
    timed_run(engine, 1, loaded.config.vocab_size, 0, 4)
    run = timed_run(engine, batch, loaded.config.vocab_size, 99)
    del engine
    _empty_cache()
    return batch * DECODE_TOKENS / run["wall_s"]


def main() -> int:
    global DEVICE, STREAMS, PROMPT_LEN, DECODE_TOKENS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="the shared data (models/, quant/) carried over")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu_check")))
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-8b", action="store_true")
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="check this script here: CPU device, Triton interpreter, tiny shapes, no tests")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    view = package_view()
    sys.path[:0] = [str(view), str(REPO), str(REPO / "bench")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(view), str(REPO), os.environ.get("PYTHONPATH", "")]),
               LUMEN_SHARED_DATA=str(args.data))
    if args.dry_run_cpu:
        os.environ["TRITON_INTERPRET"] = "1"
        DEVICE, STREAMS, PROMPT_LEN, DECODE_TOKENS = "cpu", (1, 2), 8, 3
        args.skip_tests = True
    import torch
    import triton
    results: dict = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)",
                     "torch": torch.__version__, "triton": triton.__version__}
    if not args.skip_tests:
        results["tests"] = run_tests(env, args.out)
        print("tests:", results["tests"], flush=True)
        results["lora"] = run_lora_bench(env, args.out)
        print("lora:", results["lora"], flush=True)
    results["copy_bandwidth_gb_s"] = copy_bandwidth() / 1e9 if DEVICE == "cuda" else 1.0
    from lumen.engine.model.linear import plain_weights
    from lumen.engine.weights.gguf_loader import load_gguf
    smol_path = args.data / "models" / ("stories260K.gguf" if DEVICE == "cpu" else "SmolLM2-135M-Instruct.Q4_1.gguf")
    with plain_weights():
        smol = load_gguf(smol_path)
    bench_model("SmolLM2-135M Q4_1", smol, results, results["copy_bandwidth_gb_s"] * 1e9)
    if not args.skip_8b:
        from gpu_models import write_llama3_8b
        for mix in ("Q4_K_M", "Q8_0", "F16"):
            path = Path(tempfile.gettempdir()) / f"llama3-8b-{mix}.gguf"
            if DEVICE == "cpu":
                write_llama3_8b(path, mix, shape=_tiny(), vocab_size=TINY_VOCAB, device="cpu")
            else:
                write_llama3_8b(path, mix)
            with plain_weights():
                model = load_gguf(path)
            dtype = "float16" if mix == "F16" else "auto"
            bench_model(f"Llama-3-8B-shaped {mix}", model, results, results["copy_bandwidth_gb_s"] * 1e9, dtype)
            if mix == "F16":
                results["lumen_like_transformers"] = {f"@{b}": {"tok_s": lumen_end_to_end(model, b, dtype)}
                                                      for b in (1, STREAMS[-1] if DEVICE == "cpu" else 32)}
            del model
            path.unlink()
            _empty_cache()
        bench_transformers(results)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1))   # before the report can fail
    (args.out / "gpu_check.md").write_text(report(results))
    print(report(results), flush=True)
    return 0 if results.get("tests", {}).get("returncode", 0) == 0 else 1


def report(r: dict) -> str:
    lines = [f"GPU: {r['gpu']} (torch {r['torch']}, triton {r['triton']}); copy bandwidth "
             f"{r['copy_bandwidth_gb_s']:.0f} GB/s (read + written)", ""]
    if "tests" in r:
        lines += [f"GPU tests: {r['tests']['summary']} (exit {r['tests']['returncode']})", ""]
    lines += ["| model | mode | TTFT ms (1 stream) | " + " | ".join(f"decode tok/s @{n}" for n in STREAMS)
              + " | batch-1 bandwidth / copy |", "|---" * (len(STREAMS) + 4) + "|"]
    for label, rows in r.get("models", {}).items():
        for mode in ("eager", "graphs"):
            cells = [f"{rows[f'{mode}@{n}']['decode_tok_s']:.0f}" for n in STREAMS]
            lines.append(f"| {label} | {mode} | {rows[f'{mode}@1']['ttft_ms']:.1f} | " + " | ".join(cells)
                         + f" | {rows[f'{mode}@1']['bandwidth_of_copy']:.0%} |")
    lines += ["", "Targets:"]
    models = r.get("models", {})
    smol = models.get("SmolLM2-135M Q4_1")
    if smol:
        ratio = smol["graphs@1"]["decode_tok_s"] / smol["eager@1"]["decode_tok_s"]
        lines.append(f"- CUDA graphs vs eager, SmolLM2 batch 1: {ratio:.2f}x (target >= 2x): "
                     f"{'met' if ratio >= 2 else 'NOT met'}")
    for mix in ("Q4_K_M", "F16"):
        rows = models.get(f"Llama-3-8B-shaped {mix}")
        if rows:
            bw = rows["graphs@1"]["bandwidth_of_copy"]
            lines.append(f"- 8B {mix} batch-1 decode: {bw:.0%} of copy bandwidth (target >= 70%): "
                         f"{'met' if bw >= 0.7 else 'NOT met'}")
    rows = models.get("Llama-3-8B-shaped Q4_K_M")
    if rows:
        most = max(int(key.split("@")[1]) for key in rows if key.startswith("graphs@"))
        scale = rows[f"graphs@{most}"]["decode_tok_s"] / rows["graphs@1"]["decode_tok_s"]
        lines.append(f"- 8B Q4_K_M {most} streams vs 1: {scale:.1f}x (target >= 20x at 64): "
                     f"{'met' if scale >= 20 else 'NOT met'}")
    hf, ours = r.get("transformers"), r.get("lumen_like_transformers")
    if hf and ours:
        for b in ours:
            lines.append(f"- F16 8B vs transformers generate {b}: {ours[b]['tok_s']:.0f} vs {hf[b]['tok_s']:.0f} tok/s "
                         f"({'met' if ours[b]['tok_s'] > hf[b]['tok_s'] else 'NOT met'})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
