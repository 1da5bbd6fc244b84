"""A Generate's span tree arrives over real OTLP/gRPC, continuing the client's traceparent."""
from __future__ import annotations

import asyncio

from lumen.v1 import inference_pb2 as pb
from telemetry import setup_telemetry
from tests.otlp_receiver import OtlpReceiver
from tests.service.conftest import start_harness

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


async def test_generate_span_tree_over_otlp(stories_model, monkeypatch):
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "lumen-test")
        telemetry = setup_telemetry()
        harness = await start_harness(stories_model, telemetry)
        try:
            req = pb.GenerateRequest(prompt="Once upon a time")
            req.sampling.temperature = 0
            req.stopping.max_new_tokens = 8
            metadata = (("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),)
            msgs = [m async for m in harness.stub.Generate(req, metadata=metadata)]
            assert msgs[-1].trace_id == CLIENT_TRACE
            await asyncio.to_thread(telemetry.force_flush)
            spans = await asyncio.to_thread(
                receiver.wait_for_spans, lambda s: {"decode", "prefill", "tokenize"} <= {x.name for x in s}
                and any(x.kind == "SERVER" for x in s))
        finally:
            await harness.channel.close()
            await harness.server.stop(0)
    by_name = {s.name: s for s in spans}
    root = by_name["lumen.v1.Inference/Generate"]
    assert root.kind == "SERVER"
    assert root.trace_id == CLIENT_TRACE and root.parent_span_id == CLIENT_SPAN
    assert root.resource["service.name"] == "lumen-test"
    for child in ("tokenize", "prefill", "decode"):
        assert by_name[child].parent_span_id == root.span_id, child
        assert by_name[child].trace_id == CLIENT_TRACE
    assert by_name["decode"].attributes["lumen.completion_tokens"] == 8
    assert by_name["prefill"].end_ns <= by_name["decode"].start_ns
    assert root.attributes["lumen.usage.completion_tokens"] == 8
