"""Structured logs: JSON and text lines tagged with the current span, and OTLP export over the wire.

Lines are written to a StringIO; OTLP records go to the in-process receiver
and are awaited with `force_flush()` plus its condition-based wait; nothing
sleeps.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from typing import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from lumen.service import cli
from lumen.telemetry import LogSetup, TelemetryConfigError, setup_logging, setup_telemetry
from lumen.telemetry.logs import LOG_FORMATS, JsonFormatter
from tests.otlp_receiver import OtlpReceiver
from tests.otlp_records import LogRecord

RFC3339_MS_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
log = logging.getLogger("lumen.test.logs")


@pytest.fixture
def logs() -> Iterator:
    """setup_logging() into a StringIO; returns (setup, lines()); undone after the test."""
    made: list[LogSetup] = []

    def make(fmt: str = "json", level: str = "INFO"):
        stream = io.StringIO()
        made.append(setup_logging(level, fmt, stream=stream))
        return made[-1], lambda: stream.getvalue().splitlines()

    yield make
    for setup in made:
        setup.shutdown()


def _tracer():
    # A private provider: the OpenTelemetry globals stay untouched.
    return TracerProvider().get_tracer("test")


def _ids(span: trace.Span) -> tuple[str, str]:
    context = span.get_span_context()
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


def test_json_lines_carry_the_current_span_ids_and_none_outside(logs):
    _, lines = logs("json")
    with _tracer().start_as_current_span("outer") as outer:
        log.info("in %s", "outer")
        with _tracer().start_as_current_span("inner") as inner:
            log.warning("in inner")
    log.info("outside")
    first, second, third = (json.loads(line) for line in lines())
    assert RFC3339_MS_UTC.match(first["time"]), first["time"]
    assert (first["level"], first["logger"], first["message"]) == ("INFO", "lumen.test.logs", "in outer")
    assert (first["trace_id"], first["span_id"]) == _ids(outer)
    assert (second["level"], second["trace_id"], second["span_id"]) == ("WARNING", *_ids(inner))
    assert re.fullmatch(r"[0-9a-f]{32}", first["trace_id"]) and re.fullmatch(r"[0-9a-f]{16}", first["span_id"])
    assert third["message"] == "outside" and "trace_id" not in third and "span_id" not in third


def test_ids_are_there_when_spans_are_not_exported(logs):
    """Without exporters the server's spans do not record, yet the client gets a trace id to grep for."""
    telemetry = setup_telemetry()
    _, lines = logs("json")
    try:
        with telemetry.tracer.start_as_current_span("request") as span:
            assert not span.is_recording()
            log.info("request done")
    finally:
        telemetry.shutdown()
    record = json.loads(lines()[0])
    assert (record["trace_id"], record["span_id"]) == _ids(span)


def test_extra_fields_are_merged_json_safe_and_never_replace_core_keys(logs):
    _, lines = logs("json")
    unserialisable = object()
    log.info("done", extra={"request_id": "r-1", "completion_tokens": 8, "ttft_s": 0.25, "status": None,
                            "obj": unserialisable, "tags": ["a", 1], "time": "not mine"})
    log.info("odd", extra={"ratio": float("nan"), "by_pair": {(1, 2): "x"}, "fine": 3})
    done, odd = (json.loads(line) for line in lines())
    assert done["request_id"] == "r-1" and done["completion_tokens"] == 8 and done["ttft_s"] == 0.25
    assert done["status"] is None and done["tags"] == ["a", 1] and done["obj"] == str(unserialisable)
    assert RFC3339_MS_UTC.match(done["time"])
    assert "args" not in done and "levelno" not in done and "taskName" not in done
    assert odd["ratio"] == "nan" and odd["by_pair"] == str({(1, 2): "x"}) and odd["fine"] == 3


def test_exceptions_are_one_json_field(logs):
    _, lines = logs("json")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("generate failed", extra={"request_id": "r-2"})
    [line] = lines()
    record = json.loads(line)
    assert record["level"] == "ERROR" and record["request_id"] == "r-2"
    assert record["exception"].startswith("Traceback") and record["exception"].endswith("ValueError: boom")


def test_text_format_is_the_classic_line_plus_ids_inside_a_span(logs):
    _, lines = logs("text")
    with _tracer().start_as_current_span("s") as span:
        log.info("inside")
    log.error("outside")
    trace_id, span_id = _ids(span)
    inside, outside = lines()
    assert re.fullmatch(rf"\S+ \S+ INFO lumen\.test\.logs: inside trace_id={trace_id} span_id={span_id}", inside)
    assert re.fullmatch(r"\S+ \S+ ERROR lumen\.test\.logs: outside", outside)


def test_setup_again_replaces_only_its_own_handlers(logs):
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    before_level = root.level
    try:
        first, first_lines = logs("json", level="DEBUG")
        second, second_lines = logs("text", level="warning")
        assert foreign in root.handlers
        assert not set(first.handlers) & set(root.handlers) and set(second.handlers) <= set(root.handlers)
        assert root.level == logging.WARNING
        log.warning("once")
        assert first_lines() == [] and len(second_lines()) == 1
        second.shutdown()
        second.shutdown()
        assert foreign in root.handlers and not set(second.handlers) & set(root.handlers)
        assert root.level == before_level  # the second call undid the first before recording the level
    finally:
        root.removeHandler(foreign)


