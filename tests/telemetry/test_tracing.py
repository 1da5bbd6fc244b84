"""Telemetry setup checked end to end: real OTLP/gRPC exports into an in-process receiver.

Synchronisation is `force_flush()` (which returns only after the exporter's
unary Export call, hence after the receiver stored the data) plus the
receiver's condition-based waits; nothing sleeps.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Iterator

import pytest
from opentelemetry import baggage, trace
from opentelemetry.trace import SpanKind

from lumen.telemetry import (
    EngineMetrics,
    Telemetry,
    TelemetryConfigError,
    extract_context,
    format_trace_id,
    inject_context,
    setup_telemetry,
)
from lumen.telemetry.metrics import REQUEST_DURATION_BUCKETS_S, TPOT_BUCKETS_S, TTFT_BUCKETS_S
from tests.otlp_receiver import OtlpReceiver
from tests.otlp_records import MetricRecord, SpanRecord

PARENT_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{PARENT_TRACE_ID}-{PARENT_SPAN_ID}-01"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture
def exporting_env(monkeypatch: pytest.MonkeyPatch, receiver: OtlpReceiver) -> OtlpReceiver:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "lumen-test")
    # Long enough that only force_flush() exports, so the test decides when.
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")
    return receiver


@pytest.fixture
def make_telemetry() -> Iterator:
    """setup_telemetry() whose result is shut down before the receiver stops."""
    made: list[Telemetry] = []

    def make(service_name: str = "lumen") -> Telemetry:
        made.append(setup_telemetry(service_name))
        return made[-1]

    yield make
    for telemetry in made:
        telemetry.shutdown()


def _by_name(spans: list[SpanRecord]) -> dict[str, SpanRecord]:
    return {span.name: span for span in spans}


def _has_names(*names: str):
    return lambda records: set(names) <= {record.name for record in records}


def test_span_tree_arrives_over_otlp(exporting_env: OtlpReceiver, make_telemetry) -> None:
    telemetry = make_telemetry()
    assert telemetry.tracing_enabled
    tracer = telemetry.tracer
    with tracer.start_as_current_span("Generate", kind=SpanKind.SERVER) as root:
        with tracer.start_as_current_span("queue"):
            pass
        with tracer.start_as_current_span("prefill") as prefill:
            prefill.set_attribute("lumen.prompt_tokens", 7)
            prefill.add_event("kv_allocated", {"blocks": 2})
        root_trace_id = format_trace_id(root)
    assert telemetry.force_flush(5.0)

    spans = _by_name(exporting_env.wait_for_spans(_has_names("Generate", "queue", "prefill")))
    generate, queue, prefill_rec = spans["Generate"], spans["queue"], spans["prefill"]
    assert generate.kind == SpanKind.SERVER.name
    assert queue.kind == prefill_rec.kind == SpanKind.INTERNAL.name
    assert generate.parent_span_id == ""
    assert queue.parent_span_id == prefill_rec.parent_span_id == generate.span_id
    assert {generate.trace_id, queue.trace_id, prefill_rec.trace_id} == {root_trace_id}
    assert generate.resource["service.name"] == "lumen-test"
    assert generate.scope == "lumen"
    assert prefill_rec.attributes == {"lumen.prompt_tokens": 7}
    events = [(event.name, event.attributes) for event in prefill_rec.events]
    assert events == [("kv_allocated", {"blocks": 2})]


def test_extracted_traceparent_becomes_the_parent(exporting_env: OtlpReceiver, make_telemetry) -> None:
    telemetry = make_telemetry()
    metadata = [("traceparent", TRACEPARENT), ("tracestate", "vendor=x"), ("baggage", b"tenant=acme")]
    context = extract_context(metadata)
    assert baggage.get_baggage("tenant", context) == "acme"
    span = telemetry.tracer.start_span("Generate", context=context, kind=SpanKind.SERVER)
    span.end()
    assert format_trace_id(span) == PARENT_TRACE_ID
    assert telemetry.force_flush(5.0)

    (received,) = exporting_env.wait_for_spans(_has_names("Generate"))
    assert received.trace_id == PARENT_TRACE_ID
    assert received.parent_span_id == PARENT_SPAN_ID


def test_resource_attributes_and_default_service_name(
    exporting_env: OtlpReceiver, monkeypatch: pytest.MonkeyPatch, make_telemetry
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    telemetry = make_telemetry("lumen-default")
    telemetry.tracer.start_span("probe").end()
    assert telemetry.force_flush(5.0)

    (received,) = exporting_env.wait_for_spans(_has_names("probe"))
    assert received.resource["service.name"] == "lumen-default"
    assert received.resource["deployment.environment"] == "test"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "arg"),
        ({"OTEL_SERVICE_NAME": "from-env"}, "from-env"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs"}, "from-attrs"),
    ],
)
def test_environment_names_the_service_over_the_argument(
    monkeypatch: pytest.MonkeyPatch, make_telemetry, env: dict[str, str], expected: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert make_telemetry("arg").tracer_provider.resource.attributes["service.name"] == expected


def test_without_exporter_spans_are_free_but_carry_trace_ids(make_telemetry) -> None:
    telemetry = make_telemetry()
    assert not telemetry.tracing_enabled and not telemetry.metrics_enabled
    assert telemetry.tracer_provider.sampler.get_description() == "AlwaysOffSampler"

    root = telemetry.tracer.start_span("Generate", kind=SpanKind.SERVER)
    assert not root.is_recording()
    assert root.get_span_context().trace_id != 0
    assert re.fullmatch(r"[0-9a-f]{32}", format_trace_id(root)) and format_trace_id(root) != "0" * 32
    other = telemetry.tracer.start_span("Generate")
    assert format_trace_id(other) != format_trace_id(root)

    child = telemetry.tracer.start_span("Generate", context=extract_context([("traceparent", TRACEPARENT)]))
    assert not child.is_recording()
    assert format_trace_id(child) == PARENT_TRACE_ID
    assert telemetry.force_flush(1.0)


def test_exporter_none_exports_nothing_even_with_an_endpoint(
    exporting_env: OtlpReceiver, monkeypatch: pytest.MonkeyPatch, make_telemetry
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    telemetry = make_telemetry()
    assert not telemetry.tracing_enabled and not telemetry.metrics_enabled
    telemetry.tracer.start_span("Generate").end()
    EngineMetrics(telemetry.meter).record_first_token(0.1, "m")
    # Were any exporter built, force_flush would return only after its Export
    # call had landed in the receiver, so empty now means nothing was sent.
    assert telemetry.force_flush(5.0)
    assert exporting_env.spans() == [] and exporting_env.metrics() == []


def test_inject_then_extract_round_trips_the_span_context(make_telemetry) -> None:
    telemetry = make_telemetry()
    with telemetry.tracer.start_as_current_span("client") as span:
        metadata = dict(inject_context())
    sent = span.get_span_context()
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", metadata["traceparent"])
    received = trace.get_current_span(extract_context(metadata.items())).get_span_context()
    assert (received.trace_id, received.span_id, received.is_remote) == (sent.trace_id, sent.span_id, True)


def test_providers_are_private_to_each_telemetry(make_telemetry) -> None:
    first, second = make_telemetry(), make_telemetry()
    assert first.tracer_provider is not second.tracer_provider
    assert trace.get_tracer_provider() not in (first.tracer_provider, second.tracer_provider)


def test_console_exporter_prints_spans(monkeypatch: pytest.MonkeyPatch, capsys, make_telemetry) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    telemetry = make_telemetry()
    assert telemetry.tracing_enabled and not telemetry.metrics_enabled
    telemetry.tracer.start_span("console-probe").end()
    assert telemetry.force_flush(5.0)
    assert '"name": "console-probe"' in capsys.readouterr().out


def test_unknown_exporter_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(TelemetryConfigError, match="OTEL_TRACES_EXPORTER.*zipkin"):
        setup_telemetry()


@pytest.mark.skipif(
    importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is not None,
    reason="the http exporter is installed, so http/protobuf works",
)
def test_http_protobuf_without_its_package_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    with pytest.raises(TelemetryConfigError, match="opentelemetry-exporter-otlp-proto-http"):
        setup_telemetry()


def _point(metric: MetricRecord, **attributes: str):
    matches = [p for p in metric.points if attributes.items() <= p.attributes.items()]
    assert len(matches) == 1, f"{metric.name}: {attributes} matched {len(matches)} points"
    return matches[0]


def test_engine_metrics_arrive_with_semconv_buckets(exporting_env: OtlpReceiver, make_telemetry) -> None:
    telemetry = make_telemetry()
    assert telemetry.metrics_enabled
    metrics = EngineMetrics(telemetry.meter)
    metrics.request_started()
    metrics.record_first_token(0.05, "tiny")
    metrics.record_finished(
        "tiny", "length", "OK", prompt_tokens=7, completion_tokens=5, duration_s=0.45, ttft_s=0.05
    )
    metrics.request_started()
    metrics.request_ended()
    assert telemetry.force_flush(5.0)

    names = (
        "gen_ai.server.time_to_first_token",
        "gen_ai.server.time_per_output_token",
        "gen_ai.server.request.duration",
        "lumen.tokens",
        "lumen.requests",
        "lumen.requests.active",
    )
    exporting_env.wait_for_metrics(_has_names(*names))
    buckets = {names[0]: TTFT_BUCKETS_S, names[1]: TPOT_BUCKETS_S, names[2]: REQUEST_DURATION_BUCKETS_S}
    for name, bounds in buckets.items():
        metric = exporting_env.latest_metric(name)
        assert (metric.data_type, metric.unit) == ("histogram", "s")
        point = _point(metric, **{"gen_ai.request.model": "tiny"})
        assert point.explicit_bounds == pytest.approx(bounds) and point.count == 1
        assert point.attributes["gen_ai.operation.name"] == "text_completion"
    # TPOT = (duration - ttft) / (completion_tokens - 1)
    assert _point(exporting_env.latest_metric(names[1])).sum == pytest.approx(0.1)

    tokens = exporting_env.latest_metric("lumen.tokens")
    assert tokens.unit == "{token}"
    assert _point(tokens, **{"gen_ai.token.type": "input"}).value == 7
    assert _point(tokens, **{"gen_ai.token.type": "output"}).value == 5
    requests = exporting_env.latest_metric("lumen.requests")
    assert _point(requests, finish_reason="length", status="OK").value == 1
    active = exporting_env.latest_metric("lumen.requests.active")
    assert (active.data_type, active.unit, _point(active).value) == ("sum", "{request}", 1)


def test_failed_request_duration_carries_error_type(exporting_env: OtlpReceiver, make_telemetry) -> None:
    telemetry = make_telemetry()
    metrics = EngineMetrics(telemetry.meter)
    metrics.record_finished("tiny", "cancelled", "CANCELLED", 3, 1, duration_s=0.2, ttft_s=0.1)
    assert telemetry.force_flush(5.0)

    exporting_env.wait_for_metrics(_has_names("gen_ai.server.request.duration"))
    duration = exporting_env.latest_metric("gen_ai.server.request.duration")
    assert _point(duration).attributes["error.type"] == "CANCELLED"
    # One output token: no gap after the first, so no TPOT sample.
    assert "gen_ai.server.time_per_output_token" not in exporting_env.metric_names()
