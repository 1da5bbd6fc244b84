"""However a request ends (deadline, cancel, shutdown), it is recorded as what it was, its spans
end children first, and the engine's gauges follow at once, with or without another step."""
from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from lumen.engine.core.llm_engine import EngineConfig
from lumen.telemetry import setup_telemetry
from lumen.v1 import inference_pb2 as pb
from tests.otlp_receiver import exporting_to_receiver
from tests.service.conftest import SLOW_READER, StepGate, start_harness


@pytest.fixture
def receiver(monkeypatch):
    with exporting_to_receiver(monkeypatch) as r:
        yield r


def long_request(request_id: str = "", tokens: int = 1500) -> pb.GenerateRequest:
    r = pb.GenerateRequest(prompt="Once upon a time", request_id=request_id)
    r.sampling.temperature = 0
    r.stopping.max_new_tokens, r.stopping.ignore_eos = tokens, True
    r.top_logprobs = 5  # larger messages: writes block sooner
    return r


def generate_finished(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "lumen.requests" and r.getMessage() == "generate finished"]


async def test_expired_deadlines_are_deadline_exceeded_every_time(stories_model, receiver, caplog):
    """The deadline passes while the handler waits on the engine or on a blocked write: both ways
    it is DEADLINE_EXCEEDED in lumen.requests, on the SERVER span and in the log line."""
    telemetry = setup_telemetry()
    harness = await start_harness(stories_model, telemetry, channel_options=SLOW_READER)
    n = 12
    try:
        with caplog.at_level(logging.INFO, logger="lumen.requests"):
            # A deadline that passes before the server even runs the handler is gRPC's alone (no
            # span, no log line), so the first deadline leaves a loaded machine a whole second.
            calls = [harness.stub.Generate(long_request(f"d{i}"), timeout=1.0 + 0.1 * i) for i in range(n)]
            codes = [await call.code() for call in calls]
            assert await asyncio.to_thread(harness.runtime.engine.wait_idle, 30)
        await asyncio.to_thread(telemetry.force_flush)
        spans = await asyncio.to_thread(receiver.wait_for_spans, lambda s: sum(x.kind == "SERVER" for x in s) >= n)
        metrics = await asyncio.to_thread(receiver.wait_for_metrics, lambda m: any(
            x.name == "lumen.requests" for x in m))
    finally:
        await harness.close()
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * n
    servers = [s for s in spans if s.kind == "SERVER"]
    assert {s.attributes["rpc.response.status_code"] for s in servers} == {"DEADLINE_EXCEEDED"}
    assert {s.attributes["error.type"] for s in servers} == {"DEADLINE_EXCEEDED"}
    points = receiver.latest_metric("lumen.requests").points
    assert {p.attributes["status"] for p in points} == {"DEADLINE_EXCEEDED"}
    assert sum(p.value for p in points) == n
    assert [r.status for r in generate_finished(caplog)] == ["DEADLINE_EXCEEDED"] * n
    assert metrics


async def test_cancelled_request_spans_end_before_their_parents(stories_model, receiver):
    """The engine is held while the client cancels, so the abort is applied after the handler
    saw the cancel: the request's spans must still end after the engine's `decode`."""
    telemetry = setup_telemetry()
    harness = await start_harness(stories_model, telemetry)
    try:
        gate = StepGate(harness.llm, free_steps=3)
        call = harness.stub.Generate(long_request("c"))
        await call.read()
        assert await asyncio.to_thread(gate.blocked.wait, 30)
        call.cancel()
        assert await asyncio.to_thread(harness.runtime.engine.wait_until, lambda e: e._aborts, 30)
        gate.release.set()
        assert await asyncio.to_thread(harness.runtime.engine.wait_idle, 30)
        await asyncio.to_thread(telemetry.force_flush)
        spans = await asyncio.to_thread(receiver.wait_for_spans, lambda s: any(x.kind == "SERVER" for x in s))
    finally:
        await harness.close()
    by_id = {s.span_id: s for s in spans}
    (decode,) = [s for s in spans if s.name == "decode"]
    assert decode.end_ns <= by_id[decode.parent_span_id].end_ns
    for span in spans:
        parent = by_id.get(span.parent_span_id)
        if parent is not None:
            assert span.end_ns <= parent.end_ns, f"{span.name} ends after its parent {parent.name}"


async def test_gauges_follow_an_abort_without_another_step(stories_model, receiver):
    telemetry = setup_telemetry()
    harness = await start_harness(stories_model, telemetry)
    try:
        call = harness.stub.Generate(long_request("g"))
        await call.read()
        call.cancel()
        assert await asyncio.to_thread(harness.runtime.engine.wait_idle, 30)
        await asyncio.to_thread(telemetry.force_flush)
        await asyncio.to_thread(receiver.wait_for_metrics, lambda m: any(x.name == "lumen.engine.requests" for x in m))
    finally:
        await harness.close()
    requests = {p.attributes["state"]: p.value for p in receiver.latest_metric("lumen.engine.requests").points}
    blocks = {p.attributes["state"]: p.value for p in receiver.latest_metric("lumen.kv_cache.blocks").points}
    assert requests == {"running": 0, "waiting": 0}
    assert blocks["used"] == 0
    (usage,) = receiver.latest_metric("lumen.kv_cache.usage_ratio").points
    assert usage.value == 0


async def test_shutdown_is_recorded_as_the_client_sees_it(stories_model, caplog):
    harness = await start_harness(stories_model, config=EngineConfig())
    with caplog.at_level(logging.INFO, logger="lumen.requests"):
        call = harness.stub.Generate(long_request("s", tokens=1900))
        await call.read()  # in flight: 1900 tokens take far longer than a stop
        await harness.server.stop(0)
        code = await call.code()
        await harness.channel.close()
    assert code == grpc.StatusCode.UNAVAILABLE
    assert [r.status for r in generate_finished(caplog)] == ["UNAVAILABLE"]
