"""The `lumen.v1.Inference` gRPC service.

Each Generate (and Chat, whose conversation is first rendered with a chat template: service.chat)
opens a SERVER span (continuing the client's W3C traceparent) and a
`text_completion {model}` span under it (service.request_trace), checks the request against
the server's limits, tokenizes under a `tokenize` child span, submits to the model's engine
(which adds `queue`, `prefill`, `decode`, `draft` and `verify` spans) and writes every output
as it arrives. A client that cancels, whose deadline passes, or that stops reading ends its
request in the engine, and the request's spans end only after the engine's have.
"""
from __future__ import annotations

import asyncio

import grpc

from lumen.engine.chat.prompt import chat_prompt_ids
from lumen.engine.core.async_engine import RequestStream
from lumen.engine.core.request import FinishReason
from lumen.engine.errors import (
    CapacityError,
    DuplicateRequestError,
    EngineStoppedError,
    FailedPreconditionError,
    InvalidRequestError,
    LumenError,
    ModelNotFoundError,
)
from lumen.engine.lora.adapter import AdapterLoadError
from lumen.engine.lora.registry import AdapterExistsError, AdapterNotFoundError, LoadedAdapter, check_name
from lumen.service import chat, convert
from lumen.service.handlers import MalformedRequest
from lumen.service.limits import RequestLimits
from lumen.service.registry import ModelRegistry, ModelRuntime
from lumen.service.request_trace import RequestTrace
from lumen.telemetry import EngineMetrics, Telemetry, extract_context
from lumen.v1 import inference_pb2 as pb
from lumen.v1 import inference_pb2_grpc as pb_grpc


class StreamStalledError(LumenError):
    """The client accepted no message for the stream write timeout (gRPC RESOURCE_EXHAUSTED)."""


class CallEnded(Exception):
    """A write failed because the call is over: its client went away or its deadline passed."""


