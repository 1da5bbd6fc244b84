"""Runs an `LLMEngine` on its own thread and streams each request's outputs to asyncio.

The event loop only enqueues requests and drains one stream per request; the model never
runs on the event-loop thread, and a slow reader never stalls a step. Each stream queues the
outputs its reader has not taken yet, one per step. When they carry `stream_buffer_tokens`
tokens or more (each top-logprob alternative counts as a token too), the engine holds the
request (computes nothing for it; its slot goes to a waiting request if there is one) until
the reader catches up: back-pressure per stream, so a client that stops reading costs a
bounded amount of memory, never an unbounded queue.

A request counts against capacity from `submit` until its consumer `release`s it, so a
finished request whose output is still undelivered still counts. A consumer that stops
early `drop`s its request first, which returns once the engine has let go of it.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable, TypeVar

from lumen.engine.core.llm_engine import LLMEngine
from lumen.engine.core.request import FinishReason, GenerationRequest, RequestOutput
from lumen.engine.errors import CapacityError, DuplicateRequestError, EngineStoppedError, quoted

log = logging.getLogger(__name__)

DEFAULT_STREAM_BUFFER_TOKENS = 256
T = TypeVar("T")


def output_weight(out: RequestOutput) -> int:
    """What an output costs to hold: its tokens, and each logprob's alternatives."""
    return (len(out.token_ids) + sum(len(lp.top) for lp in out.logprobs)
            + sum(1 + len(lp.top) for lp in out.prompt_logprobs))


