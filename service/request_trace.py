"""The spans and measurements of one Generate or Chat, recorded when it ends however it ends.

Two spans per request: the gRPC SERVER span (`lumen.v1.Inference/Generate` or `/Chat`, with
the RPC semantic conventions' attributes), and under it an INTERNAL `text_completion {model}`
(`chat {model}`) span
with the GenAI conventions' request, response and usage attributes. The engine's phase
spans (`queue`, `prefill`, `decode`, `draft`, `verify`) and `tokenize` are children of the
latter. Latency metrics are recorded in the context of the request's span, so a sampled
request leaves its trace id as an exemplar on the histogram points.

Prompt and completion text are recorded only when asked (`capture_content`), as the
GenAI conventions advise: they may hold personal data.
"""
from __future__ import annotations

import json
import logging
import time

from opentelemetry import trace
from opentelemetry.context import Context

from lumen.engine.core.request import FinishReason, GenerationRequest, RequestOutput
from lumen.telemetry import EngineMetrics
from lumen.telemetry.metrics import ATTR_LORA_ADAPTER

log = logging.getLogger("lumen.requests")

GENERATE_METHOD = "lumen.v1.Inference/Generate"
CHAT_METHOD = "lumen.v1.Inference/Chat"
PROVIDER_NAME = "lumen"
OPERATION_NAME = "text_completion"
CHAT_OPERATION_NAME = "chat"
ADAPTER_ATTRIBUTE_CHARS = 128   # of a client's adapter name on its spans (names are at most 64)
# Server-side status codes the gRPC conventions count as errors. The others (a bad argument,
# a missing model, a client's cancel) leave the SERVER span's status unset.
SERVER_ERROR_CODES = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE",
                                "DATA_LOSS"})
# The conventions' finish reasons (OpenAI's words); Lumen's own reason is `lumen.finish_reason`.
GENAI_FINISH_REASON = {FinishReason.EOS: "stop", FinishReason.STOP_SEQUENCE: "stop",
                       FinishReason.STOP_TOKEN: "stop", FinishReason.LENGTH: "length", FinishReason.ABORTED: "cancelled",
                       FinishReason.ERROR: "error"}


def peer_attributes(peer: str) -> dict[str, str | int]:
    """`ipv4:127.0.0.1:5000` / `ipv6:[::1]:5000` (grpc's context.peer()) as network.peer.*."""
    _, _, address = peer.partition(":")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return {}
    return {"network.peer.address": host.strip("[]"), "network.peer.port": int(port)}


