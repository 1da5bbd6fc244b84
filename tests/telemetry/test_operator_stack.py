"""The operator's observability stack (compose.yaml, otel-collector.yaml, deploy/) checked without running it.

No container engine runs here, so the files are checked for what would break the stack: a
pipeline naming an undefined component, a mount of a file that does not exist, ports that do
not line up between services, and dashboard queries naming series or labels Lumen never
exports. The last is checked against a real server's OTLP exports, translated to the names the
collector's Prometheus exporter gives them.
"""
from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml

from lumen.telemetry import setup_telemetry
from lumen.v1 import inference_pb2 as pb
from tests.otlp_receiver import exporting_to_receiver
from tests.otlp_records import MetricRecord
from tests.service.conftest import start_harness

ROOT = Path(__file__).resolve().parents[2]
COMPONENT_KINDS = ("receivers", "processors", "exporters")
REQUIRED_SERVICES = {"lumen", "otel-collector", "jaeger", "prometheus", "grafana"}
DASHBOARD = ROOT / "deploy/grafana/dashboards/lumen.json"


def load_yaml(relative: str) -> dict:
    return yaml.safe_load((ROOT / relative).read_text())


def host_port(address: str) -> tuple[str, int]:
    """`jaeger:4317`, `0.0.0.0:8889` or `http://otel-collector:4317` -> (host, port)."""
    host, port = re.sub(r"^\w+://", "", address).rstrip("/").rsplit(":", 1)
    return host, int(port)


def container_ports(service: dict) -> set[int]:
    """Published container ports of a compose service ("HOST:CONTAINER[/proto]" strings)."""
    return {int(str(p).split("/")[0].rsplit(":", 1)[-1]) for p in service.get("ports", [])}


def bind_mounts(service: dict) -> dict[str, str]:
    """Container path -> host path of a compose service's "HOST:CONTAINER[:MODE]" volumes."""
    return {volume.split(":")[1]: volume.split(":")[0] for volume in service.get("volumes", [])}


def flag(command: list[str], name: str) -> str:
    (value,) = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"{name}=")]
    return value


def test_collector_pipelines_use_defined_components_and_limit_memory_first():
    config = load_yaml("otel-collector.yaml")
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"traces", "metrics", "logs"}
    used: dict[str, set[str]] = {kind: set() for kind in COMPONENT_KINDS}
    for name, pipeline in pipelines.items():
        for kind in COMPONENT_KINDS:
            undefined = set(pipeline[kind]) - set(config[kind])
            assert not undefined, f"pipeline {name} names undefined {kind}: {sorted(undefined)}"
            used[kind] |= set(pipeline[kind])
        assert pipeline["processors"][0] == "memory_limiter", f"{name}: memory_limiter must come first"
    for kind in COMPONENT_KINDS:
        assert not set(config[kind]) - used[kind], f"{kind} defined but unused: {set(config[kind]) - used[kind]}"
    assert "otlp/jaeger" in pipelines["traces"]["exporters"]
    assert "prometheus" in pipelines["metrics"]["exporters"]
    limiter = config["processors"]["memory_limiter"]
    assert {"check_interval", "limit_percentage", "spike_limit_percentage"} <= set(limiter)
    prometheus = config["exporters"]["prometheus"]
    assert prometheus["enable_open_metrics"] is True  # exemplars are only written in OpenMetrics
    assert prometheus["resource_to_telemetry_conversion"]["enabled"] is False
    assert prometheus.get("add_metric_suffixes", True) is True  # the dashboard's names carry suffixes


def test_ports_line_up_between_lumen_collector_jaeger_and_prometheus():
    config = load_yaml("otel-collector.yaml")
    services = load_yaml("compose.yaml")["services"]
    protocols = config["receivers"]["otlp"]["protocols"]
    grpc_host, grpc_port = host_port(protocols["grpc"]["endpoint"])
    http_host, http_port = host_port(protocols["http"]["endpoint"])
    assert (grpc_host, grpc_port, http_host, http_port) == ("0.0.0.0", 4317, "0.0.0.0", 4318)
    exporter_host, exporter_port = host_port(config["exporters"]["prometheus"]["endpoint"])
    assert (exporter_host, exporter_port) == ("0.0.0.0", 8889)
    assert {grpc_port, http_port, exporter_port} <= container_ports(services["otel-collector"])

    lumen_env = services["lumen"]["environment"]
    assert host_port(lumen_env["OTEL_EXPORTER_OTLP_ENDPOINT"]) == ("otel-collector", grpc_port)
    assert 50051 in container_ports(services["lumen"])
    jaeger = config["exporters"]["otlp/jaeger"]
    assert host_port(jaeger["endpoint"]) == ("jaeger", 4317) and jaeger["tls"]["insecure"] is True

    (job,) = load_yaml("deploy/prometheus/prometheus.yml")["scrape_configs"]
    (targets,) = [static["targets"] for static in job["static_configs"]]
    assert targets == [f"otel-collector:{exporter_port}"]
    assert job["scrape_interval"] == "5s"


