"""The `lumen.v1.Inference` gRPC service.

Each Generate opens a SERVER span (continuing the client's W3C traceparent),
tokenizes under a `tokenize` child span, submits to the model's engine (which
adds `prefill` and `decode` spans) and streams every output as it arrives. A
client that cancels or whose deadline passes aborts its request in the engine.
"""
from __future__ import annotations

import asyncio
import time

import grpc
from opentelemetry import trace

from engine.errors import EngineStoppedError, InvalidRequestError, ModelNotFoundError
from engine.request import FinishReason
from lumen.v1 import inference_pb2 as pb
from lumen.v1 import inference_pb2_grpc as pb_grpc
from service import convert
from service.registry import ModelRegistry
from telemetry import EngineMetrics, Telemetry, extract_context

STATUS_FOR = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    EngineStoppedError: grpc.StatusCode.UNAVAILABLE,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    for kind, code in STATUS_FOR.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, registry: ModelRegistry, telemetry: Telemetry, default_max_new_tokens: int) -> None:
        self.registry = registry
        self.tracer = telemetry.tracer
        self.metrics = EngineMetrics(telemetry.meter)
        self.default_max_new_tokens = default_max_new_tokens

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        parent = extract_context(context.invocation_metadata() or ())
        span = self.tracer.start_span("lumen.v1.Inference/Generate", context=parent, kind=trace.SpanKind.SERVER)
        span_ctx = trace.set_span_in_context(span)
        trace_id = format(span.get_span_context().trace_id, "032x")
        submitted, finished, runtime = None, False, None
        started = time.monotonic()
        try:
            convert.check_request_fields(request)
            runtime = self.registry.get(request.model)
            tokenizer = runtime.model.tokenizer
            with self.tracer.start_as_current_span("tokenize", context=span_ctx) as tok_span:
                prompt_ids = await asyncio.to_thread(convert.prompt_ids_for, request, tokenizer)
                tok_span.set_attribute("lumen.prompt_tokens", len(prompt_ids))
            gen = convert.generation_request(request, prompt_ids, runtime.model.config.context_length,
                                             self.default_max_new_tokens)
            gen.trace_context = span_ctx
            span.set_attribute("lumen.request_id", gen.request_id)
            span.set_attribute("lumen.model", runtime.name)
            stream = runtime.engine.submit(gen)
            submitted = gen.request_id
            self.metrics.request_started()
            async for out in stream:
                if out.time_to_first_token is not None:
                    self.metrics.record_first_token(out.time_to_first_token, runtime.name)
                if out.finish_reason is FinishReason.ABORTED:
                    await context.abort(grpc.StatusCode.CANCELLED, "the request was aborted by the server")
                if out.finished:
                    finished = True
                    self._record_finish(span, runtime.name, out, time.monotonic() - started)
                yield convert.response_from_output(out, tokenizer, trace_id)
        except (InvalidRequestError, ModelNotFoundError, EngineStoppedError) as exc:
            span.set_status(trace.StatusCode.ERROR, str(exc))
            await context.abort(status_for(exc), str(exc))
        except ValueError as exc:  # e.g. a duplicate request id
            span.set_status(trace.StatusCode.ERROR, str(exc))
            await context.abort(grpc.StatusCode.ALREADY_EXISTS if "already running" in str(exc)
                                else grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except asyncio.CancelledError:
            span.add_event("cancelled by client")
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(trace.StatusCode.ERROR, str(exc))
            await context.abort(grpc.StatusCode.INTERNAL, f"inference failed: {exc}")
        finally:
            if submitted is not None and not finished:
                runtime.engine.abort(submitted)
                self.metrics.request_ended()
            span.end()

    def _record_finish(self, span: trace.Span, model: str, out, duration: float) -> None:
        self.metrics.request_ended()
        reason = out.finish_reason.value if isinstance(out.finish_reason, FinishReason) else "unknown"
        span.set_attribute("lumen.finish_reason", reason)
        span.set_attribute("lumen.usage.prompt_tokens", out.prompt_tokens)
        span.set_attribute("lumen.usage.completion_tokens", out.completion_tokens)
        self.metrics.record_finished(model=model, finish_reason=reason, status="OK",
                                     prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                                     duration_s=duration, ttft_s=None)

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