class WriteWatch:
    """Cancels a handler whose client takes no message for `timeout_s` (0: never).

    A client that stops reading blocks its handler's write once gRPC's flow-control window is
    full; the engine then holds its request (async_engine), and this ends the call for good."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.fired = False
        self._task = asyncio.current_task()

    def _fire(self) -> None:
        self.fired = True
        self._task.cancel()

    async def write(self, context: grpc.aio.ServicerContext, message) -> None:
        timer = asyncio.get_running_loop().call_later(self.timeout_s, self._fire) if self.timeout_s else None
        try:
            await context.write(message)
        except Exception as exc:  # grpc's ExecuteBatchError: the call ended under the write
            raise CallEnded(f"the call ended during a write ({type(exc).__name__})") from exc
        finally:
            if timer is not None:
                timer.cancel()


STATUS_FOR = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    EngineStoppedError: grpc.StatusCode.UNAVAILABLE,
    DuplicateRequestError: grpc.StatusCode.ALREADY_EXISTS,
    CapacityError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StreamStalledError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    AdapterNotFoundError: grpc.StatusCode.NOT_FOUND,
    AdapterExistsError: grpc.StatusCode.ALREADY_EXISTS,
    AdapterLoadError: grpc.StatusCode.INVALID_ARGUMENT,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    for kind, code in STATUS_FOR.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, registry: ModelRegistry, telemetry: Telemetry, default_max_new_tokens: int,
                 capture_content: bool = False, limits: RequestLimits | None = None) -> None:
        self.registry = registry
        self.tracer = telemetry.tracer
        self.metrics = EngineMetrics(telemetry.meter)
        self.default_max_new_tokens = default_max_new_tokens
        self.capture_content = capture_content
        self.limits = limits or RequestLimits()
        self.templates = chat.ChatTemplates()
        self.stopping = False  # the server is shutting down: what ends now ends UNAVAILABLE
        self._ending: set[asyncio.Task] = set()

    async def Generate(self, request: pb.GenerateRequest | MalformedRequest, context: grpc.aio.ServicerContext) -> None:
        await self._serve(request, context, self._prepare, chat=False)

    async def Chat(self, request: pb.ChatRequest | MalformedRequest, context: grpc.aio.ServicerContext) -> None:
        await self._serve(request, context, self._prepare_chat, chat=True)

    async def _serve(self, request, context: grpc.aio.ServicerContext, prepare, chat: bool) -> None:
        """Run one Generate or Chat: `prepare` turns the request into the engine's; the rest is shared."""
        rt = RequestTrace(self.tracer, self.metrics, extract_context(context.invocation_metadata() or ()),
                          context.peer() or "", self.capture_content, chat=chat)
        runtime, stream, status, error = None, None, "UNKNOWN", None
        watch = WriteWatch(self.limits.stream_write_timeout_s)
        try:
            if isinstance(request, MalformedRequest):
                raise InvalidRequestError("request", request.message())
            runtime = self.registry.get(request.model)
            gen = await prepare(request, runtime, rt)
            stream = runtime.engine.submit(gen)
            rt.admitted(gen)
            self.metrics.request_started()
            await self._stream(stream, runtime, rt, context, watch)
            status = "OK"
        except (asyncio.CancelledError, CallEnded) as exc:
            if watch.fired:  # we cancelled it: its client took nothing for the write timeout
                status, error = "RESOURCE_EXHAUSTED", StreamStalledError(
                    f"the client accepted no message for {self.limits.stream_write_timeout_s:g} s; the server "
                    "cancelled the stream (--stream-write-timeout)")
                context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
                context.set_details(str(error))
            else:
                status = self._cancelled_status(context)
            if isinstance(exc, asyncio.CancelledError):
                raise
        except Exception as exc:
            code = status_for(exc)
            status, error = code.name, exc
            await context.abort(code, str(exc) if code != grpc.StatusCode.INTERNAL else f"inference failed: {exc}")
        finally:
            # In a task of its own: gRPC may cancel the handler again while it waits for the engine,
            # and the request must still be recorded and released.
            ending = asyncio.ensure_future(self._end(runtime, stream, rt, status, error))
            self._ending.add(ending)  # held until done: a task nobody references may be collected
            ending.add_done_callback(self._ending.discard)
            await asyncio.shield(ending)

    async def _end(self, runtime: ModelRuntime | None, stream: RequestStream | None, rt: RequestTrace,
                   status: str, error: BaseException | None) -> None:
        """Drop the request from the engine (so the engine's spans end first), record it, and
        stop counting it against capacity."""
        try:
            if stream is not None:
                await runtime.engine.drop(stream)
        finally:
            rt.finish(status, error)
            if stream is not None:
                runtime.engine.release(stream)
                self.metrics.request_ended()

    @staticmethod
    async def _stream(stream: RequestStream, runtime: ModelRuntime, rt: RequestTrace,
                      context: grpc.aio.ServicerContext, watch: WriteWatch) -> None:
        """Write each output as it comes, one message per engine step."""
        async for out in stream:
            if out.finish_reason is FinishReason.ABORTED:
                raise EngineStoppedError("the request was aborted by the server")
            rt.update(out)
            await watch.write(context, convert.response_from_output(out, runtime.model.tokenizer, rt.trace_id))

    def _cancelled_status(self, context: grpc.aio.ServicerContext) -> str:
        """Why a call was cancelled under us: shutdown, its deadline, or its client."""
        if self.stopping:
            return "UNAVAILABLE"
        remaining = context.time_remaining()
        # A deadline's cancellation arrives as it passes; allow the clock's granularity.
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0.01 else "CANCELLED"

    async def _prepare(self, request: pb.GenerateRequest, runtime: ModelRuntime, rt: RequestTrace):
        """Check limits, tokenize (under a `tokenize` span) and build the engine request."""
        span_ctx = rt.start_completion(runtime.name)
        tokenizer = runtime.model.tokenizer
        convert.check_request_fields(request)
        self.limits.check_request_id(request.request_id)
        self.limits.check_stops(list(request.stopping.stop))
        self.limits.check_text("prompt", request.prompt, runtime.max_prompt_bytes)
        with self.tracer.start_as_current_span("tokenize", context=span_ctx) as tok_span:
            prompt_ids = await asyncio.to_thread(convert.prompt_ids_for, request, tokenizer)
            tok_span.set_attribute("lumen.prompt_tokens", len(prompt_ids))
        gen = convert.generation_request(request, prompt_ids, runtime.model.config.context_length,
                                         self.default_max_new_tokens)
        gen.trace_context = span_ctx
        prompt_text = (request.prompt or tokenizer.decode(prompt_ids)) if self.capture_content else ""
        rt.request_started(gen, prompt_text)
        return gen

    async def _prepare_chat(self, request: pb.ChatRequest, runtime: ModelRuntime, rt: RequestTrace):
        """Check the conversation, render it with the chat template and tokenize it (under a
        `tokenize` span), and build the engine request."""
        span_ctx = rt.start_completion(runtime.name)
        messages = chat.check_messages(request, self.limits, runtime)
        self.limits.check_request_id(request.request_id)
        self.limits.check_stops(list(request.stopping.stop))
        add_prompt = request.add_generation_prompt if request.HasField("add_generation_prompt") else True

        def render() -> list[int]:
            template = self.templates.get(runtime, request.chat_template)
            return chat_prompt_ids(runtime.model.tokenizer, template, messages, add_prompt)

        with self.tracer.start_as_current_span("tokenize", context=span_ctx) as tok_span:
            prompt_ids = await asyncio.to_thread(render)
            tok_span.set_attributes({"lumen.prompt_tokens": len(prompt_ids), "lumen.chat.messages": len(messages),
                                     "lumen.chat.request_template": bool(request.chat_template)})
        gen = convert.generation_request(request, prompt_ids, runtime.model.config.context_length,
                                         self.default_max_new_tokens)
        gen.trace_context = span_ctx
        rt.request_started(gen, "", messages)
        return gen

    async def Tokenize(self, request: pb.TokenizeRequest | MalformedRequest,
                       context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        try:
            if isinstance(request, MalformedRequest):
                raise InvalidRequestError("request", request.message())
            runtime = self.registry.get(request.model)
            self.limits.check_text("text", request.text)
            tokenizer = runtime.model.tokenizer
            add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            ids = await asyncio.to_thread(tokenizer.encode, request.text, add_special, request.parse_special)
            reply = pb.TokenizeResponse(token_ids=ids, pieces=[tokenizer.piece(i) for i in ids])
            if (size := reply.ByteSize()) > self.limits.max_reply_bytes:
                raise InvalidRequestError("text", f"gives {len(ids)} tokens, a {size}-byte reply over the "
                                                  f"{self.limits.max_reply_bytes}-byte limit of a default gRPC "
                                                  "client; tokenize shorter text")
            return reply
        except LumenError as exc:
            await context.abort(status_for(exc), str(exc))

    async def ListModels(self, request: pb.ListModelsRequest | MalformedRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {request.message()}")
        models = []
        for rt in self.registry:
            m, cfg = rt.model, rt.model.config
            # The file's name only: an anonymous client has no business with the server's paths.
            models.append(pb.ModelInfo(
                name=rt.name, architecture=cfg.architecture, file_type=m.file_type,
                parameter_count=m.parameter_count, context_length=cfg.context_length,
                vocab_size=cfg.vocab_size, path=m.path.name, is_default=rt is self.registry.default,
                has_chat_template=m.chat_template is not None, device=rt.placement.device_name,
                kernels=rt.placement.kernels, dtype=rt.placement.dtype_name,
                adapters=[adapter_info(rt.name, a) for a in rt.engine.engine.lora.adapters()]))
        return pb.ListModelsResponse(models=models)

    async def LoadAdapter(self, request: pb.LoadAdapterRequest | MalformedRequest,
                          context: grpc.aio.ServicerContext) -> pb.AdapterInfo:
        """Read the adapter off the engine's thread, then add it there between two steps."""
        try:
            runtime = self._adapter_call(request)
            if not request.path:
                raise InvalidRequestError("path", "is empty: give a GGUF LoRA adapter file or a PEFT directory "
                                                  "on the server")
            check_name(request.name)
            adapter = await asyncio.to_thread(runtime.engine.engine.lora.read, request.path)
            loaded = await runtime.engine.call(lambda engine: engine.load_adapter(request.name, adapter))
            return adapter_info(runtime.name, loaded)
        except LumenError as exc:
            await context.abort(status_for(exc), str(exc))

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest | MalformedRequest,
                            context: grpc.aio.ServicerContext) -> pb.AdapterInfo:
        try:
            runtime = self._adapter_call(request)
            loaded = await runtime.engine.call(lambda engine: engine.unload_adapter(request.name))
            return adapter_info(runtime.name, loaded)
        except LumenError as exc:
            await context.abort(status_for(exc), str(exc))

    async def ListAdapters(self, request: pb.ListAdaptersRequest | MalformedRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListAdaptersResponse:
        try:
            runtime = self._adapter_call(request)
            return pb.ListAdaptersResponse(adapters=[adapter_info(runtime.name, a)
                                                     for a in runtime.engine.engine.lora.adapters()])
        except LumenError as exc:
            await context.abort(status_for(exc), str(exc))

    def _adapter_call(self, request) -> ModelRuntime:
        if isinstance(request, MalformedRequest):
            raise InvalidRequestError("request", request.message())
        return self.registry.get(request.model)


def adapter_info(model: str, a: LoadedAdapter) -> pb.AdapterInfo:
    # The file's name only, as ListModels gives: other clients have no business with the server's paths.
    return pb.AdapterInfo(name=a.name, model=model, path=a.path.name, format=a.format, rank=a.rank, alpha=a.alpha,
                          targets=a.targets, active_requests=a.users, size_bytes=a.weights.nbytes)
