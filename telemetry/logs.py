"""Structured logs for Lumen: JSON (or text) lines tagged with the current trace.

`setup_logging()` puts one stream handler on the root logger whose lines carry
the trace and span id of the span current when the record is emitted, so a
log line and the request's trace can be joined. When OTEL_LOGS_EXPORTER asks
for it, the same records also go out through an OpenTelemetry LoggerProvider
this module builds (same resource as the traces and metrics).

Unlike traces and metrics, logs are never exported just because an OTLP
endpoint is configured: the stream already has them, so OTLP export is only
on when OTEL_LOGS_EXPORTER says so.

This module must never set the OpenTelemetry globals, never touch root
handlers it did not install, and never let the OTLP pipeline's own failure
messages feed back into that pipeline.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, TextIO

from opentelemetry import trace
from opentelemetry.environment_variables import OTEL_LOGS_EXPORTER
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, ConsoleLogRecordExporter, LogRecordExporter
from opentelemetry.sdk.environment_variables import (
    OTEL_EXPORTER_OTLP_LOGS_ENDPOINT,
    OTEL_EXPORTER_OTLP_LOGS_PROTOCOL,
)

from lumen.telemetry.tracing import (
    SHUTDOWN_TIMEOUT_S,
    TelemetryConfigError,
    _Closer,
    _exporter_names,
    _http_exporter_module,
    _protocol,
    _resource,
    _Signal,
)

LOG_FORMATS = ("json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LOGS = _Signal("logs", OTEL_LOGS_EXPORTER, OTEL_EXPORTER_OTLP_LOGS_ENDPOINT, OTEL_EXPORTER_OTLP_LOGS_PROTOCOL)
# Everything a bare LogRecord has, plus what Formatter.format adds: the rest
# of a record's attributes came from the caller's `extra=`.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def current_trace_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) in lowercase hex of the current span, or None without a valid one."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line.

    Keys: time (RFC 3339, UTC, milliseconds), level, logger, message, trace_id
    and span_id (only inside a valid span), exception and stack (when present),
    then the caller's `extra=` fields; an extra never replaces one of those keys.
    """

    def format(self, record: logging.LogRecord) -> str:
        core: dict[str, Any] = {
            "time": _rfc3339(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ids = current_trace_ids()
        if ids:
            core["trace_id"], core["span_id"] = ids
        if record.exc_info:
            core["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            core["exception"] = record.exc_text
        if record.stack_info:
            core["stack"] = self.formatStack(record.stack_info)
        extras = {k: v for k, v in vars(record).items() if k not in _RESERVED and k not in core}
        try:
            return json.dumps({**core, **extras}, default=str, allow_nan=False)
        except (TypeError, ValueError):
            # A NaN, or a dict with non-string keys somewhere in an extra: the
            # line must still be valid JSON, so such extras become their str().
            return json.dumps({**core, **{k: _json_safe(v) for k, v in extras.items()}}, default=str)


class TextFormatter(logging.Formatter):
    """The classic `time LEVEL logger: message` line, plus ` trace_id=... span_id=...` inside a span."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        line = super().formatMessage(record)
        ids = current_trace_ids()
        return f"{line} trace_id={ids[0]} span_id={ids[1]}" if ids else line


def _rfc3339(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        json.dumps(value, default=str, allow_nan=False)
    except (TypeError, ValueError):
        return str(value)
    return value


class _StreamHandler(logging.StreamHandler):
    """Writes to the stream given, or else to sys.stderr as it is at each record.

    Looking sys.stderr up late (as logging's last-resort handler does) honours
    a stream swapped after setup: a test's capture, a wrapper.
    """

    def __init__(self, stream: TextIO | None) -> None:
        logging.Handler.__init__(self)
        self._fixed_stream = stream

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr if self._fixed_stream is None else self._fixed_stream


def _not_from_opentelemetry(record: logging.LogRecord) -> bool:
    # The exporter logs its own failures; sent back through OTLP they would fail
    # again and loop for as long as the collector is down.
    return not record.name.startswith("opentelemetry")


@dataclass(slots=True)
class LogSetup:
    """The handlers `setup_logging` put on the root logger, and what undoes them."""

    handlers: tuple[logging.Handler, ...]
    logger_provider: LoggerProvider | None
    owns_provider: bool
    previous_level: int
    _closed: bool = field(default=False, init=False)

    @property
    def exporting(self) -> bool:
        """Whether records also go to an OpenTelemetry LoggerProvider."""
        return self.logger_provider is not None

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Flush the stream and export queued records; False if they did not make it in time."""
        for handler in self.handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.flush()
        if self.logger_provider is None:
            return True
        return self.logger_provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Remove the handlers, restore the root level, stop a provider built here; later calls do nothing."""
        global _active
        with _lock:
            if self._closed:
                return
            self._closed = True
            root = logging.getLogger()
            for handler in self.handlers:
                root.removeHandler(handler)
                handler.close()
            root.setLevel(self.previous_level)
            if _active is self:
                _active = None
        if self.owns_provider and self.logger_provider is not None:
            # Flushes what is still queued; the SDK would wait up to 30 s for a dead collector.
            closer = _Closer(self.logger_provider.shutdown)
            closer.start()
            closer.join(SHUTDOWN_TIMEOUT_S)
            if closer.is_alive():
                sys.stderr.write(f"lumen: collector still busy after {SHUTDOWN_TIMEOUT_S:.0f} s; "
                                 "dropping unexported log records\n")
            closer.raise_error()


_lock = threading.RLock()
_active: LogSetup | None = None


def setup_logging(
    level: str = "INFO",
    fmt: str = "json",
    logger_provider: LoggerProvider | None = None,
    *,
    stream: TextIO | None = None,
    service_name: str = "lumen",
) -> LogSetup:
    """Configure the root logger: `fmt` lines on `stream` (default: sys.stderr), and OTLP if asked.

    Calling it again replaces what the previous call installed (and shuts down
    a provider it built), leaving other handlers alone. Without
    `logger_provider`, OTEL_LOGS_EXPORTER (otlp, console, none; unset = none)
    decides whether to build one, with the resource `setup_telemetry` uses.
    Raises `TelemetryConfigError` for a bad level, format, exporter or protocol.
    """
    global _active
    level_name, formatter = _validated(level, fmt)
    owns_provider = logger_provider is None
    if logger_provider is None:
        logger_provider = _logger_provider(service_name)
    stream_handler = _StreamHandler(stream)
    stream_handler.setFormatter(formatter)
    handlers: list[logging.Handler] = [stream_handler]
    if logger_provider is not None:
        handlers.append(_otel_handler(logger_provider))
    with _lock:
        if _active is not None:
            _active.shutdown()
        root = logging.getLogger()
        setup = LogSetup(tuple(handlers), logger_provider, owns_provider, previous_level=root.level)
        root.setLevel(level_name)
        for handler in handlers:
            root.addHandler(handler)
        _active = setup
    return setup


def _validated(level: str, fmt: str) -> tuple[str, logging.Formatter]:
    level_name = level.strip().upper()
    if level_name not in _LEVELS:
        raise TelemetryConfigError(f"log level {level!r} is not one of {', '.join(_LEVELS)}")
    if fmt == "json":
        return level_name, JsonFormatter()
    if fmt == "text":
        return level_name, TextFormatter()
    raise TelemetryConfigError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")


def _otel_handler(logger_provider: LoggerProvider) -> logging.Handler:
    with warnings.catch_warnings():
        # Deprecated in favour of opentelemetry-instrumentation-logging's
        # handler, which is the same translation behind an extra dependency.
        warnings.simplefilter("ignore", DeprecationWarning)
        handler = LoggingHandler(logger_provider=logger_provider)
    handler.addFilter(_not_from_opentelemetry)
    return handler


def _logger_provider(service_name: str) -> LoggerProvider | None:
    """A provider for OTEL_LOGS_EXPORTER's exporters, or None when it is unset or none."""
    if not os.environ.get(OTEL_LOGS_EXPORTER, "").strip():
        return None  # unlike traces and metrics: an endpoint alone does not export logs
    exporters = [_log_exporter(name) for name in _exporter_names(_LOGS)]
    if not exporters:
        return None
    # Its atexit hook flushes a process that never called LogSetup.shutdown;
    # shutdown unregisters it.
    provider = LoggerProvider(resource=_resource(service_name))
    for exporter in exporters:
        # OTEL_BLRP_*: queue size, batch size and delay, read by the processor.
        provider.add_log_record_processor(BatchLogRecordProcessor(exporter))
    return provider


def _log_exporter(name: str) -> LogRecordExporter:
    if name == "console":
        return ConsoleLogRecordExporter(out=sys.stdout)
    # Endpoint, insecure, headers, timeout and compression: read by the exporter.
    if _protocol(_LOGS) == "grpc":
        return OTLPLogExporter()
    return _http_exporter_module(_LOGS, "_log_exporter").OTLPLogExporter()
