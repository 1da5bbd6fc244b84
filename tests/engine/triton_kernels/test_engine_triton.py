"""The whole engine on the Triton backend (interpreted on CPU) reproduces the greedy oracle."""
from __future__ import annotations

import pytest

from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
from lumen.engine.core.request import GenerationRequest
from lumen.engine.core.scheduler import SchedulerConfig
from lumen.engine.sampling.sampler import SamplingParams

pytest.importorskip("triton")


def test_engine_on_triton_backend_matches_oracle(stories_model, stories_greedy, monkeypatch):
    from lumen.engine.triton_kernels import paged_attention
    if not paged_attention.INTERPRETED:
        pytest.skip("the kernels were imported without TRITON_INTERPRET=1 on a machine without CUDA")
    monkeypatch.setenv("LUMEN_ATTENTION_BACKEND", "triton")
    engine = LLMEngine(stories_model, EngineConfig(scheduler=SchedulerConfig(max_tokens_per_step=8)))
    assert engine.model.attention.name == "triton"
    ids, _ = stories_greedy
    # Chunked prefill (prefill kernel over cached context) and batched decode (decode kernel).
    engine.add_request(GenerationRequest("a", [1], 12, SamplingParams(temperature=0), ignore_eos=True))
    engine.add_request(GenerationRequest("b", [1] + ids[:20], 4, SamplingParams(temperature=0), ignore_eos=True))
    out: dict[str, list[int]] = {"a": [], "b": []}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.token_ids
    assert out["a"] == ids[:12]
    assert out["b"] == ids[20:24]
