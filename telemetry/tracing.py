"""OpenTelemetry tracing and metrics setup for one Lumen server.

`setup_telemetry()` builds a `Telemetry` that owns its own tracer and meter
providers, configured only from the standard `OTEL_*` environment variables.
The SDK and the OTLP exporters already read most of those variables (service
name and resource attributes, endpoints, insecure, headers, timeouts, sampler,
batch queue sizes, metric export interval); this module only decides which
exporters to build, which the SDK leaves to its auto-instrumentation entry
point, and serves the Prometheus scrape endpoint when one is asked for.

A collector that is down, slow or refusing must never slow or fail a request:
spans wait in a bounded queue (full: dropped, logged, and counted when
OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED=true) and both signals are exported
on the SDK's own threads, never on a request's; `Telemetry.shutdown` returns
within about `SHUTDOWN_TIMEOUT_S` whatever the collector does.

This module must never set the OpenTelemetry globals (several servers share
one process in the tests), never read configuration other than the standard
environment variables, and never cost more than an id generation per request
when no exporter is configured.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Iterable
from wsgiref.simple_server import WSGIServer

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
    OTEL_EXPORTER_PROMETHEUS_HOST,
    OTEL_EXPORTER_PROMETHEUS_PORT,
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
# Long enough for a healthy collector to take the last batches (milliseconds),
# short enough that a dead or hung one (10 s export timeout, retries backing
# off 1, 2, 4 s, 30 s batch-processor join) cannot hold a server's stop: the
# server's own grace is 5 s and orchestrators allow 30 s in all.
SHUTDOWN_TIMEOUT_S = 5.0
# After the deadline, closing the exporters ends their work at once (gRPC
# cancels the in-flight Export and wakes the retry backoff); this is only how
# long to wait for that before giving up on threads that are daemons anyway.
_CUT_OFF_GRACE_S = 1.0
_HTTP_EXPORTER_PACKAGE = "opentelemetry-exporter-otlp-proto-http"
_PROMETHEUS_PACKAGE = "opentelemetry-exporter-prometheus"
_KNOWN_EXPORTERS = ("otlp", "console", "none")
_DEFAULT_PROMETHEUS_PORT = 9464  # the spec's default for OTEL_EXPORTER_PROMETHEUS_PORT

_log = logging.getLogger(__name__)

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
    exporters: tuple[str, ...] = _KNOWN_EXPORTERS  # the names exporter_env may list


_TRACES = _Signal(
    "traces", OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL
)
_METRICS = _Signal(
    "metrics",
    OTEL_METRICS_EXPORTER,
    OTEL_EXPORTER_OTLP_METRICS_ENDPOINT,
    OTEL_EXPORTER_OTLP_METRICS_PROTOCOL,
    ("otlp", "prometheus", "console", "none"),
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
    # The exporters behind batch processors, whose shutdown the SDK does not
    # bound: closed at the shutdown deadline so a bad collector cannot hold it.
    batch_exporters: tuple[SpanExporter, ...] = ()
    # The Prometheus scrape endpoint, when OTEL_METRICS_EXPORTER lists prometheus.
    prometheus_server: WSGIServer | None = None

    def __post_init__(self) -> None:
        self.tracer = self.tracer_provider.get_tracer(TRACER_NAME)
        self.meter = self.meter_provider.get_meter(TRACER_NAME)

    @property
    def prometheus_port(self) -> int | None:
        """The port the scrape endpoint listens on (the bound one when asked for 0)."""
        return None if self.prometheus_server is None else self.prometheus_server.server_port

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Export everything buffered; False if spans did not make it in time.

        A failing metric reader raises (the SDK's behaviour) rather than
        returning False, so a broken collector is not mistaken for a slow one.
        The SDK's batch processor does not bound its flush: with a dead
        collector this waits for its export retries (tests only).
        """
        deadline = time.monotonic() + timeout_s
        spans_ok = self.tracer_provider.force_flush(int(timeout_s * 1000))
        remaining_ms = max(0.0, deadline - time.monotonic()) * 1000
        return self.meter_provider.force_flush(remaining_ms) and spans_ok

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Flush and stop both providers within about `timeout_s`; later calls do nothing.

        A healthy collector gets the last batches. A dead, hung or refusing one
        is cut off at the deadline and what is still queued is dropped: the
        server's stop never waits on a collector for longer than this.
        """
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout_s
        # TracerProvider.shutdown takes no timeout (its batch processor joins
        # its worker for up to 30 s), so it runs beside the meter provider's,
        # which honours its own.
        spans = _Closer(self.tracer_provider.shutdown)
        spans.start()
        try:
            self.meter_provider.shutdown(timeout_millis=timeout_s * 1000)
        finally:
            spans.join(max(0.0, deadline - time.monotonic()))
            if spans.is_alive():
                _log.warning("telemetry: collector still busy after %.1f s; dropping unexported spans", timeout_s)
                for exporter in self.batch_exporters:
                    exporter.shutdown()
                spans.join(_CUT_OFF_GRACE_S)
            if self.prometheus_server is not None:
                self.prometheus_server.shutdown()
                self.prometheus_server.server_close()
        spans.raise_error()


class _Closer(threading.Thread):
    """Runs a provider's shutdown on a daemon thread, keeping its exception for the caller."""

    def __init__(self, shutdown: Callable[[], Any]) -> None:
        super().__init__(name="lumen-telemetry-shutdown", daemon=True)
        self._shutdown = shutdown
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._shutdown()
        except BaseException as err:  # re-raised on the caller's thread by raise_error()
            self._error = err

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error


