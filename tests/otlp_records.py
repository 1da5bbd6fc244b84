"""OTLP protobuf messages as flat, comparable records: what the test receiver keeps.

Ids are lowercase hex, attributes plain dicts; nothing here talks to the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2


@dataclass(frozen=True, slots=True)
class EventRecord:
    name: str
    attributes: dict[str, Any]


@dataclass(frozen=True, slots=True)
class LinkRecord:
    trace_id: str
    span_id: str
    attributes: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ExemplarRecord:
    """A measurement kept with its trace: ids are lowercase hex ("" when none)."""
    value: float
    trace_id: str
    span_id: str


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """One received span, flattened; ids are lowercase hex, "" for no parent."""

    name: str
    kind: str  # "SERVER", "CLIENT", "INTERNAL", ...: compare with SpanKind.X.name
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    events: list[EventRecord]
    resource: dict[str, Any]
    scope: str
    status_code: str  # "UNSET", "OK" or "ERROR"
    start_ns: int
    end_ns: int
    links: tuple[LinkRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class PointRecord:
    """One data point: `value` for sums and gauges, the rest for histograms."""

    attributes: dict[str, Any]
    value: float | None = None
    count: int | None = None
    sum: float | None = None
    explicit_bounds: tuple[float, ...] = ()
    bucket_counts: tuple[int, ...] = ()
    exemplars: tuple[ExemplarRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class MetricRecord:
    """One metric from one export; cumulative metrics recur in every export."""

    name: str
    unit: str
    data_type: str  # "sum", "gauge", "histogram", ...: the proto's oneof name
    points: list[PointRecord]
    resource: dict[str, Any]
    scope: str
    is_monotonic: bool = False  # sums only: a counter (True) or an up-down counter (False)


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One received log record, flattened; ids are lowercase hex, "" outside a span."""

    body: Any
    severity_text: str  # the SDK writes WARN for WARNING and FATAL for CRITICAL
    severity_number: int
    trace_id: str
    span_id: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str
    time_ns: int


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_of(value.kvlist_value.values)
    return None if kind is None else getattr(value, kind)


def attributes_of(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {pair.key: value_of(pair.value) for pair in pairs}


def span_record(span: trace_pb2.Span, resource: dict[str, Any], scope: str) -> SpanRecord:
    return SpanRecord(
        name=span.name,
        kind=trace_pb2.Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex(),
        attributes=attributes_of(span.attributes),
        events=[EventRecord(event.name, attributes_of(event.attributes)) for event in span.events],
        resource=resource,
        scope=scope,
        status_code=trace_pb2.Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
        links=tuple(LinkRecord(link.trace_id.hex(), link.span_id.hex(), attributes_of(link.attributes))
                    for link in span.links),
    )


def point_record(point: Any, data_type: str) -> PointRecord:
    attributes = attributes_of(point.attributes)
    if data_type == "histogram":
        return PointRecord(
            attributes,
            count=point.count,
            sum=point.sum,
            explicit_bounds=tuple(point.explicit_bounds),
            bucket_counts=tuple(point.bucket_counts),
            exemplars=tuple(ExemplarRecord(getattr(e, e.WhichOneof("value")), e.trace_id.hex(), e.span_id.hex())
                            for e in point.exemplars),
        )
    if data_type in ("sum", "gauge"):
        return PointRecord(attributes, value=getattr(point, point.WhichOneof("value")))
    return PointRecord(attributes)  # exponential histograms, summaries: not used by Lumen


def metric_record(metric: metrics_pb2.Metric, resource: dict[str, Any], scope: str) -> MetricRecord:
    data_type = metric.WhichOneof("data") or ""
    points = getattr(metric, data_type).data_points if data_type else []
    return MetricRecord(
        name=metric.name,
        unit=metric.unit,
        data_type=data_type,
        points=[point_record(point, data_type) for point in points],
        resource=resource,
        scope=scope,
        is_monotonic=data_type == "sum" and metric.sum.is_monotonic,
    )


def log_record(record: logs_pb2.LogRecord, resource: dict[str, Any], scope: str) -> LogRecord:
    return LogRecord(
        body=value_of(record.body),
        severity_text=record.severity_text,
        severity_number=record.severity_number,
        trace_id=record.trace_id.hex(),
        span_id=record.span_id.hex(),
        attributes=attributes_of(record.attributes),
        resource=resource,
        scope=scope,
        time_ns=record.time_unix_nano,
    )