class RequestStream:
    """The outputs of one request, in order; iteration ends after the finished output.

    The engine thread `put`s outputs; the asyncio consumer iterates."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, on_drained: Callable[[], None],
                 buffer_tokens: int) -> None:
        self.request_id = request_id
        self.buffer_tokens = buffer_tokens
        self._loop = loop
        self._on_drained = on_drained   # wakes the engine thread when a held stream is drained
        self._lock = threading.Lock()
        self._pending: deque[tuple[RequestOutput, int]] = deque()   # (output, its output_weight)
        self._pending_weight = 0        # the sum of the weights in _pending
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self.finished = False           # the engine is done with it (finished, failed or aborted)

    @property
    def held(self) -> bool:
        """The engine must not compute for this request until its consumer takes what is pending."""
        return not self.finished and self._pending_weight >= self.buffer_tokens

    def put(self, item: RequestOutput | BaseException) -> None:
        """Engine thread: add an output (or an error that ends the stream)."""
        with self._lock:
            was_empty = not self._pending and self._error is None
            if isinstance(item, BaseException):
                self._error, self.finished = item, True
            else:
                weight = output_weight(item)
                self._pending.append((item, weight))
                self._pending_weight += weight
                self.finished = self.finished or item.finished or item.error is not None
        if was_empty:
            try:
                self._loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
                pass

    def _take(self) -> RequestOutput | BaseException | None:
        with self._lock:
            held = self.held
            if self._pending:
                item, weight = self._pending.popleft()
                self._pending_weight -= weight
            else:
                item, self._error = self._error, None
            if item is None:
                self._ready.clear()
            drained = held and not self.held
        if drained:
            self._on_drained()
        return item

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while True:
            item = self._take()
            if item is None:
                await self._ready.wait()
                continue
            if isinstance(item, BaseException):
                raise item
            if item.error is not None:
                raise item.error
            yield item
            if item.finished:
                return


class AsyncEngine:
    def __init__(self, engine: LLMEngine, stream_buffer_tokens: int = DEFAULT_STREAM_BUFFER_TOKENS) -> None:
        if stream_buffer_tokens < 1:
            raise ValueError(f"stream_buffer_tokens must be >= 1, got {stream_buffer_tokens}")
        self.engine = engine
        self.stream_buffer_tokens = stream_buffer_tokens
        limits = engine.config.scheduler
        self.capacity = limits.max_running + limits.max_waiting  # requests held at once, queued or running
        self._cond = threading.Condition()
        self._new: deque[tuple[GenerationRequest, RequestStream]] = deque()
        self._aborts: deque[tuple[str, Callable[[], None]]] = deque()
        self._calls: deque[tuple[Callable[[LLMEngine], Any], Future]] = deque()
        self._streams: dict[str, RequestStream] = {}
        self._stopped = False
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="lumen-engine", daemon=True)
        self._thread.start()

    @property
    def num_active(self) -> int:
        """Requests submitted and not yet released by their consumer (delivered or abandoned)."""
        with self._cond:
            return len(self._streams)

    def num_held(self) -> int:
        """Requests the engine is holding because their client has not read their output."""
        with self._cond:
            return sum(stream.held for stream in self._streams.values())

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Validate and enqueue; raises InvalidRequestError at once for bad requests."""
        self.engine.validate(request)
        stream = RequestStream(request.request_id, asyncio.get_running_loop(), self._wake, self.stream_buffer_tokens)
        with self._cond:
            if self._stopped:
                raise EngineStoppedError("the engine is shutting down; retry on another replica")
            if len(self._streams) >= self.capacity:
                raise CapacityError(f"the server is at capacity ({self.capacity} requests running or queued); "
                                    "retry later or send fewer concurrent requests")
            if request.request_id in self._streams:
                raise DuplicateRequestError(f"request id {quoted(request.request_id)} is already running; "
                                            "use a unique request_id or leave it empty")
            self._streams[request.request_id] = stream
            self._new.append((request, stream))
            self._idle.clear()
            self._cond.notify_all()
        return stream

    async def drop(self, stream: RequestStream, timeout: float = 10.0) -> None:
        """Abort `stream`'s request if the engine still runs it, and return once the engine has
        dropped it (so its spans have ended); at once if it is finished."""
        if stream.finished:
            return
        loop = asyncio.get_running_loop()
        dropped = loop.create_future()

        def done() -> None:
            try:
                loop.call_soon_threadsafe(lambda: dropped.done() or dropped.set_result(None))
            except RuntimeError:  # the loop is closed
                pass

        if self._queue_abort(stream.request_id, done):
            try:
                await asyncio.wait_for(asyncio.shield(dropped), timeout)
            except asyncio.TimeoutError:
                log.warning("request %s: the engine did not drop it within %.0f s", quoted(stream.request_id),
                            timeout)

    def release(self, stream: RequestStream) -> None:
        """The consumer is done with `stream` (after `drop` if it ended early): it no longer
        counts against capacity."""
        with self._cond:
            if self._streams.get(stream.request_id) is stream:
                del self._streams[stream.request_id]
            if not self._streams:
                self._idle.set()
            self._cond.notify_all()

    def _queue_abort(self, request_id: str, done: Callable[[], None]) -> bool:
        with self._cond:
            if self._stopped or not self._thread.is_alive() or request_id not in self._streams:
                return False
            self._aborts.append((request_id, done))
            self._cond.notify_all()
            return True

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """fn(engine) on the engine's thread between two steps (loading or unloading a LoRA
        adapter), its result or its exception."""
        future: Future = Future()
        with self._cond:
            if self._stopped or not self._thread.is_alive():
                raise EngineStoppedError("the engine is shutting down; retry on another replica")
            self._calls.append((fn, future))
            self._cond.notify_all()
        return await asyncio.wrap_future(future)

    def wait_until(self, predicate: Callable[["AsyncEngine"], bool], timeout: float | None = None) -> bool:
        """Block until predicate(self) holds; re-checked whenever requests arrive, finish, abort,
        or a held stream is drained."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no request is active (tests and graceful shutdown use it)."""
        return self._idle.wait(timeout)

    def shutdown(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _held(self) -> set[str]:
        return {rid for rid, stream in self._streams.items() if stream.held}

    def _run(self) -> None:
        while True:
            with self._cond:
                # Held requests are not work: with nothing else to do, sleep until a reader drains one.
                while True:
                    held = self._held()
                    if (self._stopped or self._new or self._aborts or self._calls
                            or self.engine.num_active > len(held)):
                        break
                    self._cond.wait()
                if self._stopped:
                    self._fail_remaining(EngineStoppedError("the server is shutting down"))
                    return
                new, self._new = list(self._new), deque()
                aborts, self._aborts = list(self._aborts), deque()
                calls, self._calls = list(self._calls), deque()
            for fn, future in calls:
                try:
                    future.set_result(fn(self.engine))
                except Exception as exc:
                    future.set_exception(exc)
            self._apply(new, aborts)
            try:
                outputs = self.engine.step(held)
            except Exception as exc:  # the model failed: every request in flight gets the error
                log.exception("engine step failed")
                outputs = self.engine.fail_all(exc)
            self._deliver(outputs)

    def _apply(self, new: list[tuple[GenerationRequest, RequestStream]],
               aborts: list[tuple[str, Callable[[], None]]]) -> None:
        outputs = []
        for request, stream in new:
            try:
                self.engine.add_request(request)
            except Exception as exc:
                outputs.append(RequestOutput(request.request_id, finish_reason=FinishReason.ERROR, error=exc))
        for request_id, _ in aborts:
            out = self.engine.abort_request(request_id)
            if out is not None:
                outputs.append(out)
        self._deliver(outputs)
        for _, done in aborts:
            done()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        with self._cond:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out.error if out.error is not None else out)
            self._cond.notify_all()

    def _fail_remaining(self, error: BaseException) -> None:
        """Shutdown: end the engine's requests (their spans), then every unfinished stream, queued
        submissions included (every submitted stream is in _streams)."""
        self.engine.fail_all(error)
        for stream in self._streams.values():
            if not stream.finished:
                stream.put(error)
        for _, done in self._aborts:
            done()
        for _, future in self._calls:
            future.set_exception(error)