class RequestTrace:
    """One Generate's spans and metrics. Call `finish` exactly once."""

    def __init__(self, tracer: trace.Tracer, metrics: EngineMetrics, parent: Context, peer: str,
                 capture_content: bool = False, chat: bool = False) -> None:
        self.tracer, self.metrics, self.capture_content = tracer, metrics, capture_content
        self.operation = CHAT_OPERATION_NAME if chat else OPERATION_NAME
        self.started = time.monotonic()
        method = CHAT_METHOD if chat else GENERATE_METHOD
        self.server = tracer.start_span(method, context=parent, kind=trace.SpanKind.SERVER, attributes={
            "rpc.system.name": "grpc", "rpc.method": method, **peer_attributes(peer)})
        # Sent in every streamed message: formatted once, not per message.
        self.trace_id = format(self.server.get_span_context().trace_id, "032x")
        self.completion: trace.Span | None = None
        self.model = ""
        self.adapter = ""   # the request's LoRA adapter once the engine has taken it
        self.request_id = ""
        self.ttft: float | None = None
        self.last: RequestOutput | None = None
        self.text: list[str] = []

    @property
    def span(self) -> trace.Span:
        """The innermost span of the request so far."""
        return self.completion or self.server

    def start_completion(self, model: str) -> Context:
        """Open `text_completion {model}` (`chat {model}` for Chat); its context parents everything
        done for the request."""
        self.model = model
        self.completion = self.tracer.start_span(
            f"{self.operation} {model}", context=trace.set_span_in_context(self.server), attributes={
                "gen_ai.operation.name": self.operation, "gen_ai.provider.name": PROVIDER_NAME,
                "gen_ai.request.model": model})
        return trace.set_span_in_context(self.completion)

    def request_started(self, gen: GenerationRequest, prompt_text: str,
                        messages: list[dict[str, str]] | None = None) -> None:
        """The request as the engine runs it, defaults applied; `messages`: a Chat's conversation
        (recorded instead of the rendered prompt when content is captured)."""
        s = gen.sampling
        attributes = {"gen_ai.response.id": gen.request_id, "gen_ai.request.max_tokens": gen.max_new_tokens,
                      "gen_ai.request.temperature": s.temperature, "gen_ai.request.top_p": s.top_p,
                      # The conventions type top_k as a double.
                      "gen_ai.request.top_k": float(s.top_k), "gen_ai.request.stream": True}
        if s.seed is not None:
            attributes["gen_ai.request.seed"] = s.seed
        if gen.stop:
            attributes["gen_ai.request.stop_sequences"] = list(gen.stop)
        if self.capture_content:
            turns = messages if messages is not None else [{"role": "user", "content": prompt_text}]
            attributes["gen_ai.input.messages"] = json.dumps(
                [{"role": m["role"], "parts": [{"type": "text", "content": m["content"]}]} for m in turns],
                ensure_ascii=False)
        self.span.set_attributes(attributes)
        self.server.set_attribute("lumen.request_id", gen.request_id)
        if gen.adapter:   # gen_ai.request.model stays the base model
            self.span.set_attribute(ATTR_LORA_ADAPTER, gen.adapter[:ADAPTER_ATTRIBUTE_CHARS])
            self.server.set_attribute(ATTR_LORA_ADAPTER, gen.adapter[:ADAPTER_ATTRIBUTE_CHARS])
        self.request_id = gen.request_id

    def admitted(self, gen: GenerationRequest) -> None:
        """The engine took the request: its adapter exists, so it may label the metrics."""
        self.adapter = gen.adapter

    def update(self, out: RequestOutput) -> None:
        if self.ttft is None and out.token_ids:
            self.ttft = time.monotonic() - self.started
        if self.capture_content and out.text:
            self.text.append(out.text)
        self.last = out

    def finish(self, status: str, error: BaseException | None = None) -> None:
        """End both spans and record the request's metrics; `status` is a gRPC status code name."""
        duration = time.monotonic() - self.started
        out = self.last
        finished = out is not None and out.finished
        reason = out.finish_reason.value if finished else "none"
        if self.completion is not None:
            self._end_completion(out if finished else None, status, error)
        self._end_server(status, error)
        context = trace.set_span_in_context(self.span)
        prompt_tokens = out.prompt_tokens if out else 0
        completion_tokens = out.completion_tokens if out else 0
        if self.ttft is not None:
            self.metrics.record_first_token(self.ttft, self.model, context, self.adapter)
        self.metrics.record_finished(model=self.model, finish_reason=reason, status=status,
                                     prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                     duration_s=duration, ttft_s=self.ttft, context=context, adapter=self.adapter)
        level = logging.WARNING if status in SERVER_ERROR_CODES else logging.INFO
        with trace.use_span(self.span, end_on_exit=False):
            log.log(level, "chat finished" if self.operation == CHAT_OPERATION_NAME else "generate finished", extra={
                "request_id": self.request_id, "model": self.model, "adapter": self.adapter, "status": status,
                "finish_reason": reason, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "duration_s": round(duration, 6), "ttft_s": None if self.ttft is None else round(self.ttft, 6)})

    def _end_completion(self, out: RequestOutput | None, status: str, error: BaseException | None) -> None:
        span = self.completion
        if span.is_recording():
            if out is not None:
                span.set_attributes({
                    "gen_ai.response.model": self.model,
                    "gen_ai.response.finish_reasons": [GENAI_FINISH_REASON[out.finish_reason]],
                    "gen_ai.usage.input_tokens": out.prompt_tokens,
                    "gen_ai.usage.output_tokens": out.completion_tokens,
                    "gen_ai.usage.cache_read.input_tokens": out.cached_tokens,
                    "lumen.finish_reason": out.finish_reason.value})
                if out.draft_tokens:
                    span.set_attributes({"lumen.speculative.draft_tokens": out.draft_tokens,
                                         "lumen.speculative.accepted_tokens": out.accepted_tokens})
            if self.ttft is not None:
                span.set_attribute("gen_ai.response.time_to_first_chunk", self.ttft)
            if self.capture_content and out is not None:
                span.set_attribute("gen_ai.output.messages", json.dumps([{
                    "role": "assistant", "parts": [{"type": "text", "content": "".join(self.text)}],
                    "finish_reason": GENAI_FINISH_REASON[out.finish_reason]}], ensure_ascii=False))
            if status == "CANCELLED":
                span.add_event("cancelled by client")
            elif status != "OK":
                if error is not None:
                    span.record_exception(error)
                span.set_attribute("error.type", type(error).__name__ if error is not None else status)
                span.set_status(trace.StatusCode.ERROR, str(error) if error is not None else status)
        span.end()

    def _end_server(self, status: str, error: BaseException | None) -> None:
        span = self.server
        span.set_attribute("rpc.response.status_code", status)
        if status in SERVER_ERROR_CODES:
            if error is not None:
                span.record_exception(error)
            span.set_attribute("error.type", status)
            span.set_status(trace.StatusCode.ERROR, str(error) if error is not None else status)
        span.end()
