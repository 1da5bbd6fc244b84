"""Tracing, metrics and logs for Lumen: the only place OpenTelemetry is configured.

`lumen.service` and `lumen.engine` both import from here; this package must never
import either of them.
"""

from lumen.telemetry.logs import JsonFormatter, LogSetup, TextFormatter, current_trace_ids, setup_logging
from lumen.telemetry.metrics import EngineMetrics
from lumen.telemetry.step_metrics import StepMetrics
from lumen.telemetry.tracing import (
    Telemetry,
    TelemetryConfigError,
    extract_context,
    format_trace_id,
    inject_context,
    setup_telemetry,
)

__all__ = [
    "EngineMetrics",
    "JsonFormatter",
    "LogSetup",
    "StepMetrics",
    "Telemetry",
    "TelemetryConfigError",
    "TextFormatter",
    "current_trace_ids",
    "extract_context",
    "format_trace_id",
    "inject_context",
    "setup_logging",
    "setup_telemetry",
]
