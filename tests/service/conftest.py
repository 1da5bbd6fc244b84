"""A real Lumen server on a free loopback port, with an async client."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import grpc
import pytest_asyncio

from lumen.engine.core.async_engine import DEFAULT_STREAM_BUFFER_TOKENS
from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
from lumen.service.limits import RequestLimits
from lumen.service.registry import ModelRegistry, ModelRuntime
from lumen.service.server import LumenServer, start_runtime
from lumen.telemetry import Telemetry, setup_telemetry
from lumen.v1 import inference_pb2 as pb
from lumen.v1 import inference_pb2_grpc as pb_grpc

# Client channel options for a client that really stops reading: 1 KiB of HTTP/2 window per
# stream and no BDP probing, so the server's writes block (a default client would take
# megabytes into its own buffers first).
SLOW_READER = (("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024))


@dataclass
class Harness:
    server: LumenServer
    runtime: ModelRuntime
    stub: pb_grpc.InferenceStub
    channel: grpc.aio.Channel
    target: str

    @property
    def llm(self) -> LLMEngine:
        return self.runtime.engine.engine

    async def close(self) -> None:
        await self.channel.close()
        await self.server.stop(0)


class StepGate:
    """Lets a test hold the engine thread before a given step (synchronization, not timing)."""

    def __init__(self, llm: LLMEngine, free_steps: int) -> None:
        self.release = threading.Event()
        self.blocked = threading.Event()
        self.steps = 0
        self._orig = llm.step
        self.free_steps = free_steps
        llm.step = self._step

    def _step(self, *args):
        self.steps += 1
        if self.steps > self.free_steps and not self.release.is_set():
            self.blocked.set()
            self.release.wait(timeout=60)
        return self._orig(*args)


async def assert_still_serving(harness: Harness) -> None:
    """A small greedy request still completes and leaves nothing running."""
    r = pb.GenerateRequest(prompt="Once upon a time")
    r.sampling.temperature = 0
    r.stopping.max_new_tokens = 3
    msgs = [m async for m in harness.stub.Generate(r)]
    assert msgs[-1].usage.completion_tokens == 3
    assert harness.runtime.engine.num_active == 0


async def read_rest(call) -> list:
    """The remaining messages of a call already read with `read()` (the two APIs cannot mix)."""
    msgs = []
    while (msg := await call.read()) is not grpc.aio.EOF:
        msgs.append(msg)
    return msgs


async def start_harness(model, telemetry: Telemetry | None = None, config: EngineConfig | None = None,
                        draft=None, capture_content: bool = False, limits: RequestLimits | None = None,
                        stream_buffer_tokens: int = DEFAULT_STREAM_BUFFER_TOKENS,
                        channel_options: tuple = ()) -> Harness:
    telemetry = telemetry or setup_telemetry()
    config = config or EngineConfig()
    runtime = start_runtime(model, config, telemetry, draft, stream_buffer_tokens)
    server = LumenServer(ModelRegistry([runtime]), telemetry, config, capture_content, limits)
    port = await server.start("127.0.0.1", 0)
    target = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(target, options=list(channel_options))
    return Harness(server, runtime, pb_grpc.InferenceStub(channel), channel, target)


@pytest_asyncio.fixture
async def stories(stories_model):
    harness = await start_harness(stories_model)
    yield harness
    await harness.close()


@pytest_asyncio.fixture
async def stories_with_draft(stories_model, stories_draft_model):
    """stories260K served with llama2xs-stories-tok512 as its speculative draft model."""
    harness = await start_harness(stories_model, draft=stories_draft_model)
    yield harness
    await harness.close()
