"""One request's failure is its own: a request whose sampling blows up fails alone while the
requests batched with it finish as if it had never been there; and the engine reports its
queues and KV cache after an abort or a failure without waiting for another step."""
from __future__ import annotations

import pytest

from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
from lumen.engine.core.request import FinishReason, GenerationRequest
from lumen.engine.core.scheduler import SchedulerConfig
from lumen.engine.errors import InvalidRequestError
from lumen.engine.sampling.sampler import SamplingParams


def run(engine: LLMEngine) -> dict[str, list]:
    """Step until done: each request's tokens and its last output."""
    seen: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens, _ = seen.get(out.request_id, ([], None))
            seen[out.request_id] = (tokens + out.token_ids, out)
    return seen


def poisoned(request_id: str) -> GenerationRequest:
    """A temperature validation now refuses (1e-40 overflows float32 in the sampler), forced in."""
    params = SamplingParams(temperature=0.5, seed=1)
    object.__setattr__(params, "temperature", 1e-40)
    return GenerationRequest(request_id, [1, 300, 301], 8, params, ignore_eos=True)


def healthy(request_id: str, seed: int) -> GenerationRequest:
    return GenerationRequest(request_id, [1, 400 + seed], 12, SamplingParams(temperature=0.8, seed=seed),
                             ignore_eos=True)


def test_a_poisoned_request_fails_alone(stories_model):
    alone = {}
    for seed in (1, 2):
        engine = LLMEngine(stories_model, EngineConfig(scheduler=SchedulerConfig(max_running=1)))
        engine.add_request(healthy(f"h{seed}", seed))
        alone[f"h{seed}"] = run(engine)[f"h{seed}"][0]
    engine = LLMEngine(stories_model, EngineConfig(scheduler=SchedulerConfig(max_running=4)))
    engine.add_request(healthy("h1", 1))
    engine.add_request(poisoned("bad"))
    engine.add_request(healthy("h2", 2))
    seen = run(engine)
    bad = seen["bad"][1]
    assert bad.finish_reason is FinishReason.ERROR and bad.error is not None
    for rid in ("h1", "h2"):
        tokens, last = seen[rid]
        assert last.finish_reason is FinishReason.LENGTH and last.error is None
        assert tokens == alone[rid]
    engine.check_invariants()
    assert engine.num_active == 0


@pytest.mark.parametrize("field,value", [("temperature", 1e-40), ("temperature", 1e-3), ("temperature", 1e3),
                                         ("repetition_penalty", 1e-40), ("repetition_penalty", 1e3)])
def test_values_the_sampler_cannot_use_are_refused_with_their_range(field, value):
    with pytest.raises(InvalidRequestError, match=rf"sampling\.{field}: must be .*\[0\.01, 100\]"):
        SamplingParams(**{field: value})


def test_float32_rounded_bounds_are_accepted():
    import numpy as np
    SamplingParams(temperature=float(np.float32(0.01)), repetition_penalty=float(np.float32(0.01)))


def test_load_is_published_after_an_abort_and_a_failure(stories_model):
    loads = []
    engine = LLMEngine(stories_model, EngineConfig(), on_load=loads.append)
    engine.add_request(GenerationRequest("a", [1, 300], 50, SamplingParams(temperature=0), ignore_eos=True))
    assert loads[-1].num_waiting == 1
    engine.step()
    engine.step()
    engine.abort_request("a")
    assert (loads[-1].num_running, loads[-1].num_waiting, loads[-1].kv_blocks_used) == (0, 0, 0)
    engine.add_request(poisoned("bad"))
    run(engine)
    assert (loads[-1].num_running, loads[-1].num_waiting, loads[-1].kv_blocks_used) == (0, 0, 0)
