"""The README's "Seeing a request" shows a trace the service really exports.

Runs the README's request (stories260K, 64 greedy tokens from BOS, llama2xs as its
speculative draft model) through a real server
and OTLP, renders its trace without timings and checks the README's rendering has the
same lines. `python -m tests.service.test_readme_trace` prints the rendering with timings.
"""
from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

from lumen.engine.core.llm_engine import EngineConfig
from lumen.telemetry import setup_telemetry
from lumen.v1 import inference_pb2 as pb
from tests.otlp_receiver import OtlpReceiver
from tests.service.conftest import start_harness
from tests.trace_render import render

README = Path(__file__).resolve().parents[2] / "README.md"
DRAFT = "llama2xs-stories-tok512.gguf"
DURATION = re.compile(r"  \d+\.\d\d ms")


def readme_request() -> pb.GenerateRequest:
    req = pb.GenerateRequest(prompt="", request_id="readme")
    req.sampling.temperature = 0
    req.stopping.max_new_tokens, req.stopping.ignore_eos = 64, True
    req.speculative.method = "draft"
    return req


async def exported_trace(model, draft, receiver: OtlpReceiver) -> tuple[str, str]:
    """(request tree, one engine_step span), rendered with timings."""
    telemetry = setup_telemetry()
    harness = await start_harness(model, telemetry, EngineConfig(step_span_interval_s=0.0), draft=draft)
    try:
        [m async for m in harness.stub.Generate(readme_request())]
        await asyncio.to_thread(telemetry.force_flush)
        spans = await asyncio.to_thread(receiver.wait_for_spans, lambda s: any(x.kind == "SERVER" for x in s))
    finally:
        await harness.close()
    (root,) = [s for s in spans if s.kind == "SERVER"]
    step = next(s for s in spans if s.name == "engine_step" and s.attributes["lumen.engine.prefill_requests"])
    return render(spans, root), render(spans, step)


def readme_block() -> str:
    text = README.read_text()
    start = text.index("<!-- trace:begin -->")
    end = text.index("<!-- trace:end -->")
    return text[start:end].split("```text\n", 1)[1].rsplit("```", 1)[0]


async def test_readme_trace_is_what_the_service_exports(stories_model, stories_draft_model, monkeypatch):
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        tree, step = await exported_trace(stories_model, stories_draft_model, receiver)
    expected = DURATION.sub("", tree + "\n\n" + step).strip()
    shown = DURATION.sub("", readme_block()).strip()
    assert shown == expected, f"README trace is stale; the service now exports:\n{tree}\n\n{step}"


def main() -> None:
    """Print the rendering with timings (to paste into the README after a change to the spans)."""
    from lumen.engine.weights.gguf_loader import load_gguf
    from tests.conftest import shared_file

    async def run() -> None:
        with OtlpReceiver() as receiver:
            os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
            os.environ["OTEL_EXPORTER_OTLP_INSECURE"] = "true"
            tree, step = await exported_trace(load_gguf(shared_file("models", "stories260K.gguf")),
                                              load_gguf(shared_file("models", DRAFT)), receiver)
        print(tree + "\n\n" + step)

    asyncio.run(run())


if __name__ == "__main__":
    main()
