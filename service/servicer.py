"""The `lumen.v1.Inference` gRPC service.

Each Generate opens a SERVER span (continuing the client's W3C traceparent),
tokenizes under a `tokenize` child span, submits to the model's engine (which
adds `prefill` and `decode` spans) and streams every output as it arrives. A
client that cancels or whose deadline passes aborts its request in the engine.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
from opentelemetry import trace

from engine.errors import CapacityError, DuplicateRequestError, EngineStoppedError, InvalidRequestError, ModelNotFoundError
from engine.request import FinishReason, RequestOutput
from lumen.v1 import inference_pb2 as pb
from lumen.v1 import inference_pb2_grpc as pb_grpc
from service import convert
from service.registry import ModelRegistry
from telemetry import EngineMetrics, Telemetry, extract_context

STATUS_FOR = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    EngineStoppedError: grpc.StatusCode.UNAVAILABLE,
    DuplicateRequestError: grpc.StatusCode.ALREADY_EXISTS,
    CapacityError: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    for kind, code in STATUS_FOR.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


@dataclass(slots=True)
class _RequestRecord:
    """What one Generate's span and metrics report when it ends, however it ends."""
    started: float
    model: str = ""
    submitted: str | None = None  # the engine request id, once the engine has it
    status: str = "UNKNOWN"
    ttft: float | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def update(self, out: RequestOutput) -> None:
        if self.ttft is None and out.token_ids:
            self.ttft = time.monotonic() - self.started
        if out.finished:
            self.finish_reason = out.finish_reason
        self.prompt_tokens, self.completion_tokens = out.prompt_tokens, out.completion_tokens


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, registry: ModelRegistry, telemetry: Telemetry, default_max_new_tokens: int) -> None:
        self.registry = registry
        self.tracer = telemetry.tracer
        self.metrics = EngineMetrics(telemetry.meter)
        self.default_max_new_tokens = default_max_new_tokens

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        parent = extract_context(context.invocation_metadata() or ())
        span = self.tracer.start_span("lumen.v1.Inference/Generate", context=parent, kind=trace.SpanKind.SERVER)
        record = _RequestRecord(started=time.monotonic(), model=request.model)
        runtime = None
        try:
            runtime = self.registry.get(request.model)
            record.model = runtime.name
            gen = await self._prepare(request, runtime, span)
            stream = runtime.engine.submit(gen)
            record.submitted = gen.request_id
            self.metrics.request_started()
            trace_id = format(span.get_span_context().trace_id, "032x")
            async for out in stream:
                if out.finish_reason is FinishReason.ABORTED:
                    raise EngineStoppedError("the request was aborted by the server")
                record.update(out)
                yield convert.response_from_output(out, runtime.model.tokenizer, trace_id)
            record.status = "OK"
        except asyncio.CancelledError:
            record.status = "CANCELLED"
            span.add_event("cancelled by client")
            raise
        except Exception as exc:
            code = status_for(exc)
            record.status = code.name
            span.record_exception(exc)
            span.set_status(trace.StatusCode.ERROR, str(exc))
            message = str(exc) if code != grpc.StatusCode.INTERNAL else f"inference failed: {exc}"
            await context.abort(code, message)
        finally:
            if record.submitted is not None:
                if record.finish_reason is None:
                    runtime.engine.abort(record.submitted)
                self.metrics.request_ended()
            self._finish(span, record)

    async def _prepare(self, request: pb.GenerateRequest, runtime, span: trace.Span):
        """Validate, tokenize (under a `tokenize` span) and build the engine request."""
        convert.check_request_fields(request)
        span_ctx = trace.set_span_in_context(span)
        with self.tracer.start_as_current_span("tokenize", context=span_ctx) as tok_span:
            prompt_ids = await asyncio.to_thread(convert.prompt_ids_for, request, runtime.model.tokenizer)
            tok_span.set_attribute("lumen.prompt_tokens", len(prompt_ids))
        gen = convert.generation_request(request, prompt_ids, runtime.model.config.context_length,
                                         self.default_max_new_tokens)
        gen.trace_context = span_ctx
        span.set_attribute("lumen.request_id", gen.request_id)
        span.set_attribute("lumen.model", runtime.name)
        return gen

    def _finish(self, span: trace.Span, record: "_RequestRecord") -> None:
        duration = time.monotonic() - record.started
        reason = record.finish_reason.value if record.finish_reason else "none"
        span.set_attribute("lumen.finish_reason", reason)
        span.set_attribute("lumen.usage.prompt_tokens", record.prompt_tokens)
        span.set_attribute("lumen.usage.completion_tokens", record.completion_tokens)
        span.end()
        if record.ttft is not None:
            self.metrics.record_first_token(record.ttft, record.model)
        self.metrics.record_finished(model=record.model, finish_reason=reason, status=record.status,
                                     prompt_tokens=record.prompt_tokens,
                                     completion_tokens=record.completion_tokens,
                                     duration_s=duration, ttft_s=record.ttft)

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        try:
            runtime = self.registry.get(request.model)
        except ModelNotFoundError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        tokenizer = runtime.model.tokenizer
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        ids = await asyncio.to_thread(tokenizer.encode, request.text, add_special)
        return pb.TokenizeResponse(token_ids=ids, pieces=[tokenizer.piece(i) for i in ids])

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        models = []
        for rt in self.registry:
            m, cfg = rt.model, rt.model.config
            models.append(pb.ModelInfo(
                name=rt.name, architecture=cfg.architecture, file_type=m.file_type,
                parameter_count=m.parameter_count, context_length=cfg.context_length,
                vocab_size=cfg.vocab_size, path=str(m.path), is_default=rt is self.registry.default))
        return pb.ListModelsResponse(models=models)
