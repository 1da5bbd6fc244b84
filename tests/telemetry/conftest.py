"""Shared by the telemetry tests: a clean OpenTelemetry environment for each."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def clean_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees only the OTEL_* variables it sets itself."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
