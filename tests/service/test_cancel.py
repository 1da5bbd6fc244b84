"""A cancelled or expired stream stops its work within one step and frees its state."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from lumen.v1 import inference_pb2 as pb
from tests.service.conftest import StepGate, assert_still_serving


def long_request() -> pb.GenerateRequest:
    r = pb.GenerateRequest(prompt="Once upon a time")
    r.sampling.temperature = 0
    r.stopping.max_new_tokens = 500
    r.stopping.ignore_eos = True
    return r


async def test_cancel_stops_generation(stories):
    gate = StepGate(stories.llm, free_steps=3)
    call = stories.stub.Generate(long_request())
    await call.read()
    assert await asyncio.to_thread(gate.blocked.wait, 30)
    call.cancel()
    # The handler's cancellation reaches the engine while it is held; then let it run.
    await asyncio.to_thread(_wait_for_abort_queued, stories)
    gate.release.set()
    assert await asyncio.to_thread(stories.runtime.engine.wait_idle, 30)
    assert stories.runtime.engine.num_active == 0 and stories.llm.num_active == 0
    computed = stories.llm.tokens_computed
    # Prompt + at most the 3 free steps and the one in flight when the cancel arrived: nowhere near 500.
    assert computed <= 5 + 4
    await assert_still_serving(stories)
    assert stories.llm.tokens_computed == computed + 5 + 2  # only the new request's tokens


async def test_deadline_stops_generation(stories):
    gate = StepGate(stories.llm, free_steps=2)
    call = stories.stub.Generate(long_request(), timeout=1.0)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.to_thread(_wait_for_abort_queued, stories)
    gate.release.set()
    assert await asyncio.to_thread(stories.runtime.engine.wait_idle, 30)
    assert stories.llm.num_active == 0 and stories.llm.tokens_computed < 20


def _wait_for_abort_queued(harness) -> None:
    assert harness.runtime.engine.wait_until(lambda e: e._aborts, timeout=30)