def test_compose_services_exist_pin_images_and_mount_files_from_the_repo():
    services = load_yaml("compose.yaml")["services"]
    assert REQUIRED_SERVICES <= set(services), f"missing services: {REQUIRED_SERVICES - set(services)}"
    assert services["lumen"]["build"] == "." and (ROOT / "Dockerfile").is_file()
    for name, service in services.items():
        image = service.get("image")
        if image is not None:
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image version ({image})"
        assert set(service.get("depends_on", [])) <= set(services), name
        outside = [src for src in bind_mounts(service).values()  # named volumes have no "/"
                   if "/" in src and not (src.startswith("./") and (ROOT / src).exists())]
        assert not outside, f"{name} mounts paths absent from the repository: {outside}"
    collector = services["otel-collector"]
    assert bind_mounts(collector)[flag(collector["command"], "--config")] == "./otel-collector.yaml"
    prometheus = services["prometheus"]
    config_path = flag(prometheus["command"], "--config.file")
    assert bind_mounts(prometheus)[config_path] == "./deploy/prometheus/prometheus.yml"
    assert "--enable-feature=exemplar-storage" in prometheus["command"]
    grafana = bind_mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    (provider,) = load_yaml("deploy/grafana/provisioning/dashboards/dashboards.yaml")["providers"]
    dashboards_dir = ROOT / grafana[provider["options"]["path"]]
    assert dashboards_dir == DASHBOARD.parent


def datasource_uids(node) -> set[str]:
    """Every `datasource.uid` anywhere in a dashboard."""
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    own = node.get("datasource") if isinstance(node, dict) else None
    return ({own["uid"]} if isinstance(own, dict) else set()).union(*map(datasource_uids, children))


