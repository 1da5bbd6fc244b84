"""Runs an `LLMEngine` on its own thread and streams each request's outputs to asyncio.

The event loop only enqueues requests and drains one stream per request; the
model never runs on the event-loop thread, and a slow reader never stalls a step
(each stream is an unbounded queue of small deltas, bounded by max_new_tokens).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import AsyncIterator, Callable

from lumen.engine.core.llm_engine import LLMEngine
from lumen.engine.core.request import FinishReason, GenerationRequest, RequestOutput
from lumen.engine.errors import CapacityError, DuplicateRequestError, EngineStoppedError

log = logging.getLogger(__name__)


class RequestStream:
    """The outputs of one request, in order; iteration ends after the finished output."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put_threadsafe(self, item: RequestOutput | BaseException) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the client's event loop is closed: nobody is listening any more
            pass

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        limits = engine.config.scheduler
        self.capacity = limits.max_running + limits.max_waiting  # requests held at once, queued or running
        self._cond = threading.Condition()
        self._new: deque[tuple[GenerationRequest, RequestStream]] = deque()
        self._aborts: deque[str] = deque()
        self._streams: dict[str, RequestStream] = {}
        self._stopped = False
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="lumen-engine", daemon=True)
        self._thread.start()

    @property
    def num_active(self) -> int:
        """Requests submitted and not yet finished or aborted."""
        with self._cond:
            return len(self._streams)

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Validate and enqueue; raises InvalidRequestError at once for bad requests."""
        self.engine.validate(request)
        stream = RequestStream(request.request_id, asyncio.get_running_loop())
        with self._cond:
            if self._stopped:
                raise EngineStoppedError("the engine is shutting down; retry on another replica")
            if len(self._streams) >= self.capacity:
                raise CapacityError(f"the server is at capacity ({self.capacity} requests running or queued); "
                                    "retry later or send fewer concurrent requests")
            if request.request_id in self._streams:
                raise DuplicateRequestError(f"request id {request.request_id!r} is already running; "
                                            "use a unique request_id or leave it empty")
            self._streams[request.request_id] = stream
            self._new.append((request, stream))
            self._idle.clear()
            self._cond.notify_all()
        return stream

    def abort(self, request_id: str) -> None:
        """Stop a request; takes effect before the engine's next step."""
        with self._cond:
            if request_id in self._streams:
                self._aborts.append(request_id)
                self._cond.notify_all()

    def wait_until(self, predicate: Callable[["AsyncEngine"], bool], timeout: float | None = None) -> bool:
        """Block until predicate(self) holds; re-checked whenever requests arrive, finish or abort."""
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

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopped or self._new or self._aborts or self.engine.has_unfinished()):
                    self._cond.wait()
                if self._stopped:
                    self._fail_remaining(EngineStoppedError("the server is shutting down"))
                    return
                new, self._new = list(self._new), deque()
                aborts, self._aborts = list(self._aborts), deque()
            self._apply(new, aborts)
            try:
                outputs = self.engine.step()
            except Exception as exc:  # the model failed: every request in flight gets the error
                log.exception("engine step failed")
                outputs = self.engine.fail_all(exc)
            self._deliver(outputs)

    def _apply(self, new: list[tuple[GenerationRequest, RequestStream]], aborts: list[str]) -> None:
        outputs = []
        for request, stream in new:
            try:
                self.engine.add_request(request)
            except Exception as exc:
                outputs.append(exc_output(request.request_id, exc))
        for request_id in aborts:
            out = self.engine.abort_request(request_id)
            if out is not None:
                outputs.append(out)
        self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        with self._cond:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                stream.put_threadsafe(out.error if out.error is not None else out)
                if out.finished or out.error is not None:
                    del self._streams[out.request_id]
            if not self._streams:
                self._idle.set()
            self._cond.notify_all()

    def _fail_remaining(self, error: BaseException) -> None:
        for out in self.engine.fail_all(error):
            stream = self._streams.pop(out.request_id, None)
            if stream is not None:
                stream.put_threadsafe(error)
        for request, stream in self._new:
            stream.put_threadsafe(error)
        self._streams.clear()
        self._idle.set()


def exc_output(request_id: str, exc: BaseException) -> RequestOutput:
    return RequestOutput(request_id, finish_reason=FinishReason.ERROR, error=exc)
