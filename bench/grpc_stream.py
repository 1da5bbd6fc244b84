"""Single-stream speed through the whole gRPC path: an in-process Lumen server on a
loopback port and a streaming client, so the figures include protobuf, the event
loop and the hand-off from the engine thread (bench/baseline.py measures the engine alone).

    .venv/bin/python bench/grpc_stream.py --model PATH [--dtype float32] [--threads 2] [--tokens 200]

Reports decode tokens/s (after the first token) and time to first token, median of --repeats.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import common  # noqa: E402, F401  (puts the repository on sys.path)
import torch

from lumen.engine.core.llm_engine import EngineConfig  # noqa: E402
from lumen.engine.core.scheduler import SchedulerConfig  # noqa: E402
from lumen.engine.weights.gguf_loader import load_gguf  # noqa: E402
from lumen.service.registry import ModelRegistry  # noqa: E402
from lumen.service.server import LumenServer, start_runtime  # noqa: E402
from lumen.telemetry import setup_telemetry  # noqa: E402
from lumen.v1 import inference_pb2 as pb  # noqa: E402
from lumen.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402


async def one_stream(stub, request) -> tuple[float, float]:
    start = time.perf_counter()
    first = last = None
    n = 0
    async for msg in stub.Generate(request):
        n += len(msg.token_ids)
        last = time.perf_counter()
        first = first or last
    return first - start, (n - 1) / (last - first)


async def run(args) -> None:
    import grpc
    model = load_gguf(args.model, dtype=getattr(torch, args.dtype))
    telemetry = setup_telemetry()
    config = EngineConfig(scheduler=SchedulerConfig(max_running=1))
    server = LumenServer(ModelRegistry([start_runtime(model, config, telemetry)]), telemetry, config)
    port = await server.start("127.0.0.1", 0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.InferenceStub(channel)
        req = pb.GenerateRequest(prompt_token_ids=[model.tokenizer.bos_id or 1] + list(range(100, 100 + args.prompt - 1)))
        req.sampling.temperature = 0
        req.stopping.max_new_tokens = args.tokens
        req.stopping.ignore_eos = True
        await one_stream(stub, req)  # warm-up
        runs = [await one_stream(stub, req) for _ in range(args.repeats)]
    await server.stop(0)
    ttft = 1000 * statistics.median(r[0] for r in runs)
    rate = statistics.median(r[1] for r in runs)
    print(f"| {Path(args.model).name} | {args.dtype} | {args.threads} | {rate:.1f} | {ttft:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--prompt", type=int, default=128, help="prompt length in tokens")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
