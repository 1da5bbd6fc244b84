"""One Generate's trace as an operator sees it, received over real OTLP/gRPC.

SERVER span (gRPC conventions) -> `text_completion {model}` (GenAI conventions) ->
tokenize, queue, prefill, decode (and draft/verify when speculating); sampled
`engine_step` spans link to the requests they served; latency points carry the
request's trace as an exemplar; the `lumen` CLI's span is the server span's parent.
"""
from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from lumen.engine.core.llm_engine import EngineConfig
from lumen.service.client import traced_generate
from lumen.telemetry import setup_telemetry
from lumen.v1 import inference_pb2 as pb
from tests.otlp_receiver import exporting_to_receiver
from tests.service.conftest import start_harness

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
GENERATE = "lumen.v1.Inference/Generate"
EVERY_STEP = EngineConfig(step_span_interval_s=0.0)


@pytest.fixture
def receiver(monkeypatch):
    with exporting_to_receiver(monkeypatch) as r:
        monkeypatch.setenv("OTEL_SERVICE_NAME", "lumen-test")
        yield r


def greedy(prompt: str = "Once upon a time", max_new_tokens: int = 8) -> pb.GenerateRequest:
    req = pb.GenerateRequest(prompt=prompt, request_id="req-1")
    req.sampling.temperature = 0
    req.sampling.seed = 7
    req.stopping.max_new_tokens = max_new_tokens
    return req


async def run_and_collect(receiver, model, requests, config=EVERY_STEP, capture_content=False, until=None):
    """Run `requests` (coroutines taking the harness) and return every span and metric received."""
    telemetry = setup_telemetry()
    harness = await start_harness(model, telemetry, config, capture_content=capture_content)
    try:
        results = [await request(harness) for request in requests]
        # A cancelled call's client returns before the server has finished it: wait for that.
        assert await asyncio.to_thread(harness.runtime.engine.wait_idle, 30)
        await asyncio.to_thread(telemetry.force_flush)
        n = len(requests)
        spans = await asyncio.to_thread(receiver.wait_for_spans, until or (
            lambda s: sum(x.kind == "SERVER" for x in s) >= n))
        metrics = await asyncio.to_thread(receiver.wait_for_metrics, lambda m: any(
            x.name == "gen_ai.server.request.duration" for x in m))
    finally:
        await harness.close()
    return results, spans, {m.name: m for m in metrics}


def generate(req, metadata=()):
    async def call(harness):
        return [m async for m in harness.stub.Generate(req, metadata=metadata)]
    return call


def children(spans, parent) -> dict:
    return {s.name: s for s in spans if s.parent_span_id == parent.span_id}


