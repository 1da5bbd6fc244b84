"""Generate end to end over gRPC against the real stories260K model."""
from __future__ import annotations

import asyncio
import re

from lumen.v1 import inference_pb2 as pb
from tests.service.conftest import StepGate, read_rest


def greedy_request(max_new: int = 200, **kw) -> pb.GenerateRequest:
    req = pb.GenerateRequest(**kw)
    req.sampling.temperature = 0
    req.stopping.max_new_tokens = max_new
    req.stopping.ignore_eos = True
    return req


async def collect(call) -> list[pb.GenerateResponse]:
    return [msg async for msg in call]


async def test_greedy_200_matches_oracle(stories, stories_greedy):
    ids, text = stories_greedy
    msgs = await collect(stories.stub.Generate(greedy_request()))
    assert all(len(m.token_ids) == 1 for m in msgs)
    assert [t for m in msgs for t in m.token_ids] == ids
    assert "".join(m.text for m in msgs).encode() == text.encode()
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    last = msgs[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (1, 200)
    assert re.fullmatch(r"[0-9a-f]{32}", last.trace_id) and set(last.trace_id) != {"0"}


async def test_first_message_arrives_before_last_token_is_computed(stories):
    gate = StepGate(stories.llm, free_steps=1)
    try:
        call = stories.stub.Generate(greedy_request(50))
        first = await call.read()
        # The engine is held before its second step: only the prefill step has run.
        assert len(first.token_ids) == 1
        assert await asyncio.to_thread(gate.blocked.wait, 30)
        assert stories.llm.tokens_computed == 1
    finally:
        gate.release.set()
    rest = await read_rest(call)
    assert len(rest) == 49 and rest[-1].finish_reason == pb.FINISH_REASON_LENGTH


async def test_text_prompt_and_stop_sequence(stories):
    free = await collect(stories.stub.Generate(greedy_request(60, prompt="Once upon a time")))
    full = "".join(m.text for m in free)
    stop = full[10:14]
    msgs = await collect(stories.stub.Generate(greedy_request(60, prompt="Once upon a time",
                                                              stopping=pb.StoppingCriteria(max_new_tokens=60, stop=[stop], ignore_eos=True))))
    text = "".join(m.text for m in msgs)
    assert msgs[-1].finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert msgs[-1].stop_sequence == stop
    assert text == full[: full.index(stop)]


async def test_seeded_sampling_is_reproducible(stories):
    def req():
        r = pb.GenerateRequest(prompt="The cat")
        r.sampling.temperature, r.sampling.top_k, r.sampling.top_p, r.sampling.seed = 0.9, 40, 0.95, 1234
        r.stopping.max_new_tokens = 40
        return r
    a, b = await asyncio.gather(collect(stories.stub.Generate(req())), collect(stories.stub.Generate(req())))
    assert [m.token_ids for m in a] == [m.token_ids for m in b]


async def test_logprobs_and_prompt_logprobs(stories):
    req = greedy_request(5, prompt="Once upon a time", top_logprobs=3, prompt_logprobs=True)
    msgs = await collect(stories.stub.Generate(req))
    prompt_tokens = msgs[-1].usage.prompt_tokens
    assert len(msgs[0].prompt_logprobs) == prompt_tokens - 1
    assert all(len(m.prompt_logprobs) == 0 for m in msgs[1:])
    for m in msgs:
        (lp,) = m.logprobs
        assert lp.token_id == m.token_ids[0] and len(lp.top) == 3
        assert lp.top[0].token_id == lp.token_id  # greedy picks the most likely token
        assert lp.logprob <= 0 and abs(lp.top[0].logprob - lp.logprob) < 1e-6


async def test_prompt_token_ids_are_used_as_given(stories):
    tok = await stories.stub.Tokenize(pb.TokenizeRequest(text="Once upon a time"))
    assert tok.token_ids[0] == 1 and len(tok.pieces) == len(tok.token_ids)
    by_text = await collect(stories.stub.Generate(greedy_request(20, prompt="Once upon a time")))
    by_ids = await collect(stories.stub.Generate(greedy_request(20, prompt_token_ids=tok.token_ids)))
    assert [m.token_ids for m in by_text] == [m.token_ids for m in by_ids]
    assert by_ids[-1].usage.prompt_tokens == len(tok.token_ids)


async def test_list_models(stories):
    (m,) = (await stories.stub.ListModels(pb.ListModelsRequest())).models
    assert (m.architecture, m.context_length, m.vocab_size, m.file_type) == ("llama", 2048, 512, "F32")
    assert m.parameter_count > 200_000 and m.is_default and m.name == "stories260K"


async def test_concurrent_requests_match_solo_runs(stories):
    prompts = ["Once upon a time", "The dog", "Lily went", "One day"]
    solo = [await collect(stories.stub.Generate(greedy_request(30, prompt=p))) for p in prompts]
    together = await asyncio.gather(*(collect(stories.stub.Generate(greedy_request(30, prompt=p))) for p in prompts))
    assert [[m.token_ids for m in r] for r in together] == [[m.token_ids for m in r] for r in solo]
