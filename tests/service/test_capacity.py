"""Past the waiting queue, Generate fails fast with RESOURCE_EXHAUSTED while admitted requests finish."""
from __future__ import annotations

import asyncio

import grpc
import pytest
import pytest_asyncio

from lumen.engine.core.llm_engine import EngineConfig
from lumen.engine.core.scheduler import SchedulerConfig
from lumen.v1 import inference_pb2 as pb
from tests.service.conftest import StepGate, assert_still_serving, start_harness


@pytest_asyncio.fixture
async def small(stories_model):
    config = EngineConfig(scheduler=SchedulerConfig(max_running=2, max_waiting=2))
    harness = await start_harness(stories_model, config=config)
    yield harness
    await harness.close()


def greedy(prompt: str, n: int = 20) -> pb.GenerateRequest:
    r = pb.GenerateRequest(prompt=prompt)
    r.sampling.temperature = 0
    r.stopping.max_new_tokens = n
    r.stopping.ignore_eos = True
    return r


async def texts(calls) -> list[str]:
    async def one(call):
        return "".join([m.text async for m in call])
    return await asyncio.gather(*(one(c) for c in calls))


async def test_over_capacity_is_resource_exhausted_and_admitted_finish(small):
    prompts = ["Once upon a time", "The dog", "Lily went", "One day"]
    solo = [(await texts([small.stub.Generate(greedy(p))]))[0] for p in prompts]
    gate = StepGate(small.llm, free_steps=0)  # hold the engine: nothing finishes while we fill it
    try:
        calls = [small.stub.Generate(greedy(p)) for p in prompts]
        # 2 running + 2 waiting fill the server: wait (on the engine's condition) until all are in.
        assert await asyncio.to_thread(small.runtime.engine.wait_until, lambda e: e.num_active == 4, 30)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in small.stub.Generate(greedy("Too many"), timeout=30):
                pass
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "capacity" in err.value.details()
    finally:
        gate.release.set()
    assert await texts(calls) == solo
    await assert_still_serving(small)
