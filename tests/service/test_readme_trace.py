"""The README's "Seeing a request" shows a trace the service really exports.

Runs the README's request (stories260K, 64 greedy tokens from BOS, llama2xs as its
speculative draft model) through a real server
and OTLP, renders its trace without timings and checks the README's rendering has the
same lines. `python -m tests.service.test_readme_trace` prints the rendering with timings;
with `--write` it also puts it into the README, between the trace markers and nowhere else.
"""
from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from lumen.engine.core.llm_engine import EngineConfig
from lumen.telemetry import setup_telemetry
from lumen.v1 import inference_pb2 as pb
from tests.otlp_receiver import OtlpReceiver
from tests.service.conftest import start_harness
from tests.trace_render import render

README = Path(__file__).resolve().parents[2] / "README.md"
DRAFT = "llama2xs-stories-tok512.gguf"
DURATION = re.compile(r"  \d+\.\d\d ms")
BEGIN, END = "<!-- trace:begin -->\n```text\n", "```\n<!-- trace:end -->"


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


def _block_span(text: str) -> tuple[int, int]:
    """Where the rendering sits in the README: between exactly one pair of markers."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"the README must hold the trace markers exactly once ({BEGIN!r} ... {END!r})")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    if end < start:
        raise ValueError("the README's trace:end marker comes before trace:begin")
    return start, end


def readme_block(text: str | None = None) -> str:
    start, end = _block_span(README.read_text() if text is None else text)
    return (README.read_text() if text is None else text)[start:end]


def with_trace_block(text: str, rendering: str) -> str:
    """The README text with its trace block replaced by `rendering`; nothing else changes."""
    start, end = _block_span(text)
    return text[:start] + rendering.rstrip("\n") + "\n" + text[end:]


def test_rewriting_the_trace_touches_only_the_marked_block():
    text = README.read_text()
    rendering = "lumen.v1.Inference/Generate [SERVER]  1.00 ms\nTRACE OTEL_TRACES_EXPORTER"
    rewritten = with_trace_block(text, rendering)
    start, end = _block_span(text)
    new_start, new_end = _block_span(rewritten)
    assert rewritten[:new_start] == text[:start] and rewritten[new_end:] == text[end:]
    assert readme_block(rewritten) == rendering + "\n"
    assert with_trace_block(rewritten, readme_block(text)) == text
    for broken in (text.replace(BEGIN, ""), text + BEGIN, text.replace(END, "")):
        with pytest.raises(ValueError, match="markers"):
            with_trace_block(broken, rendering)


def test_readme_shows_the_trace_only_inside_its_markers():
    """A trace pasted anywhere else (once it replaced the word TRACE in OTEL_TRACES_EXPORTER)."""
    text = README.read_text()
    start, end = _block_span(text)
    outside = text[:start] + text[end:]
    assert "[SERVER]" not in outside and "engine_step  " not in outside
    assert "`OTEL_TRACES_EXPORTER`" in outside and "`OTEL_TRACES_SAMPLER`" in outside


async def test_readme_trace_is_what_the_service_exports(stories_model, stories_draft_model, monkeypatch):
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        tree, step = await exported_trace(stories_model, stories_draft_model, receiver)
    expected = DURATION.sub("", tree + "\n\n" + step).strip()
    shown = DURATION.sub("", readme_block()).strip()
    assert shown == expected, f"README trace is stale; the service now exports:\n{tree}\n\n{step}"


def main() -> None:
    """Print the rendering with timings; `--write` also puts it into the README's trace block."""
    from lumen.engine.weights.gguf_loader import load_gguf
    from tests.conftest import shared_file

    async def run() -> None:
        with OtlpReceiver() as receiver:
            os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
            os.environ["OTEL_EXPORTER_OTLP_INSECURE"] = "true"
            tree, step = await exported_trace(load_gguf(shared_file("models", "stories260K.gguf")),
                                              load_gguf(shared_file("models", DRAFT)), receiver)
        rendering = tree + "\n\n" + step
        print(rendering)
        if "--write" in sys.argv[1:]:
            README.write_text(with_trace_block(README.read_text(), rendering))
            print(f"written into {README}'s trace block", file=sys.stderr)

    asyncio.run(run())


if __name__ == "__main__":
    main()
