"""An in-process OTLP/gRPC receiver, so tests check what really goes over the wire.

Built on opentelemetry-proto's generated servicers: it accepts trace, metric and
log exports on 127.0.0.1 at an OS-chosen port, keeps everything it receives, and
lets a test block until what it expects has arrived. It must never sleep or
poll: waiting is a `threading.Condition` notified by each export.

It can also play a broken collector for trace and metric exports:
`fail_with(code)` answers each with a gRPC error, `hang()` holds each until
`release()`; `faulted_exports()` counts the exports met that way.
"""

from __future__ import annotations

import threading
from concurrent import futures
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.otlp_records import (
    LogRecord,
    MetricRecord,
    SpanRecord,
    attributes_of,
    log_record,
    metric_record,
    span_record,
)


class _TraceSink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request, context):  # noqa: N802 - name fixed by the generated servicer
        self._receiver._apply_fault("traces", context)
        self._receiver._add_spans(request.resource_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsSink(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request, context):  # noqa: N802 - name fixed by the generated servicer
        self._receiver._apply_fault("metrics", context)
        self._receiver._add_metrics(request.resource_metrics)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class _LogsSink(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request, context):  # noqa: N802 - name fixed by the generated servicer
        self._receiver._add_logs(request.resource_logs)
        return logs_service_pb2.ExportLogsServiceResponse()


class OtlpReceiver:
    """Collects OTLP exports; use as a context manager or start()/stop()."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host
        self._port = 0
        self._server: grpc.Server | None = None
        self._changed = threading.Condition()
        self._resource_spans: list[trace_pb2.ResourceSpans] = []
        self._resource_metrics: list[metrics_pb2.ResourceMetrics] = []
        self._spans: list[SpanRecord] = []
        self._metrics: list[MetricRecord] = []
        self._fault: grpc.StatusCode | None = None
        self._fault_details = ""
        self._released = threading.Event()
        self._released.set()
        self._faulted = {"traces": 0, "metrics": 0}
        self._logs: list[LogRecord] = []

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("OtlpReceiver is not started; call start() or use it in a with block")
        return f"http://{self._host}:{self._port}"

    def start(self) -> OtlpReceiver:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceSink(self), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsSink(self), server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_LogsSink(self), server)
        self._port = server.add_insecure_port(f"{self._host}:0")
        server.start()
        self._server = server
        return self

    def stop(self, grace_s: float | None = None) -> None:
        self.release()  # a held Export would keep its worker thread past the stop
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def fail_with(self, code: grpc.StatusCode | None, details: str = "injected by the test") -> None:
        """Answer every later trace and metric Export with `code` (None: accept again)."""
        with self._changed:
            self._fault = code
            self._fault_details = details

    def hang(self) -> None:
        """Hold every later trace and metric Export until `release()`: a collector that never answers."""
        self._released.clear()

    def release(self) -> None:
        """End `hang()`: held Exports and later ones go on as usual."""
        self._released.set()

    def faulted_exports(self) -> dict[str, int]:
        """Exports answered with `fail_with`'s error or held by `hang()`, by signal ("traces", "metrics")."""
        with self._changed:
            return dict(self._faulted)

    def wait_for_faulted_exports(self, traces: int = 0, metrics: int = 0, timeout: float = 10.0) -> dict[str, int]:
        """Block until at least `traces` span and `metrics` metric exports met the fault."""
        def reached() -> bool:
            return self._faulted["traces"] >= traces and self._faulted["metrics"] >= metrics
        with self._changed:
            if self._changed.wait_for(reached, timeout):
                return dict(self._faulted)
            got = dict(self._faulted)
        raise TimeoutError(f"faulted exports did not reach traces={traces} metrics={metrics} in {timeout}s; got {got}")

    def _apply_fault(self, signal: str, context: grpc.ServicerContext) -> None:
        """Hold or refuse one Export as the test asked; returns only to accept it."""
        with self._changed:
            code, details = self._fault, self._fault_details
            if code is not None or not self._released.is_set():
                self._faulted[signal] += 1
                self._changed.notify_all()
        self._released.wait()
        if code is not None:
            context.abort(code, details)

    def _add_spans(self, batch: Iterable[trace_pb2.ResourceSpans]) -> None:
        with self._changed:
            for resource_spans in batch:
                self._resource_spans.append(resource_spans)
                resource = attributes_of(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    scope = scope_spans.scope.name
                    self._spans.extend(span_record(span, resource, scope) for span in scope_spans.spans)
            self._changed.notify_all()

    def _add_metrics(self, batch: Iterable[metrics_pb2.ResourceMetrics]) -> None:
        with self._changed:
            for resource_metrics in batch:
                self._resource_metrics.append(resource_metrics)
                resource = attributes_of(resource_metrics.resource.attributes)
                for scope_metrics in resource_metrics.scope_metrics:
                    scope = scope_metrics.scope.name
                    self._metrics.extend(metric_record(m, resource, scope) for m in scope_metrics.metrics)
            self._changed.notify_all()

    def _add_logs(self, batch: Iterable[logs_pb2.ResourceLogs]) -> None:
        with self._changed:
            for resource_logs in batch:
                resource = attributes_of(resource_logs.resource.attributes)
                for scope_logs in resource_logs.scope_logs:
                    scope = scope_logs.scope.name
                    self._logs.extend(log_record(r, resource, scope) for r in scope_logs.log_records)
            self._changed.notify_all()

    @property
    def resource_spans(self) -> list[trace_pb2.ResourceSpans]:
        with self._changed:
            return list(self._resource_spans)

    @property
    def resource_metrics(self) -> list[metrics_pb2.ResourceMetrics]:
        with self._changed:
            return list(self._resource_metrics)

    def spans(self) -> list[SpanRecord]:
        with self._changed:
            return list(self._spans)

    def metrics(self) -> list[MetricRecord]:
        with self._changed:
            return list(self._metrics)

    def logs(self) -> list[LogRecord]:
        with self._changed:
            return list(self._logs)

    def metric_names(self) -> set[str]:
        with self._changed:
            return {metric.name for metric in self._metrics}

    def latest_metric(self, name: str) -> MetricRecord:
        """The most recently received export of metric `name`."""
        with self._changed:
            for metric in reversed(self._metrics):
                if metric.name == name:
                    return metric
        raise KeyError(f"no metric {name!r} received; got {sorted(self.metric_names())}")

    def wait_for_spans(
        self, predicate: Callable[[list[SpanRecord]], bool], timeout: float = 10.0
    ) -> list[SpanRecord]:
        """Block until `predicate(all spans so far)` holds; return those spans."""
        with self._changed:
            if self._changed.wait_for(lambda: predicate(list(self._spans)), timeout):
                return list(self._spans)
            names = [span.name for span in self._spans]
        raise TimeoutError(f"spans did not match within {timeout}s; received {names}")

    def wait_for_metrics(
        self, predicate: Callable[[list[MetricRecord]], bool], timeout: float = 10.0
    ) -> list[MetricRecord]:
        """Block until `predicate(all metrics so far)` holds; return those metrics."""
        with self._changed:
            if self._changed.wait_for(lambda: predicate(list(self._metrics)), timeout):
                return list(self._metrics)
            names = sorted({metric.name for metric in self._metrics})
        raise TimeoutError(f"metrics did not match within {timeout}s; received {names}")

    def wait_for_logs(self, predicate: Callable[[list[LogRecord]], bool], timeout: float = 10.0) -> list[LogRecord]:
        """Block until `predicate(all log records so far)` holds; return those records."""
        with self._changed:
            if self._changed.wait_for(lambda: predicate(list(self._logs)), timeout):
                return list(self._logs)
            bodies = [record.body for record in self._logs]
        raise TimeoutError(f"log records did not match within {timeout}s; received bodies {bodies}")


@contextmanager
def exporting_to_receiver(monkeypatch) -> Iterator[OtlpReceiver]:
    """A started receiver, with the OTLP exporters' environment (for the test) pointing at it."""
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        yield receiver
