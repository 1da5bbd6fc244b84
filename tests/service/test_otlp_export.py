"""Metrics (and the prefix-cache and speculative spans) arrive over real OTLP/gRPC, with the
units and bucket boundaries of the GenAI conventions. The span tree: test_trace_tree.py."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from lumen.telemetry import setup_telemetry
from lumen.telemetry.metrics import REQUEST_DURATION_BUCKETS_S, TPOT_BUCKETS_S, TTFT_BUCKETS_S
from lumen.telemetry.step_metrics import QUEUE_TIME_BUCKETS_S
from lumen.v1 import inference_pb2 as pb
from tests.otlp_receiver import exporting_to_receiver
from tests.service.conftest import start_harness


async def test_request_metrics_over_otlp(stories_model, monkeypatch):
    with exporting_to_receiver(monkeypatch) as receiver:
        telemetry = setup_telemetry()
        harness = await start_harness(stories_model, telemetry)
        try:
            req = pb.GenerateRequest(prompt="Once upon a time")
            req.sampling.temperature = 0
            req.stopping.max_new_tokens = 8
            [m async for m in harness.stub.Generate(req)]
            bad = pb.GenerateRequest(prompt="x")
            bad.sampling.top_p = 2.0
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in harness.stub.Generate(bad):
                    pass
            await asyncio.to_thread(telemetry.force_flush)
            metrics = await asyncio.to_thread(receiver.wait_for_metrics, lambda m: requests_counted(m) >= 2)
        finally:
            await harness.close()
    latest = {m.name: m for m in metrics}
    buckets = {"gen_ai.server.time_to_first_token": TTFT_BUCKETS_S,
               "gen_ai.server.time_per_output_token": TPOT_BUCKETS_S,
               "gen_ai.server.request.duration": REQUEST_DURATION_BUCKETS_S,
               "lumen.request.queue_time": QUEUE_TIME_BUCKETS_S}
    for name, bounds in buckets.items():
        metric = latest[name]
        assert metric.unit == "s" and metric.data_type == "histogram", name
        assert all(p.explicit_bounds == bounds for p in metric.points) and metric.points[0].count >= 1, name
    # The conventions' boundaries, spelled out here independently of the code.
    assert latest["gen_ai.server.time_to_first_token"].points[0].explicit_bounds[:3] == (0.001, 0.005, 0.01)
    assert latest["gen_ai.server.request.duration"].points[0].explicit_bounds[-1] == 81.92
    assert latest["gen_ai.server.time_per_output_token"].points[0].explicit_bounds[-1] == 2.5
    durations = {p.attributes.get("error.type", "OK"): p.count for p in latest["gen_ai.server.request.duration"].points}
    assert durations == {"OK": 1, "INVALID_ARGUMENT": 1}
    by_status = {p.attributes["status"]: p.value for p in latest["lumen.requests"].points}
    assert by_status == {"OK": 1, "INVALID_ARGUMENT": 1}
    tokens = {p.attributes["gen_ai.token.type"]: p.value for p in latest["lumen.tokens"].points}
    assert tokens["output"] == 8
    assert latest["lumen.requests"].is_monotonic and latest["lumen.tokens"].unit == "{token}"
    (usage,) = latest["lumen.kv_cache.usage_ratio"].points
    assert latest["lumen.kv_cache.usage_ratio"].unit == "1" and 0 <= usage.value < 1
    assert latest["lumen.kv_cache.usage_ratio"].data_type == "gauge"


def requests_counted(metrics) -> int:
    """Requests in the newest export of the cumulative `lumen.requests` counter."""
    exports = [m for m in metrics if m.name == "lumen.requests"]
    return int(sum(p.value for p in exports[-1].points)) if exports else 0


async def test_prefix_cache_hit_reported_in_usage_spans_and_metrics(stories_model, monkeypatch):
    prefix = [1] + [(7 * i) % 500 + 3 for i in range(511)]  # 512 tokens = 32 full blocks of 16
    with exporting_to_receiver(monkeypatch) as receiver:
        telemetry = setup_telemetry()
        harness = await start_harness(stories_model, telemetry)
        try:
            usages = []
            for suffix in ([400, 401, 402], [410, 411]):
                req = pb.GenerateRequest(prompt_token_ids=prefix + suffix)
                req.sampling.temperature = 0
                req.stopping.max_new_tokens = 4
                usages.append([m async for m in harness.stub.Generate(req)][-1].usage)
            await asyncio.to_thread(telemetry.force_flush)
            spans = await asyncio.to_thread(
                receiver.wait_for_spans, lambda s: sum(x.name == "prefill" for x in s) == 2)
            metrics = await asyncio.to_thread(
                receiver.wait_for_metrics, lambda m: any(x.name == "lumen.prefix_cache.hit_tokens" for x in m))
        finally:
            await harness.close()
    assert [u.cached_tokens for u in usages] == [0, 512]
    assert [u.prompt_tokens for u in usages] == [515, 514]
    prefills = sorted((s for s in spans if s.name == "prefill"), key=lambda s: s.start_ns)
    assert [p.attributes["lumen.cached_tokens"] for p in prefills] == [0, 512]
    completions = {s.span_id: s for s in spans if s.name.startswith("text_completion")}
    queues = [s for s in spans if s.name == "queue"]
    assert len(queues) == 2 and all(q.parent_span_id in completions for q in queues)
    cached = sorted(c.attributes["gen_ai.usage.cache_read.input_tokens"] for c in completions.values())
    assert cached == [0, 512]
    hit_tokens = [m for m in metrics if m.name == "lumen.prefix_cache.hit_tokens"][-1]
    assert sum(p.value for p in hit_tokens.points) == 512
    names = {m.name for m in metrics}
    assert {"lumen.engine.batch_size", "lumen.engine.step.tokens", "lumen.engine.requests",
            "lumen.kv_cache.blocks"} <= names


SPEC_COUNTERS = {"lumen.speculative.drafts": "{draft}", "lumen.speculative.draft_tokens": "{token}",
                 "lumen.speculative.accepted_tokens": "{token}",
                 "lumen.speculative.accepted_tokens_per_position": "{token}"}


async def test_speculative_spans_and_metrics_over_otlp(stories_model, monkeypatch):
    with exporting_to_receiver(monkeypatch) as receiver:
        telemetry = setup_telemetry()
        harness = await start_harness(stories_model, telemetry)
        try:
            req = pb.GenerateRequest()
            req.sampling.temperature = 0
            req.stopping.max_new_tokens, req.stopping.ignore_eos = 200, True
            req.speculative.method = "ngram"
            usage = [m async for m in harness.stub.Generate(req)][-1].usage
            await asyncio.to_thread(telemetry.force_flush)
            spans = await asyncio.to_thread(
                receiver.wait_for_spans, lambda s: {"draft", "verify", "decode"} <= {x.name for x in s})
            metrics = await asyncio.to_thread(
                receiver.wait_for_metrics, lambda m: set(SPEC_COUNTERS) <= {x.name for x in m})
        finally:
            await harness.close()
    assert usage.draft_tokens > 0
    latest = {m.name: m for m in metrics}  # the newest export of each (cumulative) counter
    for name, unit in SPEC_COUNTERS.items():
        assert latest[name].unit == unit and latest[name].data_type == "sum", name

    def total(name: str) -> int:
        return int(sum(p.value for p in latest[name].points))

    verifies = [s for s in spans if s.name == "verify"]
    assert total("lumen.speculative.drafts") == len(verifies)
    assert total("lumen.speculative.draft_tokens") == usage.draft_tokens
    assert total("lumen.speculative.accepted_tokens") == usage.accepted_draft_tokens
    # A draft with a accepted tokens counts once at each position 0..a-1.
    positions = latest["lumen.speculative.accepted_tokens_per_position"].points
    per_position = {p.attributes["position"]: p.value for p in positions}
    assert sum(per_position.values()) == usage.accepted_draft_tokens
    assert set(per_position) == set(range(len(per_position)))
    assert all(per_position[i] >= per_position[i + 1] for i in range(len(per_position) - 1))
    assert per_position[0] <= total("lumen.speculative.drafts")
    (decode,) = [s for s in spans if s.name == "decode"]
    assert decode.attributes["lumen.speculative.method"] == "ngram"
    assert decode.attributes["lumen.speculative.draft_tokens"] == usage.draft_tokens
    assert decode.attributes["lumen.speculative.accepted_tokens"] == usage.accepted_draft_tokens
