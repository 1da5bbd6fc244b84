"""`lumen serve` started as a user starts it: the installed `lumen` script in a subprocess,
serving SmolLM2-135M-Instruct (the default model) and stories260K, with the Prometheus scrape
endpoint on. Tests talk to it over gRPC and read its metrics over HTTP, nothing in-process.

One server for the whole e2e suite (loading and warming up costs a few seconds). It listens on
a port the OS picks (`--port 0`); the test reads it from the line the server prints when ready.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from lumen.v1 import inference_pb2_grpc as pb_grpc
from tests.conftest import shared_file

READY = re.compile(r"lumen: serving .* on ([\d.]+):(\d+)")
START_TIMEOUT_S = 120


@dataclass
class Server:
    process: subprocess.Popen
    target: str
    metrics_url: str
    stub: pb_grpc.InferenceStub
    log: list[str]

    def metric(self, name: str, **labels: str) -> float:
        """One sample of the scrape endpoint (the sum over series matching `labels`)."""
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        total, found = 0.0, False
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        if not found:
            raise AssertionError(f"{name} {labels} not in the scrape:\n{text[:2000]}")
        return total

    def wait_for(self, condition, timeout_s: float = 30.0, what: str = "") -> None:
        """Poll an observable condition of the server (its metrics) until it holds."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or condition}")
            time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lumen_script() -> str:
    script = Path(sys.executable).parent / "lumen"
    if not script.exists():
        pytest.skip(f"the `lumen` script is not installed next to {sys.executable} (pip install -e .)")
    return str(script)


def launch(args: list[str], env_extra: dict[str, str] | None = None):
    """`lumen serve ARGS --port 0` in a subprocess with the Prometheus endpoint on; yields a Server
    once it prints its address, and checks that it stops cleanly (a generator for fixtures)."""
    metrics_port = _free_port()
    env = dict(os.environ, OTEL_METRICS_EXPORTER="prometheus", OTEL_TRACES_EXPORTER="none",
               OTEL_LOGS_EXPORTER="none", OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
               OTEL_EXPORTER_PROMETHEUS_PORT=str(metrics_port), **(env_extra or {}))
    cmd = [_lumen_script(), "serve", *args, "--port", "0", "--log-level", "WARNING"]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    ready = threading.Event()
    address: list[str] = []

    def read() -> None:  # the server's output, kept for failure messages
        for line in process.stdout:
            log.append(line)
            if not ready.is_set() and (m := READY.search(line)):
                address.append(f"{m.group(1)}:{m.group(2)}")
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(START_TIMEOUT_S) or not address:
        process.kill()
        pytest.fail("lumen serve did not start:\n" + "".join(log[-40:]))
    channel = grpc.insecure_channel(address[0])
    try:
        yield Server(process, address[0], f"http://127.0.0.1:{metrics_port}/metrics",
                     pb_grpc.InferenceStub(channel), log)
    finally:
        channel.close()
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0, "".join(log[-40:])


@pytest.fixture(scope="session")
def server():
    smol = shared_file("models", "SmolLM2-135M-Instruct.Q4_1.gguf")
    stories = shared_file("models", "stories260K.gguf")
    yield from launch(["--model", f"smollm2={smol}", "--model", f"stories={stories}", "--matmul-mode", "exact"])
