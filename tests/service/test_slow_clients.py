"""Clients that read slowly or not at all: bounded server memory, no stalled neighbours, and a
finished request counts against capacity until its output is delivered.

The clients here give their HTTP/2 streams 1 KiB of window and no BDP probing, so a client
that stops reading really stops the server's writes (a default client would take megabytes
into its own buffers first)."""
from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from lumen.engine.core.llm_engine import EngineConfig
from lumen.engine.core.scheduler import SchedulerConfig
from lumen.service.limits import RequestLimits
from lumen.v1 import inference_pb2 as pb
from tests.service.conftest import SLOW_READER, read_rest, start_harness


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def request(tokens: int, top_logprobs: int = 20, prompt: str = "Once upon a time") -> pb.GenerateRequest:
    r = pb.GenerateRequest(prompt=prompt, top_logprobs=top_logprobs)
    r.sampling.temperature = 0
    r.stopping.max_new_tokens, r.stopping.ignore_eos = tokens, True
    return r


def nothing_left_to_compute(engine) -> bool:
    """Every request is finished in the engine or held for its reader."""
    held = getattr(engine, "num_held", lambda: 0)()
    return engine.engine.num_active == 0 or (engine.engine.num_active == held)


async def test_unread_streams_cost_bounded_memory(stories_model):
    """48 streams that never read, 1500 tokens with 20 alternatives each: the old queues grew by
    hundreds of MiB; held streams keep a few hundred tokens' worth each."""
    harness = await start_harness(stories_model, channel_options=SLOW_READER)
    try:
        before = resident_mib()
        calls = [harness.stub.Generate(request(1500)) for _ in range(48)]
        for call in calls:
            await call.initial_metadata()
        engine = harness.runtime.engine
        assert await asyncio.to_thread(engine.wait_until, nothing_left_to_compute, 120)
        grown = resident_mib() - before
        assert engine.num_held() == 48 and harness.llm.num_active == 48
        assert grown < 32, f"the server grew by {grown:.0f} MiB for 48 unread streams"
        for call in calls:
            call.cancel()
        assert await asyncio.to_thread(engine.wait_idle, 30)
    finally:
        await harness.close()


async def test_a_client_that_reads_nothing_is_cut_off(stories_model, caplog):
    limits = RequestLimits(stream_write_timeout_s=0.5)
    harness = await start_harness(stories_model, limits=limits, channel_options=SLOW_READER)
    try:
        with caplog.at_level(logging.INFO, logger="lumen.requests"):
            call = harness.stub.Generate(request(1500))
            await call.initial_metadata()
            assert await asyncio.to_thread(harness.runtime.engine.wait_idle, 30)
        assert harness.llm.num_active == 0
        (record,) = [r for r in caplog.records if r.getMessage() == "generate finished"]
        assert record.status == "RESOURCE_EXHAUSTED"
        call.cancel()
    finally:
        await harness.close()


async def test_an_undelivered_finished_request_still_counts_against_capacity(stories_model):
    config = EngineConfig(scheduler=SchedulerConfig(max_running=1, max_waiting=0))
    harness = await start_harness(stories_model, config=config, stream_buffer_tokens=1 << 30,
                                  channel_options=SLOW_READER)
    try:
        engine = harness.runtime.engine
        first = harness.stub.Generate(request(1000))
        await first.read()
        # The engine finishes it; its client has read one message of ~300 KB of output.
        assert await asyncio.to_thread(engine.wait_until, lambda e: e.engine.num_active == 0, 60)
        assert engine.num_active == 1
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in harness.stub.Generate(request(4, 0)):
                pass
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        rest = await read_rest(first)
        assert rest[-1].usage.completion_tokens == 1000
        assert await asyncio.to_thread(engine.wait_idle, 30)
        msgs = [m async for m in harness.stub.Generate(request(4, 0))]
        assert msgs[-1].usage.completion_tokens == 4
    finally:
        await harness.close()


async def test_slow_readers_get_exactly_what_fast_readers_get(stories_model):
    """Held, yielded to waiting requests and resumed many times over: the same greedy tokens."""
    prompts = [f"Once upon a time {word}" for word in ("Lily", "Tom", "a dog", "the sun", "Ben", "a cat")] * 2
    fast = await start_harness(stories_model)
    try:
        expected = [[t for m in await collect(fast.stub.Generate(request(60, 3, p))) for t in m.token_ids]
                    for p in prompts]
    finally:
        await fast.close()
    config = EngineConfig(scheduler=SchedulerConfig(max_running=4))
    slow = await start_harness(stories_model, config=config, stream_buffer_tokens=8, channel_options=SLOW_READER)
    try:
        calls = [slow.stub.Generate(request(60, 3, p)) for p in prompts]
        got = []
        for call in calls:  # one at a time: the others sit held until their turn
            got.append([t for m in await collect(call) for t in m.token_ids])
        assert got == expected
        assert await asyncio.to_thread(slow.runtime.engine.wait_idle, 30)
        slow.llm.check_invariants()
    finally:
        await slow.close()


async def collect(call) -> list[pb.GenerateResponse]:
    return [m async for m in call]