@pytest.mark.parametrize("kwargs,named", [({"level": "LOUD"}, "log level"), ({"fmt": "xml"}, "log format")])
def test_bad_level_or_format_is_a_config_error(kwargs, named):
    with pytest.raises(TelemetryConfigError, match=named):
        setup_logging(**kwargs)


def test_unknown_logs_exporter_names_the_variable(monkeypatch):
    monkeypatch.setenv("OTEL_LOGS_EXPORTER", "otlp,kafka")
    with pytest.raises(TelemetryConfigError, match="OTEL_LOGS_EXPORTER.*'kafka'"):
        setup_logging(stream=io.StringIO())


@pytest.mark.parametrize("exporter", [None, "none"])
def test_an_endpoint_alone_does_not_export_logs(monkeypatch, logs, exporter):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    if exporter:
        monkeypatch.setenv("OTEL_LOGS_EXPORTER", exporter)
    setup, _ = logs()
    assert not setup.exporting and len(setup.handlers) == 1


def test_records_go_over_otlp_with_body_severity_and_span_ids(monkeypatch, logs):
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_LOGS_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "lumen-logs-test")
        setup, lines = logs("json")
        assert setup.exporting
        logging.getLogger("opentelemetry.exporter.test").warning("exporter trouble")
        with _tracer().start_as_current_span("request") as span:
            log.warning("generate finished", extra={"request_id": "r-3", "completion_tokens": 8})
        log.info("no span")
        assert setup.force_flush()
        received = receiver.wait_for_logs(lambda records: {"generate finished", "no span"} <= _bodies(records))
        setup.shutdown()
    by_body = {record.body: record for record in received}
    record = by_body["generate finished"]
    assert (record.trace_id, record.span_id) == _ids(span)
    assert record.severity_text == "WARN" and record.severity_number == 13  # SeverityNumber.WARN
    assert record.attributes["request_id"] == "r-3" and record.attributes["completion_tokens"] == 8
    assert record.resource["service.name"] == "lumen-logs-test"
    assert by_body["no span"].trace_id == "" and by_body["no span"].span_id == ""
    assert "exporter trouble" not in by_body  # the pipeline's own messages stay out of it
    assert "exporter trouble" in "\n".join(lines())  # but still reach the stream
    assert json.loads(lines()[1])["trace_id"] == record.trace_id


def _bodies(records: list[LogRecord]) -> set:
    return {record.body for record in records}


def test_serve_parses_log_format():
    parser = cli.build_parser()
    assert parser.parse_args(["serve"]).log_format == "json"
    assert parser.parse_args(["serve", "--log-format", "text"]).log_format == "text"
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["serve", "--log-format", "xml"])
    assert exit_.value.code == 2


def test_cli_formats_are_the_modules():
    parser = cli.build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    [action] = [a for a in serve._actions if a.dest == "log_format"]
    assert tuple(action.choices) == LOG_FORMATS


def test_serve_installs_logging_for_its_lifetime(monkeypatch):
    root = logging.getLogger()
    seen = {}

    def fake_serve(args):
        seen["formatters"] = [type(h.formatter) for h in root.handlers]
        seen["level"] = root.level
        return 0

    monkeypatch.setattr(cli, "_serve", fake_serve)
    before = (list(root.handlers), root.level)
    assert cli.main(["serve", "--log-level", "debug"]) == 0
    assert JsonFormatter in seen["formatters"] and seen["level"] == logging.DEBUG
    assert (list(root.handlers), root.level) == before


async def test_each_generate_logs_one_line_in_its_trace(stories_model, monkeypatch, logs):
    """The server's per-request line carries the trace id the client got back, on the stream and over OTLP."""
    from lumen.v1 import inference_pb2 as pb
    from tests.service.conftest import start_harness

    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_LOGS_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        setup, lines = logs("json")
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")  # ids without exported spans
        harness = await start_harness(stories_model)
        try:
            req = pb.GenerateRequest(prompt="Once upon a time")
            req.sampling.temperature = 0
            req.stopping.max_new_tokens = 4
            msgs = [m async for m in harness.stub.Generate(req)]
        finally:
            await harness.close()
        assert await asyncio.to_thread(setup.force_flush)
        received = await asyncio.to_thread(
            receiver.wait_for_logs, lambda records: "generate finished" in _bodies(records))
    [line] = [json.loads(line) for line in lines() if '"generate finished"' in line]
    assert line["trace_id"] == msgs[-1].trace_id and line["status"] == "OK" and line["completion_tokens"] == 4
    assert line["model"] and line["request_id"] and line["duration_s"] >= line["ttft_s"] > 0
    [record] = [r for r in received if r.body == "generate finished"]
    assert (record.trace_id, record.span_id) == (line["trace_id"], line["span_id"])
    assert record.attributes["finish_reason"] == line["finish_reason"]
