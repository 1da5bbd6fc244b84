"""Speculative decoding over gRPC: greedy output unchanged, several tokens per message, usage."""
from __future__ import annotations

import asyncio

import pytest

from lumen.engine.core.llm_engine import EngineConfig
from lumen.engine.speculative import SpecMethod, SpeculativeConfig
from lumen.engine.weights.gguf_loader import load_gguf
from lumen.service.server import build_registry
from lumen.telemetry import setup_telemetry
from lumen.v1 import inference_pb2 as pb
from tests.service.conftest import start_harness
from tests.service.test_generate import collect, greedy_request


def speculative_request(method: str, max_new: int = 200, num_tokens: int | None = None) -> pb.GenerateRequest:
    req = greedy_request(max_new)
    req.speculative.method = method
    if num_tokens is not None:
        req.speculative.num_tokens = num_tokens
    return req


def assert_usage_consistent(usage: pb.Usage) -> None:
    assert 0 < usage.draft_tokens and 0 <= usage.accepted_draft_tokens <= usage.draft_tokens
    assert usage.acceptance_rate == pytest.approx(usage.accepted_draft_tokens / usage.draft_tokens, rel=1e-6)


@pytest.mark.parametrize("method", ["ngram", "layer_skip", "draft"])
async def test_greedy_speculation_gives_the_plain_text(stories_with_draft, stories_greedy, method):
    ids, text = stories_greedy
    msgs = await collect(stories_with_draft.stub.Generate(speculative_request(method)))
    assert [t for m in msgs for t in m.token_ids] == ids
    assert "".join(m.text for m in msgs).encode() == text.encode()
    if method != "layer_skip":  # stories260K's first layer alone rarely guesses right
        assert max(len(m.token_ids) for m in msgs) > 1
    usage = msgs[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (1, 200)
    assert_usage_consistent(usage)
    assert all(not m.HasField("usage") for m in msgs[:-1])


async def test_plain_request_reports_no_drafts(stories_with_draft):
    usage = (await collect(stories_with_draft.stub.Generate(greedy_request(20))))[-1].usage
    assert (usage.draft_tokens, usage.accepted_draft_tokens, usage.acceptance_rate) == (0, 0, 0.0)


async def test_server_default_method_and_per_request_choice(stories_model, stories_greedy):
    ids, _ = stories_greedy
    config = EngineConfig(speculative=SpeculativeConfig(method=SpecMethod.NGRAM, num_tokens=2))
    harness = await start_harness(stories_model, config=config)
    try:
        default = await collect(harness.stub.Generate(greedy_request()))
        longer = await collect(harness.stub.Generate(speculative_request("", num_tokens=8)))
        off = await collect(harness.stub.Generate(speculative_request("none")))
    finally:
        await harness.close()
    for msgs in (default, longer, off):
        assert [t for m in msgs for t in m.token_ids] == ids
    assert_usage_consistent(default[-1].usage)
    assert max(len(m.token_ids) for m in default) <= 3  # 2 drafted + the model's own next token
    assert max(len(m.token_ids) for m in longer) > 3
    assert off[-1].usage.draft_tokens == 0 and all(len(m.token_ids) == 1 for m in off)


async def test_several_tokens_per_message_carry_a_logprob_each(stories_with_draft):
    req = speculative_request("draft")
    req.top_logprobs = 2
    msgs = await collect(stories_with_draft.stub.Generate(req))
    assert max(len(m.token_ids) for m in msgs) > 1
    for m in msgs:
        assert [lp.token_id for lp in m.logprobs] == list(m.token_ids)
        assert all(lp.top[0].token_id == lp.token_id for lp in m.logprobs)  # greedy = the most likely


@pytest.mark.parametrize("method", ["ngram", "layer_skip", "draft"])
async def test_sampled_speculation_completes(stories_with_draft, method):
    req = speculative_request(method, 100)
    req.sampling.temperature, req.sampling.top_p, req.sampling.seed = 0.8, 0.95, 7
    msgs = await collect(stories_with_draft.stub.Generate(req))
    assert sum(len(m.token_ids) for m in msgs) == msgs[-1].usage.completion_tokens == 100
    assert_usage_consistent(msgs[-1].usage)
    assert await asyncio.to_thread(stories_with_draft.runtime.engine.wait_idle, 30)
    stories_with_draft.llm.check_invariants()


async def test_concurrent_mixed_methods_match_plain_runs(stories_with_draft):
    """Six requests with every method at once: more than the default --speculative-max-batch (4),
    so steps speculate only once the shorter ones finish. Each gets its plain greedy text, and no
    block leaks."""
    prompts = ["Once upon a time", "The dog", "Lily went", "One day", "Tom saw a", "The sun"]
    methods = ["ngram", "layer_skip", "draft", "none", "draft", "ngram"]

    def request(i: int, method: str) -> pb.GenerateRequest:
        req = speculative_request(method, 20 + 20 * i)
        req.prompt = prompts[i]
        return req

    def text(msgs) -> tuple[list[int], str]:
        return [t for m in msgs for t in m.token_ids], "".join(m.text for m in msgs)

    stub = stories_with_draft.stub
    plain = [await collect(stub.Generate(request(i, "none"))) for i in range(len(prompts))]
    mixed = await asyncio.gather(*(collect(stub.Generate(request(i, m))) for i, m in enumerate(methods)))
    assert [text(r) for r in mixed] == [text(r) for r in plain]
    assert mixed[-1][-1].usage.draft_tokens > 0  # the longest ran alone at the end
    assert await asyncio.to_thread(stories_with_draft.runtime.engine.wait_idle, 30)
    stories_with_draft.llm.check_invariants()


def test_draft_model_serves_the_default_model_only(stories_model, stories_draft_model, stories_path):
    other = load_gguf(stories_path, name="other")
    config = EngineConfig(speculative=SpeculativeConfig(method=SpecMethod.DRAFT))
    registry = build_registry([stories_model, other], config, setup_telemetry(), stories_draft_model)
    try:
        default, second = (rt.engine.engine for rt in registry)
        assert default.speculation.draft is not None and default.config.speculative.method is SpecMethod.DRAFT
        assert second.speculation.draft is None and second.config.speculative.method is SpecMethod.NONE
    finally:
        registry.shutdown()
