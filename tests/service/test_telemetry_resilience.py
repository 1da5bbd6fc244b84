"""A collector that is down, killed, refusing or hung never slows or fails a request, nor holds the stop.

Each test serves the same requests twice in one process: first with telemetry
off (the baseline), then exporting through the real OTLP exporters to a broken
collector, with exports every 50-100 ms so they happen while the requests run.
Export runs on the SDK's own threads, so both runs should look alike. The
bounds are generous (a loaded 2-core machine) yet far below what a request
that waited on an export would pay: the exporter's 10 s timeout, or its retries
backing off 1, 2, 4 s. Synchronisation is the receiver's condition waits and
the first message of a gRPC stream; nothing sleeps.
"""
from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import Callable

import grpc
import pytest

from lumen.telemetry import setup_telemetry
from lumen.telemetry.tracing import SHUTDOWN_TIMEOUT_S
from lumen.v1 import inference_pb2 as pb
from tests.otlp_receiver import OtlpReceiver
from tests.otlp_records import MetricRecord
from tests.service.conftest import Harness, start_harness

REQUESTS = 8
CONCURRENCY = 4
MAX_NEW_TOKENS = 16
SPANS_PER_REQUEST = 5  # at least: the SERVER span, tokenize, queue, prefill, decode
EXPORT_TIMEOUT_S = 10.0  # OTEL_EXPORTER_OTLP_TIMEOUT's default, left as is here
# Telemetry.shutdown's bound, plus its cut-off grace, the engine's stop and slack.
STOP_BOUND_S = SHUTDOWN_TIMEOUT_S + 3.0

# Each test takes about 6 s; one whose requests wait on exports would take minutes.
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees only the OTEL_* variables it sets itself."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


def export_to(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "100")


def request() -> pb.GenerateRequest:
    req = pb.GenerateRequest(prompt="Once upon a time")
    req.sampling.temperature = 0
    req.stopping.max_new_tokens, req.stopping.ignore_eos = MAX_NEW_TOKENS, True
    return req


async def timed_generate(harness: Harness, on_first: Callable[[], None] | None = None) -> float:
    """One streamed request's latency in seconds; `on_first` runs when its first message arrives."""
    start = time.perf_counter()
    call = harness.stub.Generate(request())
    msgs = []
    while (msg := await call.read()) is not grpc.aio.EOF:
        msgs.append(msg)
        if len(msgs) == 1 and on_first is not None:
            on_first()
    latency = time.perf_counter() - start
    assert msgs[-1].usage.completion_tokens == MAX_NEW_TOKENS
    assert sum(len(m.token_ids) for m in msgs) == MAX_NEW_TOKENS
    return latency


