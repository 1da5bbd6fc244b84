"""The `lumen.v1.Inference` gRPC service.

Each Generate opens a SERVER span (continuing the client's W3C traceparent) and a
`text_completion {model}` span under it (service.request_trace), tokenizes under a
`tokenize` child span, submits to the model's engine (which adds `queue`, `prefill`,
`decode`, `draft` and `verify` spans) and streams every output as it arrives. A
client that cancels or whose deadline passes aborts its request in the engine.
"""
from __future__ import annotations

import asyncio

import grpc

from lumen.engine.core.request import FinishReason
from lumen.engine.errors import (
    CapacityError,
    DuplicateRequestError,
    EngineStoppedError,
    InvalidRequestError,
    ModelNotFoundError,
)
from lumen.service import convert
from lumen.service.registry import ModelRegistry
from lumen.service.request_trace import RequestTrace
from lumen.telemetry import EngineMetrics, Telemetry, extract_context
from lumen.v1 import inference_pb2 as pb
from lumen.v1 import inference_pb2_grpc as pb_grpc

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


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, registry: ModelRegistry, telemetry: Telemetry, default_max_new_tokens: int,
                 capture_content: bool = False) -> None:
        self.registry = registry
        self.tracer = telemetry.tracer
        self.metrics = EngineMetrics(telemetry.meter)
        self.default_max_new_tokens = default_max_new_tokens
        self.capture_content = capture_content

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        rt = RequestTrace(self.tracer, self.metrics, extract_context(context.invocation_metadata() or ()),
                          context.peer() or "", self.capture_content)
        runtime, submitted, status, error = None, None, "UNKNOWN", None
        try:
            runtime = self.registry.get(request.model)
            gen = await self._prepare(request, runtime, rt)
            stream = runtime.engine.submit(gen)
            submitted = gen.request_id
            self.metrics.request_started()
            async for out in stream:
                if out.finish_reason is FinishReason.ABORTED:
                    raise EngineStoppedError("the request was aborted by the server")
                rt.update(out)
                yield convert.response_from_output(out, runtime.model.tokenizer, rt.trace_id)
            status = "OK"
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            status = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            raise
        except Exception as exc:
            code = status_for(exc)
            status, error = code.name, exc
            message = str(exc) if code != grpc.StatusCode.INTERNAL else f"inference failed: {exc}"
            await context.abort(code, message)
        finally:
            if submitted is not None:
                if rt.last is None or not rt.last.finished:
                    runtime.engine.abort(submitted)
                self.metrics.request_ended()
            rt.finish(status, error)

    async def _prepare(self, request: pb.GenerateRequest, runtime, rt: RequestTrace):
        """Validate, tokenize (under a `tokenize` span) and build the engine request."""
        span_ctx = rt.start_completion(runtime.name)
        convert.check_request_fields(request)
        with self.tracer.start_as_current_span("tokenize", context=span_ctx) as tok_span:
            prompt_ids = await asyncio.to_thread(convert.prompt_ids_for, request, runtime.model.tokenizer)
            tok_span.set_attribute("lumen.prompt_tokens", len(prompt_ids))
        gen = convert.generation_request(request, prompt_ids, runtime.model.config.context_length,
                                         self.default_max_new_tokens)
        gen.trace_context = span_ctx
        prompt_text = ""
        if self.capture_content:
            prompt_text = request.prompt or runtime.model.tokenizer.decode(prompt_ids)
        rt.request_started(gen, prompt_text)
        return gen

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
