"""OpenTelemetry tracing and metrics setup for one Lumen server.

`setup_telemetry()` builds a `Telemetry` that owns its own tracer and meter
providers, configured only from the standard `OTEL_*` environment variables.
The SDK and the OTLP exporters already read most of those variables (service
name and resource attributes, endpoints, insecure, headers, timeouts, sampler,
batch queue sizes, metric export interval); this module only decides which
exporters to build, which the SDK leaves to its auto-instrumentation entry
point.

This module must never set the OpenTelemetry globals (several servers share
one process in the tests), never read configuration other than the standard
environment variables, and never cost more than an id generation per request
when no exporter is configured.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Iterable

from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.environment_variables import OTEL_METRICS_EXPORTER, OTEL_TRACES_EXPORTER
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.metrics import Meter
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_METRICS_ENDPOINT,
    OTEL_EXPORTER_OTLP_METRICS_PROTOCOL,
    OTEL_EXPORTER_OTLP_PROTOCOL,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import Span, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACER_NAME = "lumen"
_HTTP_EXPORTER_PACKAGE = "opentelemetry-exporter-otlp-proto-http"
_KNOWN_EXPORTERS = ("otlp", "console", "none")

# Built here rather than read from the global propagator, which nothing in a
# plain (non auto-instrumented) process configures.
_PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])


class TelemetryConfigError(ValueError):
    """An OTEL_* environment variable asks for something Lumen cannot do."""


@dataclass(frozen=True, slots=True)
class _Signal:
    """The environment variables that configure one signal's exporters."""

    name: str
    exporter_env: str
    endpoint_env: str
    protocol_env: str


_TRACES = _Signal(
    "traces", OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL
)
_METRICS = _Signal(
    "metrics", OTEL_METRICS_EXPORTER, OTEL_EXPORTER_OTLP_METRICS_ENDPOINT, OTEL_EXPORTER_OTLP_METRICS_PROTOCOL
)


