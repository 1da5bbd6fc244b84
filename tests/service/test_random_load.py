"""Hundreds of concurrent streams with random cancels and deadlines over a small KV pool
(preemption guaranteed): afterwards no block is leaked and the server still serves."""
from __future__ import annotations

import asyncio
import random

import grpc

from lumen.engine.core.llm_engine import EngineConfig
from lumen.engine.core.scheduler import SchedulerConfig
from lumen.engine.model.kv_cache import KVCacheSpec
from lumen.v1 import inference_pb2 as pb
from tests.service.conftest import assert_still_serving, start_harness


async def one_request(stub, rng: random.Random, i: int) -> str:
    req = pb.GenerateRequest(prompt_token_ids=[1] + [rng.randrange(3, 512) for _ in range(rng.randrange(0, 40))])
    req.sampling.temperature = rng.choice([0.0, 0.8])
    req.stopping.max_new_tokens = rng.randrange(1, 40)
    req.stopping.ignore_eos = True
    mode = rng.choice(["complete", "cancel", "deadline"])
    timeout = rng.uniform(0.001, 0.2) if mode == "deadline" else 60
    call = stub.Generate(req, timeout=timeout)
    cancel_after = rng.randrange(0, 4)
    try:
        received = 0
        async for msg in call:
            received += len(msg.token_ids)
            if mode == "cancel" and received >= cancel_after:
                call.cancel()
                return "cancelled"
        return "completed"
    except grpc.aio.AioRpcError as err:
        assert err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED), err
        return err.code().name
    except asyncio.CancelledError:
        return "cancelled"


async def test_random_cancels_and_deadlines_leak_no_blocks(stories_model):
    per_block = KVCacheSpec.bytes_per_block(stories_model.config, 8, stories_model.weights.dtype)
    config = EngineConfig(scheduler=SchedulerConfig(max_running=8, max_tokens_per_step=48, max_waiting=400),
                          kv_cache_bytes=per_block * 20, block_size=8)
    harness = await start_harness(stories_model, config=config)
    try:
        seed = random.randrange(2**32)
        rng = random.Random(seed)
        results = await asyncio.gather(*(one_request(harness.stub, rng, i) for i in range(200)))
        assert await asyncio.to_thread(harness.runtime.engine.wait_idle, 60), f"seed {seed}"
        llm = harness.llm
        llm.check_invariants()
        assert llm.blocks.num_free == llm.blocks.num_blocks, f"seed {seed}: KV blocks leaked"
        assert llm.scheduler.num_preemptions > 0, f"seed {seed}: the pool was meant to force preemption"
        assert {"completed", "cancelled"} <= set(results), f"seed {seed}: {set(results)}"
        await assert_still_serving(harness)
    finally:
        await harness.close()