async def test_request_trace_tree_and_genai_attributes(stories_model, receiver):
    metadata = (("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),)
    (msgs,), spans, metrics = await run_and_collect(receiver, stories_model, [generate(greedy(), metadata)])
    assert msgs[-1].trace_id == CLIENT_TRACE
    (server,) = [s for s in spans if s.kind == "SERVER"]
    assert server.name == GENERATE and server.trace_id == CLIENT_TRACE and server.parent_span_id == CLIENT_SPAN
    assert server.attributes["rpc.system.name"] == "grpc" and server.attributes["rpc.method"] == GENERATE
    assert server.attributes["rpc.response.status_code"] == "OK" and server.status_code == "UNSET"
    assert server.resource["service.name"] == "lumen-test"
    (completion,) = children(spans, server).values()
    name = stories_model.name
    assert completion.name == f"text_completion {name}" and completion.kind == "INTERNAL"
    a = completion.attributes
    assert a["gen_ai.operation.name"] == "text_completion" and a["gen_ai.provider.name"] == "lumen"
    assert a["gen_ai.request.model"] == name and a["gen_ai.response.model"] == name
    assert (a["gen_ai.request.max_tokens"], a["gen_ai.request.temperature"], a["gen_ai.request.top_p"],
            a["gen_ai.request.top_k"], a["gen_ai.request.seed"]) == (8, 0.0, 1.0, 0, 7)
    assert a["gen_ai.response.id"] == "req-1" and a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["gen_ai.usage.output_tokens"] == 8 and a["gen_ai.usage.input_tokens"] == msgs[-1].usage.prompt_tokens
    assert a["gen_ai.usage.cache_read.input_tokens"] == 0
    assert 0 < a["gen_ai.response.time_to_first_chunk"] < (completion.end_ns - completion.start_ns) / 1e9
    assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a  # opt-in only
    phases = children(spans, completion)
    assert set(phases) == {"tokenize", "queue", "prefill", "decode"}
    assert all(p.trace_id == CLIENT_TRACE and p.kind == "INTERNAL" for p in phases.values())
    order = [phases[n] for n in ("tokenize", "queue", "prefill", "decode")]
    assert all(x.end_ns <= y.start_ns + 1000 for x, y in zip(order, order[1:]))  # 1 us: clock conversion
    decode = phases["decode"].attributes
    assert decode["lumen.completion_tokens"] == 8 and decode["lumen.batch.steps"] == 7
    assert decode["lumen.batch.size.min"] == decode["lumen.batch.size.max"] == 1
    assert phases["prefill"].attributes["lumen.batch.steps"] == 1
    steps = [s for s in spans if s.name == "engine_step"]
    assert len(steps) == 8 and all(s.parent_span_id == "" for s in steps)
    for step in steps:
        (link,) = step.links
        assert (link.trace_id, link.span_id) == (CLIENT_TRACE, completion.span_id)
        assert step.attributes["lumen.engine.batch_size"] == 1
    assert sorted(link.attributes["lumen.phase"] for s in steps for link in s.links) == ["decode"] * 7 + ["prefill"]
    for metric in ("gen_ai.server.request.duration", "gen_ai.server.time_to_first_token",
                   "gen_ai.server.time_per_output_token"):
        (point,) = metrics[metric].points
        assert [(e.trace_id, e.span_id) for e in point.exemplars] == [(CLIENT_TRACE, completion.span_id)], metric


async def test_batch_sizes_of_concurrent_requests(stories_model, receiver):
    async def four(harness):
        reqs = [greedy(max_new_tokens=6) for _ in range(4)]
        for i, r in enumerate(reqs):
            r.request_id = f"r{i}"
        return await asyncio.gather(*(generate(r)(harness) for r in reqs))

    _, spans, _ = await run_and_collect(receiver, stories_model, [four], until=lambda s: sum(
        x.kind == "SERVER" for x in s) >= 4)
    decodes = [s for s in spans if s.name == "decode"]
    assert len(decodes) == 4
    assert max(d.attributes["lumen.batch.size.max"] for d in decodes) > 1  # they shared steps
    completions = {s.span_id for s in spans if s.name.startswith("text_completion")}
    steps = [s for s in spans if s.name == "engine_step"]
    assert all(len(s.links) == s.attributes["lumen.engine.batch_size"] for s in steps)
    assert {link.span_id for s in steps for link in s.links} == completions


async def test_client_cancel_is_not_an_error(stories_model, receiver):
    async def cancel_after_first(harness):
        call = harness.stub.Generate(greedy(max_new_tokens=200))
        await call.read()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call.read()

    _, spans, metrics = await run_and_collect(receiver, stories_model, [cancel_after_first])
    (server,) = [s for s in spans if s.kind == "SERVER"]
    assert server.attributes["rpc.response.status_code"] == "CANCELLED" and server.status_code == "UNSET"
    (completion,) = children(spans, server).values()
    assert completion.status_code == "UNSET" and "error.type" not in completion.attributes
    assert "cancelled by client" in [e.name for e in completion.events]
    statuses = {p.attributes["status"] for p in metrics["lumen.requests"].points}
    assert statuses == {"CANCELLED"}


async def test_invalid_argument_marks_the_operation_not_the_rpc(stories_model, receiver):
    async def bad(harness):
        req = greedy()
        req.sampling.top_p = 2.0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(req)(harness)
        return err.value.code()

    (code,), spans, metrics = await run_and_collect(receiver, stories_model, [bad])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    (server,) = [s for s in spans if s.kind == "SERVER"]
    # gRPC conventions: a client's mistake is not a server error.
    assert server.attributes["rpc.response.status_code"] == "INVALID_ARGUMENT" and server.status_code == "UNSET"
    (completion,) = children(spans, server).values()
    assert completion.status_code == "ERROR" and completion.attributes["error.type"] == "InvalidRequestError"
    assert any(e.name == "exception" for e in completion.events)
    (point,) = metrics["gen_ai.server.request.duration"].points
    assert point.attributes["error.type"] == "INVALID_ARGUMENT"


async def test_prompt_and_completion_recorded_only_when_asked(stories_model, receiver):
    (msgs,), spans, _ = await run_and_collect(receiver, stories_model, [generate(greedy())], capture_content=True)
    (completion,) = [s for s in spans if s.name.startswith("text_completion")]
    inputs = json.loads(completion.attributes["gen_ai.input.messages"])
    outputs = json.loads(completion.attributes["gen_ai.output.messages"])
    assert inputs == [{"role": "user", "parts": [{"type": "text", "content": "Once upon a time"}]}]
    assert outputs[0]["parts"][0]["content"] == "".join(m.text for m in msgs)
    assert outputs[0]["role"] == "assistant" and outputs[0]["finish_reason"] == "length"


async def test_speculative_draft_and_verify_are_children_of_the_request(stories_model, receiver):
    req = greedy(prompt="", max_new_tokens=60)
    req.stopping.ignore_eos = True
    req.speculative.method = "ngram"
    (msgs,), spans, _ = await run_and_collect(receiver, stories_model, [generate(req)])
    usage = msgs[-1].usage
    (completion,) = [s for s in spans if s.name.startswith("text_completion")]
    phases = [s for s in spans if s.parent_span_id == completion.span_id]
    drafts = [s for s in phases if s.name == "draft"]
    verifies = [s for s in phases if s.name == "verify"]
    assert drafts and verifies and usage.draft_tokens > 0
    assert sum(v.attributes["lumen.speculative.proposed_tokens"] for v in verifies) == usage.draft_tokens
    assert sum(v.attributes["lumen.speculative.accepted_tokens"] for v in verifies) == usage.accepted_draft_tokens
    assert all(d.attributes["lumen.speculative.method"] == "ngram" for d in drafts)
    assert completion.attributes["lumen.speculative.draft_tokens"] == usage.draft_tokens


async def test_cli_client_span_is_the_server_span_parent(stories_model, receiver):
    async def via_cli(harness):
        return await asyncio.to_thread(traced_generate, harness.target, greedy())

    (summary,), spans, _ = await run_and_collect(receiver, stories_model, [via_cli], until=lambda s: any(
        x.kind == "CLIENT" for x in s) and any(x.kind == "SERVER" for x in s))
    (client,) = [s for s in spans if s.kind == "CLIENT"]
    (server,) = [s for s in spans if s.kind == "SERVER"]
    assert client.name == GENERATE and client.parent_span_id == ""
    assert client.resource["service.name"] == "lumen-test"  # OTEL_SERVICE_NAME wins over lumen-cli
    assert client.attributes["rpc.response.status_code"] == "OK" and client.attributes["server.port"] > 0
    assert (server.trace_id, server.parent_span_id) == (client.trace_id, client.span_id)
    assert summary.trace_id == client.trace_id and summary.completion_tokens == 8


async def test_cli_propagates_a_sampled_context_without_its_own_exporter(stories_model, receiver, monkeypatch):
    """A CLI that exports nothing must not switch the server's tracing off through the sampled flag."""
    async def via_cli(harness):
        with monkeypatch.context() as m:
            m.setenv("OTEL_TRACES_EXPORTER", "none")
            m.setenv("OTEL_METRICS_EXPORTER", "none")
            return await asyncio.to_thread(traced_generate, harness.target, greedy())

    (summary,), spans, _ = await run_and_collect(receiver, stories_model, [via_cli])
    (server,) = [s for s in spans if s.kind == "SERVER"]
    assert server.trace_id == summary.trace_id and server.parent_span_id != ""
    assert not [s for s in spans if s.kind == "CLIENT"]


async def test_genai_attribute_types_and_required_metric_attributes(stories_model, receiver):
    """top_k is a double in the GenAI conventions; every gen_ai.server.* point carries the
    required gen_ai.provider.name."""
    req = greedy()
    req.sampling.top_k = 40
    _, spans, metrics = await run_and_collect(receiver, stories_model, [generate(req)])
    (completion,) = [s for s in spans if s.name.startswith("text_completion")]
    top_k = completion.attributes["gen_ai.request.top_k"]
    assert isinstance(top_k, float) and top_k == 40.0
    server_metrics = [m for name, m in metrics.items() if name.startswith("gen_ai.server.")]
    assert {m.name for m in server_metrics} >= {"gen_ai.server.request.duration", "gen_ai.server.time_to_first_token"}
    for metric in server_metrics:
        for point in metric.points:
            assert point.attributes["gen_ai.provider.name"] == "lumen", metric.name
