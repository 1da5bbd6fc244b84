"""Gauges read for every model of a server, and the GPU memory gauge, through a real SDK reader."""
from __future__ import annotations

from types import SimpleNamespace

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from lumen.telemetry.step_metrics import StepMetrics, observe_device_memory


def collect(reader: InMemoryMetricReader) -> dict[str, list]:
    data = reader.get_metrics_data()
    return {m.name: list(m.data.data_points) for rm in data.resource_metrics for sm in rm.scope_metrics
            for m in sm.metrics}


def test_every_model_reports_its_gauges_and_memory():
    """A meter keeps only the first callbacks of an instrument name: per-model gauges must still
    report the second model (they reported the first alone before)."""
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    for name, used in (("a", 3), ("b", 5)):
        steps = StepMetrics(meter, name)
        steps.observe_load(SimpleNamespace(num_running=1, num_waiting=0, kv_blocks_used=used, kv_blocks_free=10))
        steps.set_memory("cpu", 0, 1000 * used)
    points = collect(reader)
    used = {p.attributes["gen_ai.request.model"]: p.value for p in points["lumen.kv_cache.blocks"]
            if p.attributes["state"] == "used"}
    assert used == {"a": 3, "b": 5}
    memory = {(p.attributes["gen_ai.request.model"], p.attributes["part"]): p.value
              for p in points["lumen.model.memory"]}
    assert memory == {("a", "kv_cache"): 3000, ("b", "kv_cache"): 5000}   # CPU weights are not counted


def test_device_memory_gauge_reads_at_collection():
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    values = {"allocated": 1, "reserved": 2}
    observe_device_memory(meter, lambda: [("cuda:0", state, v) for state, v in values.items()])
    values["allocated"] = 7
    points = collect(reader)["lumen.device.memory.used"]
    assert {(p.attributes["device"], p.attributes["state"]): p.value for p in points} == {
        ("cuda:0", "allocated"): 7, ("cuda:0", "reserved"): 2}
