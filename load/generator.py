"""The load generator behind `lumen bench`: N concurrent Generate streams, per-token timing.

A closed loop: `concurrency` workers share one channel, and each starts its next
request as soon as its previous one ends, until `requests` have been sent or
`duration_s` has passed. Every message is timestamped on arrival, so time to
first token and inter-token latency are measured where a client sees them (ghz
only sees whole-stream latency). A failed RPC becomes a record with its gRPC
status, never an exception; anything else that goes wrong is a bug and propagates.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import grpc
from tqdm import tqdm

from lumen.load.prompts import BUILTIN_PROMPTS, PromptSpec
from lumen.load.stats import distribution
from lumen.v1 import inference_pb2 as pb
from lumen.v1 import inference_pb2_grpc as pb_grpc

RESULT_SCHEMA = "lumen.bench/v1"


@dataclass(slots=True)
class LoadConfig:
    """What to send and how hard. With duration_s set, `requests` is an optional cap."""

    concurrency: int = 16
    requests: int | None = 64
    duration_s: float | None = None
    max_new_tokens: int = 64
    # None leaves the field unset: the server's default (1.0). Not checked here, so a
    # run can measure how the server rejects bad values.
    temperature: float | None = None
    ignore_eos: bool = False
    # Request i is sent with seed + i: reproducible, yet requests differ.
    seed: int | None = None
    deadline_s: float | None = 60.0
    warmup_requests: int = 0
    model: str = ""
    prompts: list[PromptSpec] = field(default_factory=lambda: list(BUILTIN_PROMPTS))
    prompt_source: str = "builtin"

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.requests is None and self.duration_s is None:
            raise ValueError("set requests, duration_s or both")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0 (it is a uint64), got {self.seed}")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {self.deadline_s}")
        if self.warmup_requests < 0:
            raise ValueError(f"warmup_requests must be >= 0, got {self.warmup_requests}")
        if not self.prompts:
            raise ValueError("prompts must not be empty")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(slots=True)
class RequestRecord:
    """What one measured request did. Times in milliseconds; start_ms is since the run began."""

    index: int
    prompt_index: int
    start_ms: float = 0.0
    status: str = "OK"
    error: str = ""
    request_id: str = ""
    trace_id: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    # From the final message's usage; tokens_received counts token ids as they arrived
    # (they differ only when a stream ends early).
    completion_tokens: int = 0
    tokens_received: int = 0
    ttft_ms: float | None = None
    e2e_ms: float = 0.0
    itl_ms: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "OK"


def build_request(config: LoadConfig, index: int) -> tuple[pb.GenerateRequest, int]:
    """Request number `index` and the index of the prompt it uses (round-robin)."""
    prompt_index = index % len(config.prompts)
    spec = config.prompts[prompt_index]
    req = pb.GenerateRequest(model=config.model, prompt=spec.prompt)
    req.stopping.max_new_tokens = spec.max_new_tokens or config.max_new_tokens
    req.stopping.ignore_eos = config.ignore_eos
    if config.temperature is not None:
        req.sampling.temperature = config.temperature
    if config.seed is not None:
        req.sampling.seed = config.seed + index
    return req, prompt_index


def _on_message(record: RequestRecord, msg: pb.GenerateResponse, start: float, now: float,
                last_token_at: float | None) -> float | None:
    """Fold one message into the record; return when the latest tokens arrived."""
    record.request_id = record.request_id or msg.request_id
    n = len(msg.token_ids)
    if n:
        if last_token_at is None:
            record.ttft_ms = (now - start) * 1000
        else:
            # A message with several tokens (merged deltas, speculation) spreads its
            # gap over them, so ITL stays a per-token figure. Extra tokens of the
            # first message have no gap of their own and add no sample.
            record.itl_ms.extend([(now - last_token_at) * 1000 / n] * n)
        record.tokens_received += n
        last_token_at = now
    if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
        record.finish_reason = pb.FinishReason.Name(msg.finish_reason).removeprefix("FINISH_REASON_").lower()
        record.prompt_tokens = msg.usage.prompt_tokens
        record.completion_tokens = msg.usage.completion_tokens
        record.trace_id = msg.trace_id
    return last_token_at


async def measure_request(stub: pb_grpc.InferenceStub, request: pb.GenerateRequest,
                          record: RequestRecord, deadline_s: float | None, run_start: float) -> RequestRecord:
    """Run one Generate to its end, timestamping every message into `record`."""
    start = time.perf_counter()
    record.start_ms = (start - run_start) * 1000
    last_token_at = None
    try:
        async for msg in stub.Generate(request, timeout=deadline_s):
            last_token_at = _on_message(record, msg, start, time.perf_counter(), last_token_at)
    except grpc.aio.AioRpcError as err:
        record.status = err.code().name
        record.error = err.details() or ""
    record.e2e_ms = (time.perf_counter() - start) * 1000
    return record


async def _run_phase(stub: pb_grpc.InferenceStub, config: LoadConfig, total: int | None,
                     stop_at: float | None, on_done: Callable[[RequestRecord], None]) -> list[RequestRecord]:
    """Keep `concurrency` requests in flight until `total` are sent or `stop_at` passes."""
    indices = itertools.count()  # shared by the workers; one event loop, so no lock
    records: list[RequestRecord] = []
    run_start = time.perf_counter()

    async def worker() -> None:
        while stop_at is None or time.perf_counter() < stop_at:
            index = next(indices)
            if total is not None and index >= total:
                return
            request, prompt_index = build_request(config, index)
            record = RequestRecord(index=index, prompt_index=prompt_index)
            records.append(await measure_request(stub, request, record, config.deadline_s, run_start))
            on_done(record)

    workers = config.concurrency if total is None else min(config.concurrency, total)
    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:  # when one worker fails, the others must not outlive the run
            task.cancel()
    return sorted(records, key=lambda r: r.index)


@dataclass(slots=True)
class LoadResult:
    target: str
    config: LoadConfig
    records: list[RequestRecord]
    duration_s: float
    started_at: str

    def summary(self) -> dict:
        """Throughput, latency distributions (of successful requests) and error counts."""
        ok = [r for r in self.records if r.ok]
        completion = sum(r.completion_tokens for r in ok)

        def per_second(n: int) -> float:
            return n / self.duration_s if self.duration_s > 0 else 0.0

        tpot = [(r.e2e_ms - r.ttft_ms) / (r.completion_tokens - 1)
                for r in ok if r.ttft_ms is not None and r.completion_tokens > 1]
        return {
            "requests": len(self.records),
            "successful": len(ok),
            "failed": len(self.records) - len(ok),
            "errors_by_status": dict(sorted(Counter(r.status for r in self.records if not r.ok).items())),
            "finish_reasons": dict(sorted(Counter(r.finish_reason for r in ok).items())),
            "duration_s": self.duration_s,
            "requests_per_s": per_second(len(ok)),
            "output_tokens_per_s": per_second(completion),
            "prompt_tokens": sum(r.prompt_tokens for r in ok),
            "completion_tokens": completion,
            "ttft_ms": distribution([r.ttft_ms for r in ok if r.ttft_ms is not None]),
            "itl_ms": distribution([gap for r in ok for gap in r.itl_ms]),
            "tpot_ms": distribution(tpot),
            "e2e_ms": distribution([r.e2e_ms for r in ok]),
        }

    def to_dict(self) -> dict:
        return {"schema": RESULT_SCHEMA, "target": self.target, "started_at": self.started_at,
                "config": self.config.to_dict(), "summary": self.summary(),
                "requests": [asdict(r) for r in self.records]}

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


async def run_load(target: str, config: LoadConfig, progress: bool = False) -> LoadResult:
    """Warm up (unrecorded), then run the measured phase against `target` (host:port)."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        if config.warmup_requests:
            await _run_phase(stub, config, config.warmup_requests, None, lambda _: None)
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with tqdm(total=config.requests, unit="req", desc="bench", file=sys.stderr,
                  disable=not progress, dynamic_ncols=True) as bar:
            failed = 0

            def on_done(record: RequestRecord) -> None:
                nonlocal failed
                failed += not record.ok
                bar.set_postfix(failed=failed, refresh=False)
                bar.update(1)

            start = time.perf_counter()
            stop_at = start + config.duration_s if config.duration_s is not None else None
            records = await _run_phase(stub, config, config.requests, stop_at, on_done)
            duration = time.perf_counter() - start
    return LoadResult(target, config, records, duration, started_at)
