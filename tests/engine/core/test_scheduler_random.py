"""Randomized engine runs: hundreds of requests, aborts and preemptions, no leaked KV block,
and requests that survive preemption still give exactly their solo greedy output."""
from __future__ import annotations

import random

from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
from lumen.engine.core.request import GenerationRequest
from lumen.engine.core.scheduler import SchedulerConfig
from lumen.engine.model.kv_cache import KVCacheSpec
from lumen.engine.sampling.sampler import SamplingParams


def small_pool_config(loaded, num_blocks: int, block_size: int = 8) -> EngineConfig:
    per_block = KVCacheSpec.bytes_per_block(loaded.config, block_size, loaded.weights.dtype)
    return EngineConfig(scheduler=SchedulerConfig(max_running=12, max_tokens_per_step=48, max_waiting=1000),
                        kv_cache_bytes=per_block * num_blocks, block_size=block_size)


def request(rng: random.Random, i: int) -> GenerationRequest:
    prompt = [1] + [rng.randrange(3, 512) for _ in range(rng.randrange(0, 40))]
    if rng.random() < 0.3:  # shared prefixes exercise the prefix cache
        prompt = [1, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 312, 313, 314] + prompt[1:]
    return GenerationRequest(str(i), prompt, rng.randrange(1, 24), SamplingParams(temperature=0), ignore_eos=True)


def solo(loaded, req: GenerationRequest) -> list[int]:
    engine = LLMEngine(loaded, EngineConfig(scheduler=SchedulerConfig(max_running=1)))
    engine.add_request(GenerationRequest(req.request_id, req.prompt_ids, req.max_new_tokens,
                                         req.sampling, ignore_eos=True))
    out = []
    while engine.has_unfinished():
        for o in engine.step():
            out += o.token_ids
    return out


def test_random_submits_aborts_and_preemptions_leak_nothing(stories_model):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    engine = LLMEngine(stories_model, small_pool_config(stories_model, num_blocks=24))
    requests = {str(i): request(rng, i) for i in range(300)}
    pending = list(requests.values())
    outputs: dict[str, list[int]] = {}
    finished, aborted = set(), set()
    preemptions = 0
    while pending or engine.has_unfinished():
        for _ in range(rng.randrange(0, 4)):
            if pending:
                engine.add_request(pending.pop())
        if rng.random() < 0.15 and engine.scheduler.active():
            victim = rng.choice(engine.scheduler.active()).request_id
            assert engine.abort_request(victim) is not None
            aborted.add(victim)
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished:
                finished.add(out.request_id)
        preemptions = engine.scheduler.num_preemptions
        engine.check_invariants()
    assert finished | aborted == set(requests), f"seed {seed}"
    assert engine.blocks.num_free == engine.blocks.num_blocks, f"seed {seed}: blocks leaked"
    assert preemptions > 0, f"seed {seed}: the test meant to force preemption"
    assert engine.blocks.hits > 0, f"seed {seed}: the test meant to hit the prefix cache"
    for rid in rng.sample(sorted(finished), 12):
        assert outputs[rid] == solo(stories_model, requests[rid]), f"seed {seed}, request {rid}"
        assert len(outputs[rid]) == requests[rid].max_new_tokens