def dashboard_targets(dashboard: dict) -> list[dict]:
    return [target for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_grafana_datasources_match_services_and_the_dashboard():
    services = load_yaml("compose.yaml")["services"]
    sources = load_yaml("deploy/grafana/provisioning/datasources/datasources.yaml")["datasources"]
    by_uid = {source["uid"]: source for source in sources}
    assert {by_uid["prometheus"]["type"], by_uid["jaeger"]["type"]} == {"prometheus", "jaeger"}
    for uid, port in (("prometheus", 9090), ("jaeger", 16686)):
        host, url_port = host_port(by_uid[uid]["url"])
        assert url_port == port and port in container_ports(services[host]), uid
    (destination,) = by_uid["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert destination == {"name": "trace_id", "datasourceUid": "jaeger"}

    dashboard = json.loads(DASHBOARD.read_text())
    assert (dashboard["uid"], dashboard["title"]) == ("lumen", "Lumen")
    unknown = datasource_uids(dashboard) - set(by_uid)
    assert not unknown, f"dashboard uses datasource uids not provisioned: {sorted(unknown)}"
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["model"]
    for target in dashboard_targets(dashboard):
        if "_seconds_bucket" in target["expr"]:  # a latency quantile: link its exemplars to traces
            assert target.get("exemplar") is True, target["expr"]


# --- the dashboard's PromQL against what a real server exports -----------------------------------

# Created by telemetry/step_metrics.py (checked below) but only emitted once the event happens; a
# preemption needs the KV cache to run out of blocks, which this run does not force.
CREATED_NOT_EMITTED = {"lumen.engine.preemptions": ("counter", "{request}", {"gen_ai.request.model"}),
                       "lumen.device.memory.used": ("observable_gauge", "By", {"device", "state"})}  # GPUs only
INSTRUMENT_TYPES = {"counter": ("sum", True), "up_down_counter": ("sum", False),
                    "histogram": ("histogram", False), "observable_gauge": ("gauge", False)}
UNIT_SUFFIXES = {"s": "seconds", "ms": "milliseconds", "By": "bytes"}
PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile", "rate", "irate", "increase",
    "histogram_quantile", "clamp_min", "clamp_max", "abs", "vector", "scalar", "label_values",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
}
SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
RATE_OF = re.compile(r"\b(?:rate|irate|increase)\s*\(\s*([A-Za-z_:][\w:]*)")


@dataclass
class Series:
    labels: set[str] = field(default_factory=set)
    cumulative: bool = False  # a counter or a histogram's _bucket/_sum/_count: rate() applies


def prometheus_names(name: str, unit: str, data_type: str, monotonic: bool) -> dict[str, bool]:
    """The collector's Prometheus exporter's series names (add_metric_suffixes: true) -> cumulative."""
    base = re.sub(r"[^A-Za-z0-9_:]", "_", name)
    unit = re.sub(r"\{[^}]*\}", "", unit)  # curly-brace units are annotations: no suffix
    if unit == "1":
        suffix = "ratio" if data_type == "gauge" else ""
    elif unit and unit not in UNIT_SUFFIXES:
        raise ValueError(f"{name}: no Prometheus suffix known for unit {unit!r}; add it to UNIT_SUFFIXES")
    else:
        suffix = UNIT_SUFFIXES.get(unit, "")
    if suffix and not base.endswith(f"_{suffix}"):
        base = f"{base}_{suffix}"
    if data_type == "histogram":
        return {f"{base}_bucket": True, f"{base}_sum": True, f"{base}_count": True}
    if data_type == "sum" and monotonic:
        return {f"{base}_total": True}
    return {base: False}


def add_metric(catalog: dict[str, Series], name: str, unit: str, data_type: str, monotonic: bool,
               attributes: set[str]) -> None:
    labels = {re.sub(r"[^A-Za-z0-9_]", "_", key) for key in attributes}
    for series, cumulative in prometheus_names(name, unit, data_type, monotonic).items():
        entry = catalog.setdefault(series, Series(cumulative=cumulative))
        entry.labels |= labels | ({"le"} if series.endswith("_bucket") else set())


def exported_catalog(metrics: list[MetricRecord]) -> dict[str, Series]:
    catalog: dict[str, Series] = {}
    for metric in metrics:
        attributes = {key for point in metric.points for key in point.attributes}
        add_metric(catalog, metric.name, metric.unit, metric.data_type, metric.is_monotonic, attributes)
    source = (ROOT / "telemetry/step_metrics.py").read_text()
    for name, (instrument, unit, attributes) in CREATED_NOT_EMITTED.items():
        created = rf'create_{instrument}\(\s*"{re.escape(name)}",\s*unit="{re.escape(unit)}"'
        assert re.search(created, source), f"{name} is no longer created as a {instrument} in {unit}"
        assert all(f'"{key}"' in source for key in attributes), name
        add_metric(catalog, name, unit, *INSTRUMENT_TYPES[instrument], attributes)
    return catalog


@dataclass
class Query:
    names: set[str]  # series names: the identifiers that are not PromQL functions or keywords
    matchers: list[tuple[str, set[str]]]  # (series name, label names matched in its {...})
    grouping: set[str]  # labels in by/without/on/ignoring/group_left/group_right clauses
    rated: set[str]  # series under rate(), irate() or increase()


def parse_promql(expr: str) -> Query:
    matchers = [(name, set(MATCHER.findall(body))) for name, body in SELECTOR.findall(expr)]
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', "", SELECTOR.sub(lambda m: m.group(1) or "", expr))
    grouping = {label.strip() for labels in GROUPING.findall(bare) for label in labels.split(",")} - {""}
    bare = re.sub(r"\b\d[\w.]*", "", GROUPING.sub(" ", re.sub(r"\[[^\]]*\]", "", bare)))  # no ranges, numbers
    names = set(re.findall(r"[A-Za-z_:][\w:]*", bare)) - PROMQL_WORDS
    return Query(names, matchers, grouping, set(RATE_OF.findall(expr)))


def query_problems(expr: str, catalog: dict[str, Series]) -> tuple[set[str], list[str]]:
    """(series `expr` names that Lumen does not export, its other problems)."""
    query = parse_promql(expr)
    problems = [f"{name} has no label(s) {sorted(labels - catalog[name].labels)}: {expr}"
                for name, labels in query.matchers if name in catalog and labels - catalog[name].labels]
    known_labels = set().union(*(catalog[name].labels for name in query.names & catalog.keys()))
    if query.grouping - known_labels:
        problems.append(f"grouping by label(s) {sorted(query.grouping - known_labels)} no series has: {expr}")
    problems += [f"rate() of {name}, not a counter: {expr}" for name in query.rated & catalog.keys()
                 if not catalog[name].cumulative]
    return query.names - set(catalog), problems


async def generate(harness, req: pb.GenerateRequest):
    return [m async for m in harness.stub.Generate(req)][-1]


async def make_every_metric_appear(harness) -> None:
    """A speculative request, two sharing a cached prefix, one rejected (an error status)."""
    spec = pb.GenerateRequest()
    spec.sampling.temperature = 0
    spec.stopping.max_new_tokens, spec.stopping.ignore_eos = 64, True
    spec.speculative.method = "ngram"
    assert (await generate(harness, spec)).usage.draft_tokens > 0
    prefix = [1] + [(7 * i) % 500 + 3 for i in range(511)]  # 512 tokens = 32 full blocks of 16
    for suffix in ([400, 401, 402], [410, 411]):
        req = pb.GenerateRequest(prompt_token_ids=prefix + suffix)
        req.sampling.temperature = 0
        req.stopping.max_new_tokens = 4
        usage = (await generate(harness, req)).usage
    assert usage.cached_tokens == 512
    bad = pb.GenerateRequest(prompt="x")
    bad.sampling.top_p = 2.0
    with pytest.raises(grpc.aio.AioRpcError):
        await generate(harness, bad)


def all_requests_exported(metrics: list[MetricRecord]) -> bool:
    """The newest export of the cumulative lumen.requests counter counts the four requests."""
    exports = [m for m in metrics if m.name == "lumen.requests"]
    return bool(exports) and sum(p.value for p in exports[-1].points) >= 4


async def test_dashboard_queries_name_series_and_labels_lumen_exports(stories_model, monkeypatch):
    with exporting_to_receiver(monkeypatch) as receiver:
        telemetry = setup_telemetry()
        harness = await start_harness(stories_model, telemetry)
        try:
            await make_every_metric_appear(harness)
            await asyncio.to_thread(telemetry.force_flush)
            metrics = await asyncio.to_thread(receiver.wait_for_metrics, all_requests_exported)
        finally:
            await harness.close()
    catalog = exported_catalog(metrics)
    dashboard = json.loads(DASHBOARD.read_text())
    unknown: set[str] = set()
    problems: list[str] = []
    for target in dashboard_targets(dashboard):
        names, other = query_problems(target["expr"], catalog)
        unknown |= names
        problems += other
    for variable in dashboard["templating"]["list"]:
        metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"]["query"]).groups()
        unknown |= {metric} - set(catalog)
        problems += [f"variable {variable['name']}: {metric} has no label {label}"] if (
            metric in catalog and label not in catalog[metric].labels) else []
    assert not unknown, (f"dashboard queries name series Lumen does not export: {sorted(unknown)}; "
                         f"exported: {sorted(catalog)}")
    assert not problems, "\n".join(problems)


# Scrape-config keys Prometheus 2.x does not know (it refuses a file that has them).
PROMETHEUS_3_ONLY = ("metric_name_validation_scheme", "metric_name_escaping_scheme")


def test_prometheus_config_matches_the_pinned_version_and_says_which_it_supports():
    image = load_yaml("compose.yaml")["services"]["prometheus"]["image"]
    major = int(re.fullmatch(r"prom/prometheus:v(\d+)\.\d+\.\d+", image)[1])
    text = (ROOT / "deploy/prometheus/prometheus.yml").read_text()
    uses_3_only = [key for key in PROMETHEUS_3_ONLY if re.search(rf"^\s*{key}:", text, re.M)]
    if uses_3_only:
        assert major >= 3, f"{uses_3_only} need Prometheus 3, compose pins {image}"
        assert "Supported: Prometheus 3.0 and newer" in text and "2.x" in text
        assert "Prometheus 3.0 and newer" in (ROOT / "deploy/README.md").read_text()


def test_prometheus_config_passes_promtool():
    """With a promtool on PATH: 3.x checks the file as it is; 2.x (Debian's) the file without
    its 3.x-only lines, as deploy/README.md tells a 2.x user to run it."""
    import shutil
    import subprocess
    import tempfile

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool on PATH (Debian's prometheus package has one)")
    version = subprocess.run([promtool, "--version"], capture_output=True, text=True).stdout
    major = int(re.search(r"version (\d+)\.", version)[1])
    text = (ROOT / "deploy/prometheus/prometheus.yml").read_text()
    if major < 3:
        text = "\n".join(line for line in text.splitlines()
                         if not any(re.match(rf"\s*{key}:", line) for key in PROMETHEUS_3_ONLY))
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as config:
        config.write(text)
        config.flush()
        checked = subprocess.run([promtool, "check", "config", config.name], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
