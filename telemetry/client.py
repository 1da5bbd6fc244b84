"""Tracing for Lumen's own clients (the `lumen` CLI): a CLIENT span whose context the call carries.

The client's span must reach the server as *sampled* even when the client exports
nothing: the server's parent-based sampler follows the caller's flag, so an unsampled
client would silently switch the server's tracing off. Without an exporter the client
therefore samples as the OTEL_TRACES_SAMPLER variables say (parent-based always-on by
default) and its spans are simply dropped here. Never sets the OpenTelemetry globals.
"""
from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Tracer

from lumen.telemetry.tracing import TRACER_NAME, Telemetry, setup_telemetry


def client_telemetry(service_name: str = "lumen-cli") -> tuple[Telemetry, Tracer]:
    """The client's telemetry (shut it down when done) and the tracer for its calls."""
    telemetry = setup_telemetry(service_name)
    if telemetry.tracing_enabled:
        return telemetry, telemetry.tracer
    provider = TracerProvider(resource=telemetry.tracer_provider.resource)
    return telemetry, provider.get_tracer(TRACER_NAME)
