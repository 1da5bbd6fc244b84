"""A small streaming client for the Inference service (used by `lumen generate` and `lumen chat`)."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import grpc
from opentelemetry import trace

from lumen.telemetry import inject_context
from lumen.telemetry.client import client_telemetry
from lumen.v1 import inference_pb2 as pb
from lumen.v1 import inference_pb2_grpc as pb_grpc

GENERATE_METHOD = "lumen.v1.Inference/Generate"
CHAT_METHOD = "lumen.v1.Inference/Chat"


@dataclass(slots=True)
class GenerateSummary:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    draft_tokens: int = 0           # speculative draft tokens verified
    accepted_draft_tokens: int = 0
    finish_reason: str = ""
    trace_id: str = ""
    time_to_first_token: float = 0.0
    decode_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first over the time after the first."""
        if self.completion_tokens > 1 and self.decode_seconds > 0:
            return (self.completion_tokens - 1) / self.decode_seconds
        return self.completion_tokens / self.total_seconds if self.total_seconds else 0.0

    def line(self) -> str:
        spec = ""
        if self.draft_tokens:
            rate = self.accepted_draft_tokens / self.draft_tokens
            spec = f"draft_tokens={self.draft_tokens} accepted={self.accepted_draft_tokens} ({rate:.0%}) "
        return (f"prompt_tokens={self.prompt_tokens} completion_tokens={self.completion_tokens} {spec}"
                f"ttft={self.time_to_first_token * 1000:.1f}ms tokens/s={self.tokens_per_second:.1f} "
                f"finish={self.finish_reason} trace_id={self.trace_id}")


def stream_generate(stub: pb_grpc.InferenceStub, request: pb.GenerateRequest | pb.ChatRequest,
                    on_text: Callable[[str], None] = lambda _: None, timeout: float | None = None,
                    metadata: Iterable[tuple[str, str]] = ()) -> GenerateSummary:
    """Run one Generate (or Chat, for a ChatRequest), calling on_text with each new piece of
    text; return the summary."""
    summary = GenerateSummary()
    start = time.monotonic()
    first = None
    call = stub.Chat if isinstance(request, pb.ChatRequest) else stub.Generate
    for msg in call(request, timeout=timeout, metadata=tuple(metadata)):
        if msg.token_ids and first is None:
            first = time.monotonic()
            summary.time_to_first_token = first - start
        if msg.text:
            on_text(msg.text)
        summary.text += msg.text
        summary.token_ids.extend(msg.token_ids)
        if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            summary.finish_reason = pb.FinishReason.Name(msg.finish_reason).removeprefix("FINISH_REASON_").lower()
            summary.prompt_tokens = msg.usage.prompt_tokens
            summary.completion_tokens = msg.usage.completion_tokens
            summary.draft_tokens = msg.usage.draft_tokens
            summary.accepted_draft_tokens = msg.usage.accepted_draft_tokens
            summary.trace_id = msg.trace_id
    end = time.monotonic()
    summary.total_seconds = end - start
    summary.decode_seconds = end - first if first is not None else 0.0
    return summary


def traced_generate(target: str, request: pb.GenerateRequest | pb.ChatRequest,
                    on_text: Callable[[str], None] = lambda _: None, timeout: float | None = None,
                    stub: pb_grpc.InferenceStub | None = None) -> GenerateSummary:
    """stream_generate under a CLIENT span whose W3C trace context the call carries, so one trace
    covers client and server; exported as the OTEL_* variables say (nowhere by default)."""
    telemetry, tracer = client_telemetry()
    method = CHAT_METHOD if isinstance(request, pb.ChatRequest) else GENERATE_METHOD
    host, _, port = target.rpartition(":")
    attributes = {"rpc.system.name": "grpc", "rpc.method": method, "server.address": host or target}
    if port.isdigit():
        attributes["server.port"] = int(port)
    try:
        with tracer.start_as_current_span(method, kind=trace.SpanKind.CLIENT,
                                          attributes=attributes) as span:
            try:
                summary = stream_generate(stub or connect(target), request, on_text, timeout, inject_context())
            except grpc.RpcError as err:
                span.set_attributes({"rpc.response.status_code": err.code().name, "error.type": err.code().name})
                raise
            span.set_attribute("rpc.response.status_code", "OK")
            return summary
    finally:
        telemetry.shutdown()


def connect(target: str) -> pb_grpc.InferenceStub:
    return pb_grpc.InferenceStub(grpc.insecure_channel(target))


def apply_request_options(req: pb.GenerateRequest | pb.ChatRequest, args: Any) -> None:
    """Fill a GenerateRequest's or ChatRequest's sampling, stopping and speculation from the
    `lumen generate` / `lumen chat` options (an argparse namespace)."""
    if args.max_tokens is not None:
        req.stopping.max_new_tokens = args.max_tokens
    req.stopping.stop.extend(args.stop)
    req.stopping.stop_token_ids.extend(args.stop_token_id)
    req.stopping.ignore_eos = args.ignore_eos
    s = req.sampling
    for name, value in (("temperature", args.temperature), ("top_p", args.top_p),
                        ("repetition_penalty", args.repetition_penalty), ("seed", args.seed)):
        if value is not None:
            setattr(s, name, value)
    s.top_k, s.min_p = args.top_k, args.min_p
    if args.speculative is not None:
        req.speculative.method = args.speculative
    if args.num_speculative_tokens is not None:
        req.speculative.num_tokens = args.num_speculative_tokens
    req.adapter = args.adapter
    if args.lora_scale is not None:
        req.lora_scale = args.lora_scale


def show(text: str) -> None:
    """Write streamed text to stdout as it comes."""
    sys.stdout.write(text)
    sys.stdout.flush()


def end_stream(summary: GenerateSummary) -> None:
    """Close the streamed text's line and print the summary line (to stderr)."""
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(f"[{summary.line()}]", file=sys.stderr)
