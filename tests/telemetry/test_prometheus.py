"""OTEL_METRICS_EXPORTER=prometheus: a scrape endpoint per server, read over real HTTP.

Every endpoint binds port 0 (OTEL_EXPORTER_PROMETHEUS_PORT=0) and the test asks
the Telemetry which port it got, so nothing races for a fixed port.
"""
from __future__ import annotations

import importlib.util
import json
import re
import socket
import sys
import urllib.error
import urllib.request

import pytest

from lumen.telemetry import Telemetry, TelemetryConfigError, setup_telemetry
from lumen.v1 import inference_pb2 as pb
from tests.otlp_receiver import OtlpReceiver
from tests.service.conftest import start_harness
from tests.telemetry.test_operator_stack import DASHBOARD, dashboard_targets, parse_promql, prometheus_names

needs_prometheus = pytest.mark.skipif(
    importlib.util.find_spec("opentelemetry.exporter.prometheus") is None,
    reason="opentelemetry-exporter-prometheus is not installed (pip install 'lumen[prometheus]')",
)


@pytest.fixture
def prometheus_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", "0")


def scrape(telemetry: Telemetry) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{telemetry.prometheus_port}/metrics", timeout=10) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the one series `name` whose labels include `labels`."""
    values = []
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if match and match[1] == name:
            found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match[2] or ""))
            if labels.items() <= found.items():
                values.append(float(match[3]))
    assert len(values) == 1, f"{len(values)} series {name}{labels} in:\n{text}"
    return values[0]


@needs_prometheus
async def test_scrape_shows_a_requests_metrics(stories_model, prometheus_env):
    telemetry = setup_telemetry()
    assert telemetry.metrics_enabled and telemetry.prometheus_port
    harness = await start_harness(stories_model, telemetry)
    try:
        req = pb.GenerateRequest(prompt="Once upon a time")
        req.sampling.temperature = 0
        req.stopping.max_new_tokens, req.stopping.ignore_eos = 4, True
        msgs = [m async for m in harness.stub.Generate(req)]
        assert msgs[-1].usage.completion_tokens == 4
        text = scrape(telemetry)
    finally:
        await harness.close()
    assert sample(text, "gen_ai_server_request_duration_seconds_bucket", le="+Inf") == 1
    assert sample(text, "gen_ai_server_request_duration_seconds_count") == 1
    assert sample(text, "gen_ai_server_time_to_first_token_seconds_count") == 1
    assert sample(text, "lumen_requests_total", status="OK") == 1
    assert sample(text, "lumen_tokens_total", gen_ai_token_type="output") == 4
    with pytest.raises(urllib.error.URLError):  # shutdown stopped the endpoint
        scrape(telemetry)


@needs_prometheus
def test_each_server_has_its_own_registry(prometheus_env):
    from prometheus_client import REGISTRY, generate_latest

    first, second = setup_telemetry(), setup_telemetry()
    try:
        assert first.prometheus_port != second.prometheus_port
        first.meter.create_counter("lumen.test.hits").add(2)
        second.meter.create_counter("lumen.test.hits").add(5)
        assert sample(scrape(first), "lumen_test_hits_total") == 2
        assert sample(scrape(second), "lumen_test_hits_total") == 5
        assert b"lumen_test_hits" not in generate_latest(REGISTRY)
    finally:
        first.shutdown()
        second.shutdown()


@needs_prometheus
def test_prometheus_alongside_otlp(prometheus_env, monkeypatch):
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp,prometheus")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")  # only force_flush exports
        telemetry = setup_telemetry()
        try:
            telemetry.meter.create_counter("lumen.test.hits").add(3)
            assert sample(scrape(telemetry), "lumen_test_hits_total") == 3
            telemetry.force_flush()
            assert receiver.latest_metric("lumen.test.hits").points[0].value == 3
        finally:
            telemetry.shutdown()


@needs_prometheus
def test_port_in_use_is_a_config_error(prometheus_env, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(taken.getsockname()[1]))
        with pytest.raises(TelemetryConfigError, match="OTEL_EXPORTER_PROMETHEUS_PORT"):
            setup_telemetry()


@needs_prometheus
@pytest.mark.parametrize("port", ["http", "-1", "70000"])
def test_bad_port_is_a_config_error(prometheus_env, monkeypatch, port):
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", port)
    with pytest.raises(TelemetryConfigError, match="not a port"):
        setup_telemetry()


@pytest.mark.parametrize("module", ["opentelemetry.exporter.prometheus", "prometheus_client"])
def test_missing_package_says_what_to_install(prometheus_env, monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail as if absent
    with pytest.raises(TelemetryConfigError, match=r"opentelemetry-exporter-prometheus.*lumen\[prometheus\]"):
        setup_telemetry()


def test_prometheus_is_for_metrics_only(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "prometheus")
    with pytest.raises(TelemetryConfigError, match="OTEL_TRACES_EXPORTER.*prometheus"):
        setup_telemetry()



# Series absent until their event happens (the SDK exports no point before the first add), or on
# servers without a GPU (lumen.device.memory.used).
EVENT_ONLY = {"lumen_engine_preemptions_total", "lumen_device_memory_used_bytes"}


def scraped_series(text: str) -> set[str]:
    return {re.match(r"[a-zA-Z_:][\w:]*", line)[0] for line in text.splitlines() if line and not line.startswith("#")}


def dashboard_series() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {name for target in dashboard_targets(dashboard) for name in parse_promql(target["expr"]).names}


async def exercised_server_series(stories_model, monkeypatch) -> tuple[set[str], set[str]]:
    """Run requests that touch every instrument; (series scraped directly, series the collector makes)."""
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp,prometheus")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "600000")
        telemetry = setup_telemetry()
        harness = await start_harness(stories_model, telemetry)
        try:
            for method in ("", "ngram", ""):   # the repeat hits the prefix cache
                req = pb.GenerateRequest(prompt="Once upon a time, once upon a time, once upon a time " * 2)
                req.sampling.temperature = 0
                req.stopping.max_new_tokens, req.stopping.ignore_eos = 24, True
                req.speculative.method = method
                [m async for m in harness.stub.Generate(req)]
            text = scrape(telemetry)
            telemetry.force_flush()
            received = receiver.wait_for_metrics(lambda m: any(x.name == "lumen.speculative.drafts" for x in m))
        finally:
            await harness.close()
    via_collector = {series for m in received
                     for series in prometheus_names(m.name, m.unit, m.data_type, m.is_monotonic)}
    return scraped_series(text), via_collector


@needs_prometheus
async def test_both_metric_paths_give_the_dashboard_the_same_names(stories_model, prometheus_env, monkeypatch):
    """OTEL_METRICS_EXPORTER=prometheus and the collector's exporter name every series alike."""
    direct, via_collector = await exercised_server_series(stories_model, monkeypatch)
    ours = {n for n in via_collector if n.startswith(("lumen_", "gen_ai_"))}
    assert ours <= direct, f"named differently on the direct endpoint: {sorted(ours - direct)}"
    wanted = dashboard_series()
    assert "lumen_kv_cache_usage_ratio" in wanted and len(wanted) > 15
    assert wanted - EVENT_ONLY <= direct, f"dashboard queries missing from the scrape: {sorted(wanted - direct)}"
