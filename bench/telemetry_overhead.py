"""What full telemetry costs: aggregate throughput of 16 concurrent gRPC streams with every
span sampled, metrics exported every second and logs exported, all over OTLP to a local
receiver (another process), against telemetry off. Runs alternate off / full, side by side.

    .venv/bin/python bench/telemetry_overhead.py [--model PATH] [--streams 16] [--tokens 64]
        [--rounds 3] [--step-span-interval 0.1] [--threads 2]

"Full": OTEL_TRACES_SAMPLER=always_on, OTEL_METRIC_EXPORT_INTERVAL=1000, OTEL_LOGS_EXPORTER=otlp
with JSON logs, and `engine_step` spans at the server's default rate (--step-span-interval 0.1;
0 records every step, the most the server can be asked to record). "Off": no exporter.
Throughput = all generated tokens / wall time from the first request to the last message, in
the second of two waves on each server, so it is the steady state: the first wave makes the
exporters' connections and first exports.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from common import REPO, RESULTS, ensure_tinyllama, prompt_ids  # noqa: E402  (sets sys.path)

from lumen.engine.core.llm_engine import EngineConfig  # noqa: E402
from lumen.engine.core.scheduler import SchedulerConfig  # noqa: E402
from lumen.engine.weights.gguf_loader import load_gguf  # noqa: E402
from lumen.service.registry import ModelRegistry  # noqa: E402
from lumen.service.server import LumenServer, start_runtime  # noqa: E402
from lumen.telemetry import setup_logging, setup_telemetry  # noqa: E402
from lumen.v1 import inference_pb2 as pb  # noqa: E402
from lumen.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

RECEIVER = """
import os
import sys
from tests.otlp_receiver import OtlpReceiver
with OtlpReceiver() as r:
    print(r.endpoint, flush=True)
    sys.stdin.read()  # until the benchmark closes it
    print(len(r.spans()), len(r.metrics()), len(r.logs()), sum(os.times()[:2]), flush=True)
"""
FULL_ENV = {"OTEL_TRACES_SAMPLER": "always_on", "OTEL_METRIC_EXPORT_INTERVAL": "1000",
            "OTEL_LOGS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_INSECURE": "true"}


async def one_round(model, args, full: bool) -> float:
    saved = dict(os.environ)
    if full:
        os.environ.update(FULL_ENV, OTEL_EXPORTER_OTLP_ENDPOINT=args.endpoint)
    logs = setup_logging("INFO", "json", stream=io.StringIO())
    telemetry = setup_telemetry()
    os.environ.clear()
    os.environ.update(saved)
    config = EngineConfig(scheduler=SchedulerConfig(max_running=args.streams),
                          step_span_interval_s=args.step_span_interval)
    server = LumenServer(ModelRegistry([start_runtime(model, config, telemetry)]), telemetry, config)
    port = await server.start("127.0.0.1", 0)
    vocab, bos = model.config.vocab_size, model.tokenizer.bos_id or 1
    async with __import__("grpc").aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def stream(i: int) -> int:
            req = pb.GenerateRequest(prompt_token_ids=prompt_ids(vocab, bos, 32, seed=i))
            req.sampling.temperature = 0
            req.stopping.max_new_tokens, req.stopping.ignore_eos = args.tokens, True
            return sum([len(m.token_ids) async for m in stub.Generate(req)])

        # A first wave, untimed: exporter connections are made, the first exports go out.
        await asyncio.gather(*(stream(i) for i in range(args.streams)))
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(stream(args.streams + i) for i in range(args.streams))))
        wall = time.perf_counter() - start
    await server.stop(0)
    logs.shutdown()
    return tokens / wall


async def run(args) -> dict:
    model = load_gguf(args.model or ensure_tinyllama())
    await one_round(model, args, full=False)  # warm-up: kernels built, caches filled
    rates: dict[str, list[float]] = {"off": [], "full": []}
    for _ in range(args.rounds):
        for mode in ("off", "full"):
            rates[mode].append(await one_round(model, args, full=mode == "full"))
            print(f"{mode}: {rates[mode][-1]:.1f} tok/s", flush=True)
    return {"model": os.path.basename(str(args.model or ensure_tinyllama())), "streams": args.streams,
            "tokens": args.tokens, "step_span_interval_s": args.step_span_interval, "rates": rates,
            "ratio_of_medians": statistics.median(rates["full"]) / statistics.median(rates["off"]),
            "pair_ratios": [f / o for f, o in zip(rates["full"], rates["off"])]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: the synthetic TinyLlama-shaped Q8_0)")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--step-span-interval", type=float, default=0.1,
                   help="engine_step span interval of the full run (0.1: the server's default; 0: every step)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER], cwd=REPO, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    args.endpoint = receiver.stdout.readline().strip()
    try:
        result = asyncio.run(run(args))
    finally:
        receiver.stdin.close()
        received = receiver.stdout.readline().split()
        receiver.wait()
    result["received_spans_metrics_logs"] = [int(x) for x in received[:3]]
    result["receiver_cpu_s"] = float(received[3])
    print(json.dumps(result, indent=1))
    print(f"| {result['model']} | {args.streams} | {statistics.median(result['rates']['off']):.1f} | "
          f"{statistics.median(result['rates']['full']):.1f} | {result['ratio_of_medians']:.3f}x | "
          f"{', '.join(f'{r:.3f}' for r in result['pair_ratios'])} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"telemetry_overhead-{result['model'].removesuffix('.gguf')}-steps{args.step_span_interval:g}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
