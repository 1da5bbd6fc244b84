"""`lumen serve` loads its models and builds its engines off the main thread, on a thread that
ends (service.loading.in_passing_thread): an OpenMP pool left on the main thread made every
engine step 2.4x slower (BENCHMARKS.md, "OpenMP pools and the server's main thread")."""
from __future__ import annotations

import asyncio
import threading

import pytest

from lumen.service import cli, loading, server
from lumen.service.loading import in_passing_thread


class Stop(Exception):
    pass


def test_in_passing_thread_returns_and_raises():
    seen = []
    assert in_passing_thread(lambda a, b: seen.append(threading.current_thread()) or a + b, 2, 3) == 5
    assert seen[0] is not threading.main_thread() and not seen[0].is_alive()
    with pytest.raises(ValueError, match="bad file"):
        in_passing_thread(lambda: (_ for _ in ()).throw(ValueError("bad file")))


def test_serve_loads_models_off_the_main_thread(monkeypatch, stories_path):
    threads = []

    def fake_load(specs, dtype, plain=False):
        threads.append(threading.current_thread())
        raise Stop

    monkeypatch.setattr(loading, "load_models", fake_load)
    monkeypatch.setattr(server, "check_kernels", lambda allow_slow: None)
    with pytest.raises(Stop):
        cli._serve(cli.build_parser().parse_args(["serve", "--model", str(stories_path)]))
    assert threads and threads[0] is not threading.main_thread()


def test_run_server_builds_its_engines_off_the_main_thread(monkeypatch):
    threads = []

    def fake_build(*args):
        threads.append(threading.current_thread())
        raise Stop

    monkeypatch.setattr(server, "build_registry", fake_build)
    monkeypatch.setattr(server, "check_kernels", lambda allow_slow: None)
    config = server.ServerConfig(models=[])
    with pytest.raises(Stop):
        asyncio.run(server.run_server(config, None, []))
    assert threads and threads[0] is not threading.main_thread()