def setup_telemetry(service_name: str = "lumen") -> Telemetry:
    """Build tracing and metrics from the OTEL_* environment variables.

    `service_name` is used only when neither OTEL_SERVICE_NAME nor
    OTEL_RESOURCE_ATTRIBUTES names the service. Raises `TelemetryConfigError`
    for an exporter or protocol Lumen does not support, a missing optional
    package, or a Prometheus address it cannot listen on.
    """
    resource = _resource(service_name)
    span_names, metric_names = _exporter_names(_TRACES), _exporter_names(_METRICS)
    # A registry per server, never prometheus_client's global REGISTRY: several
    # servers share one process in the tests and each endpoint shows its own.
    registry = _prometheus_module("prometheus_client").CollectorRegistry() if "prometheus" in metric_names else None
    metric_readers = [_metric_reader(name, registry) for name in metric_names]
    # No readers: instruments still accept measurements but nothing is
    # aggregated or exported (next to nothing per finished request).
    meter_provider = MeterProvider(resource=resource, metric_readers=metric_readers)
    # Built after the meter provider: the SDK's own metrics about the span
    # queue and exports (dropped spans, failed exports) are recorded into it.
    span_exporters = [_span_exporter(name, meter_provider) for name in span_names]
    telemetry = Telemetry(
        tracer_provider=_tracer_provider(resource, span_exporters, meter_provider),
        meter_provider=meter_provider,
        tracing_enabled=bool(span_exporters),
        metrics_enabled=bool(metric_readers),
        batch_exporters=tuple(span_exporters),
    )
    if registry is not None:
        try:
            telemetry.prometheus_server = _serve_prometheus(registry)
        except TelemetryConfigError:
            telemetry.shutdown()
            raise
    return telemetry


def _resource(service_name: str) -> Resource:
    # Resource.create lets its argument override the environment; the
    # environment must win here, so the detector's view is merged on top.
    return Resource.create({SERVICE_NAME: service_name}).merge(OTELResourceDetector().detect())


def _tracer_provider(
    resource: Resource, exporters: list[SpanExporter], meter_provider: MeterProvider
) -> TracerProvider:
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
        # Without meter_provider its metrics would go to the global provider.
        provider.add_span_processor(BatchSpanProcessor(exporter, meter_provider=meter_provider))
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
    unknown = [name for name in names if name not in signal.exporters]
    if unknown:
        raise TelemetryConfigError(
            f"{signal.exporter_env}={raw!r}: unsupported exporter {unknown[0]!r}; "
            f"use a comma-separated list of {', '.join(signal.exporters)}"
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


def _prometheus_module(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise TelemetryConfigError(
            f"{OTEL_METRICS_EXPORTER}=prometheus needs the package {_PROMETHEUS_PACKAGE} (missing module "
            f"{err.name!r}); install it (pip install 'lumen[prometheus]'), or remove prometheus from "
            f"{OTEL_METRICS_EXPORTER}"
        ) from err


def _span_exporter(name: str, meter_provider: MeterProvider) -> SpanExporter:
    if name == "console":
        # The SDK binds sys.stdout when it is imported; read it now instead so
        # a redirected stdout (a test's capture, a wrapper) is honoured.
        return ConsoleSpanExporter(out=sys.stdout)
    # Endpoint, insecure, headers, timeout and compression: read by the exporter.
    if _protocol(_TRACES) == "grpc":
        return OTLPSpanExporter(meter_provider=meter_provider)
    return _http_exporter_module(_TRACES, "trace_exporter").OTLPSpanExporter(meter_provider=meter_provider)


def _metric_reader(name: str, registry: Any) -> MetricReader:
    exporter: MetricExporter
    if name == "prometheus":
        # Pull: the scrape collects, on the HTTP server's thread.
        return _prometheus_module("opentelemetry.exporter.prometheus").PrometheusMetricReader(registry=registry)
    if name == "console":
        exporter = ConsoleMetricExporter(out=sys.stdout)
    elif _protocol(_METRICS) == "grpc":
        exporter = OTLPMetricExporter()
    else:
        exporter = _http_exporter_module(_METRICS, "metric_exporter").OTLPMetricExporter()
    # OTEL_METRIC_EXPORT_INTERVAL / OTEL_METRIC_EXPORT_TIMEOUT: read by the reader.
    return PeriodicExportingMetricReader(exporter)


def _serve_prometheus(registry: Any) -> WSGIServer:
    """Start the scrape endpoint on OTEL_EXPORTER_PROMETHEUS_HOST:OTEL_EXPORTER_PROMETHEUS_PORT."""
    host = os.environ.get(OTEL_EXPORTER_PROMETHEUS_HOST, "").strip() or "localhost"
    raw_port = os.environ.get(OTEL_EXPORTER_PROMETHEUS_PORT, "").strip() or str(_DEFAULT_PROMETHEUS_PORT)
    if not raw_port.isdigit() or int(raw_port) > 65535:
        raise TelemetryConfigError(
            f"{OTEL_EXPORTER_PROMETHEUS_PORT}={raw_port!r} is not a port; use 0-65535 (0: any free port)"
        )
    client = _prometheus_module("prometheus_client")
    try:
        server, _thread = client.start_http_server(int(raw_port), addr=host, registry=registry)
    except OSError as err:
        raise TelemetryConfigError(
            f"cannot serve Prometheus scrapes on {host}:{raw_port} ({err}); set "
            f"{OTEL_EXPORTER_PROMETHEUS_HOST} / {OTEL_EXPORTER_PROMETHEUS_PORT} to a free address"
        ) from err
    return server


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