@dataclass(slots=True)
class Telemetry:
    """One server's tracer and meter, backed by providers it alone owns."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    tracing_enabled: bool
    metrics_enabled: bool
    tracer: Tracer = field(init=False)
    meter: Meter = field(init=False)
    _closed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.tracer = self.tracer_provider.get_tracer(TRACER_NAME)
        self.meter = self.meter_provider.get_meter(TRACER_NAME)

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Export everything buffered; False if spans did not make it in time.

        A failing metric reader raises (the SDK's behaviour) rather than
        returning False, so a broken collector is not mistaken for a slow one.
        """
        deadline = time.monotonic() + timeout_s
        spans_ok = self.tracer_provider.force_flush(int(timeout_s * 1000))
        remaining_ms = max(0.0, deadline - time.monotonic()) * 1000
        return self.meter_provider.force_flush(remaining_ms) and spans_ok

    def shutdown(self) -> None:
        """Flush and stop both providers; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def setup_telemetry(service_name: str = "lumen") -> Telemetry:
    """Build tracing and metrics from the OTEL_* environment variables.

    `service_name` is used only when neither OTEL_SERVICE_NAME nor
    OTEL_RESOURCE_ATTRIBUTES names the service. Raises `TelemetryConfigError`
    for an exporter or protocol Lumen does not support.
    """
    resource = _resource(service_name)
    span_exporters = [_span_exporter(name) for name in _exporter_names(_TRACES)]
    metric_readers = [_metric_reader(name) for name in _exporter_names(_METRICS)]
    tracer_provider = _tracer_provider(resource, span_exporters)
    # No readers: instruments still accept measurements but nothing is
    # aggregated or exported (about 15 us per finished request, measured).
    meter_provider = MeterProvider(resource=resource, metric_readers=metric_readers)
    return Telemetry(
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        tracing_enabled=bool(span_exporters),
        metrics_enabled=bool(metric_readers),
    )


def _resource(service_name: str) -> Resource:
    # Resource.create lets its argument override the environment; the
    # environment must win here, so the detector's view is merged on top.
    return Resource.create({SERVICE_NAME: service_name}).merge(OTELResourceDetector().detect())


def _tracer_provider(resource: Resource, exporters: list[SpanExporter]) -> TracerProvider:
    if not exporters:
        # ALWAYS_OFF still lets the SDK mint a trace id for each root span (or
        # inherit the caller's), which the server returns to clients, while
        # every span stays non-recording and never reaches a processor.
        return TracerProvider(resource=resource, sampler=ALWAYS_OFF)
    # sampler=None: the SDK reads OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG.
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        # Batching keeps export off the request path; the queue is bounded
        # (OTEL_BSP_MAX_QUEUE_SIZE) so a dead collector drops spans, not memory.
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _exporter_names(signal: _Signal) -> list[str]:
    """Exporters asked for by OTEL_<SIGNAL>_EXPORTER; [] means do not export.

    Unset, it means OTLP when an endpoint is configured and nothing otherwise:
    the spec's default of OTLP to localhost would make every unconfigured
    server pay for spans that a missing collector then drops.
    """
    raw = os.environ.get(signal.exporter_env, "").strip()
    if not raw:
        configured = os.environ.get(signal.endpoint_env) or os.environ.get(OTEL_EXPORTER_OTLP_ENDPOINT)
        return ["otlp"] if configured else []
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in _KNOWN_EXPORTERS]
    if unknown:
        raise TelemetryConfigError(
            f"{signal.exporter_env}={raw!r}: unsupported exporter {unknown[0]!r}; "
            f"use a comma-separated list of {', '.join(_KNOWN_EXPORTERS)}"
        )
    return [] if "none" in names else list(dict.fromkeys(names))


def _protocol(signal: _Signal) -> str:
    raw = os.environ.get(signal.protocol_env) or os.environ.get(OTEL_EXPORTER_OTLP_PROTOCOL) or "grpc"
    protocol = raw.strip().lower()
    if protocol not in ("grpc", "http/protobuf"):
        raise TelemetryConfigError(
            f"OTLP protocol {raw!r} for {signal.name} is not supported; use grpc (default) or http/protobuf"
        )
    return protocol


def _http_exporter_module(signal: _Signal, submodule: str) -> ModuleType:
    module = f"opentelemetry.exporter.otlp.proto.http.{submodule}"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise TelemetryConfigError(
            f"OTLP over http/protobuf for {signal.name} needs the package {_HTTP_EXPORTER_PACKAGE} "
            f"(missing module {err.name!r}); install it, or set OTEL_EXPORTER_OTLP_PROTOCOL=grpc"
        ) from err


def _span_exporter(name: str) -> SpanExporter:
    if name == "console":
        # The SDK binds sys.stdout when it is imported; read it now instead so
        # a redirected stdout (a test's capture, a wrapper) is honoured.
        return ConsoleSpanExporter(out=sys.stdout)
    # Endpoint, insecure, headers, timeout and compression: read by the exporter.
    if _protocol(_TRACES) == "grpc":
        return OTLPSpanExporter()
    return _http_exporter_module(_TRACES, "trace_exporter").OTLPSpanExporter()


def _metric_reader(name: str) -> MetricReader:
    exporter: MetricExporter
    if name == "console":
        exporter = ConsoleMetricExporter(out=sys.stdout)
    elif _protocol(_METRICS) == "grpc":
        exporter = OTLPMetricExporter()
    else:
        exporter = _http_exporter_module(_METRICS, "metric_exporter").OTLPMetricExporter()
    # OTEL_METRIC_EXPORT_INTERVAL / OTEL_METRIC_EXPORT_TIMEOUT: read by the reader.
    return PeriodicExportingMetricReader(exporter)


def extract_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
    """The W3C trace context and baggage a client sent in gRPC metadata.

    Starts from an empty context, so a server span parented on the result
    descends from the caller only, never from whatever span is current here.
    """
    carrier: dict[str, list[str]] = {}
    for key, value in metadata or ():
        if isinstance(value, bytes):
            # Only "-bin" keys arrive as bytes and W3C headers are never
            # binary; latin-1 cannot fail, so an odd key cannot break a request.
            value = value.decode("latin-1")
        carrier.setdefault(key.lower(), []).append(value)
    return _PROPAGATOR.extract(carrier, context=Context())


def inject_context(context: Context | None = None) -> list[tuple[str, str]]:
    """gRPC metadata carrying `context` (default: the current one) to a server."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=context)
    return list(carrier.items())


def format_trace_id(span: Span) -> str:
    """The span's trace id as 32 lowercase hex characters, as W3C writes it."""
    return trace.format_trace_id(span.get_span_context().trace_id)