async def run_requests(harness: Harness, on_first: Callable[[], None] | None = None) -> list[float]:
    """REQUESTS requests, CONCURRENCY at a time; `on_first` fires on the first stream's first message."""
    latencies: list[float] = []
    for wave in range(REQUESTS // CONCURRENCY):
        hooks = [on_first if wave == 0 and i == 0 else None for i in range(CONCURRENCY)]
        latencies += await asyncio.gather(*(timed_generate(harness, hook) for hook in hooks))
    return latencies


async def timed_close(harness: Harness) -> float:
    start = time.perf_counter()
    await harness.close()
    return time.perf_counter() - start


async def baseline(stories_model) -> list[float]:
    """Latencies with telemetry off (no OTEL_* variable set yet)."""
    harness = await start_harness(stories_model, setup_telemetry())
    try:
        await timed_generate(harness)  # warm-up, as in the measured runs
        return await run_requests(harness)
    finally:
        await harness.close()


def assert_not_blocked(latencies: list[float], base: list[float], stop_s: float) -> None:
    assert len(latencies) == REQUESTS
    # 0.5 s of slack: half the exporter's shortest retry backoff (1 s), which a request waiting on
    # an export would pay at least; 0.1 s was within a loaded machine's noise and failed once.
    assert statistics.median(latencies) <= 2 * statistics.median(base) + 0.5, (latencies, base)
    assert max(latencies) < EXPORT_TIMEOUT_S / 2, latencies
    assert stop_s < STOP_BOUND_S, f"server stop took {stop_s:.1f}s"


async def test_collector_down_before_requests(stories_model, monkeypatch):
    base = await baseline(stories_model)
    with OtlpReceiver() as receiver:
        endpoint = receiver.endpoint
    export_to(monkeypatch, endpoint)  # a closed port: every export is refused at connect
    harness = await start_harness(stories_model, setup_telemetry())
    try:
        await timed_generate(harness)
        latencies = await run_requests(harness)
    finally:
        stop_s = await timed_close(harness)
    assert_not_blocked(latencies, base, stop_s)


async def test_collector_killed_mid_stream(stories_model, monkeypatch):
    base = await baseline(stories_model)
    with OtlpReceiver() as receiver:
        export_to(monkeypatch, receiver.endpoint)
        harness = await start_harness(stories_model, setup_telemetry())
        kills: list[asyncio.Task] = []
        try:
            await timed_generate(harness)
            # The pipeline works before the kill.
            await asyncio.to_thread(receiver.wait_for_spans, lambda s: any(x.kind == "SERVER" for x in s))
            latencies = await run_requests(
                harness, on_first=lambda: kills.append(asyncio.create_task(asyncio.to_thread(receiver.stop))))
            await asyncio.gather(*kills)
        finally:
            stop_s = await timed_close(harness)
    assert len(kills) == 1
    assert_not_blocked(latencies, base, stop_s)


@pytest.mark.parametrize("fault", ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "INTERNAL", "hang"])
async def test_collector_refusing_or_hung(stories_model, monkeypatch, fault):
    base = await baseline(stories_model)
    with OtlpReceiver() as receiver:
        if fault == "hang":
            receiver.hang()
        else:
            receiver.fail_with(getattr(grpc.StatusCode, fault))
        export_to(monkeypatch, receiver.endpoint)
        harness = await start_harness(stories_model, setup_telemetry())
        try:
            await timed_generate(harness)
            # Both exporters have met the fault: backing off after an error, or held inside Export.
            await asyncio.to_thread(receiver.wait_for_faulted_exports, traces=1, metrics=1)
            latencies = await run_requests(harness)
        finally:
            stop_s = await timed_close(harness)
        if fault != "hang":
            assert receiver.spans() == [] and receiver.metrics() == []
    assert_not_blocked(latencies, base, stop_s)


def span_accounting(metrics: list[MetricRecord]) -> dict[str, float]:
    """The batch processor's own counts from the newest export: dropped, handed to the exporter, queued."""
    latest = {m.name: m for m in metrics}

    def total(name: str, **attributes: str) -> float:
        points = latest[name].points if name in latest else []
        return sum(p.value for p in points if all(p.attributes.get(k) == v for k, v in attributes.items()))

    processed = "otel.sdk.processor.span.processed"
    return {
        "dropped": total(processed, **{"error.type": "queue_full"}),
        "exported": total(processed) - total(processed, **{"error.type": "queue_full"}),
        "queued": total("otel.sdk.processor.span.queue.size"),
        "capacity": total("otel.sdk.processor.span.queue.capacity"),
    }


async def test_full_span_queue_drops_and_counts(stories_model, monkeypatch):
    base = await baseline(stories_model)
    with OtlpReceiver() as hung, OtlpReceiver() as metrics_receiver:
        hung.hang()
        export_to(monkeypatch, hung.endpoint)
        # Metrics go to a working collector, so the drop counts can be read.
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", metrics_receiver.endpoint)
        monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "8")
        monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4")
        monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")
        harness = await start_harness(stories_model, setup_telemetry())
        try:
            await timed_generate(harness)
            await asyncio.to_thread(hung.wait_for_faulted_exports, traces=1)
            latencies = await run_requests(harness)
            ended = SPANS_PER_REQUEST * (REQUESTS + 1)
            # Every ended span is either dropped, handed to the (held) exporter or queued.
            metrics = await asyncio.to_thread(
                metrics_receiver.wait_for_metrics,
                lambda m: sum(v for k, v in span_accounting(m).items() if k != "capacity") >= ended)
        finally:
            stop_s = await timed_close(harness)
    counts = span_accounting(metrics)
    assert counts["capacity"] == 8
    assert counts["queued"] <= 8
    assert counts["dropped"] >= ended - 8 - counts["exported"] > 0, counts
    assert_not_blocked(latencies, base, stop_s)
