"""End to end over gRPC against `lumen serve` in a subprocess (tests/e2e/conftest.py):
SmolLM2 answers a chat, batching and speculation change no output, a cancel and a deadline free
everything, and the float64 references (and the stories260K oracle) come back over the wire."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from lumen.v1 import inference_pb2 as pb
from tests.conftest import smollm2_ids

QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?",
             "Write one sentence about the sea.", "Who wrote Romeo and Juliet?", "What do bees make?",
             "Say hello in Spanish.", "What is the largest planet?"]


def chat(question: str, max_new_tokens: int = 48, method: str = "", model: str = "") -> pb.ChatRequest:
    req = pb.ChatRequest(model=model, messages=[pb.ChatMessage(role="user", content=question)])
    req.sampling.temperature = 0
    req.stopping.max_new_tokens = max_new_tokens
    if method:
        req.speculative.method = method
    return req


def answer(server, req) -> tuple[list[int], str, pb.GenerateResponse]:
    call = server.stub.Chat if isinstance(req, pb.ChatRequest) else server.stub.Generate
    msgs = list(call(req, timeout=120))
    return [t for m in msgs for t in m.token_ids], "".join(m.text for m in msgs), msgs[-1]


def test_capital(server):
    _, text, last = answer(server, chat("What is the capital of France?"))
    assert "Paris" in text
    assert last.finish_reason == pb.FINISH_REASON_EOS and last.usage.completion_tokens < 48


def test_eight_concurrent_chats_equal_their_solo_outputs(server):
    solo = [answer(server, chat(q))[0] for q in QUESTIONS]
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(lambda q: answer(server, chat(q))[0], QUESTIONS))
    assert together == solo


@pytest.mark.parametrize("method", ["ngram", "layer_skip"])
def test_speculative_chats_equal_plain_greedy(server, method):
    for question in QUESTIONS[:3]:
        plain, _, _ = answer(server, chat(question))
        ids, _, last = answer(server, chat(question, method=method))
        assert ids == plain, question
        assert last.usage.draft_tokens > 0


def idle(server) -> bool:
    return (server.metric("lumen_engine_requests", state="running") == 0
            and server.metric("lumen_engine_requests", state="waiting") == 0
            and server.metric("lumen_kv_cache_blocks", state="used") == 0)


def test_cancel_and_deadline_mid_stream_free_everything(server):
    call = server.stub.Chat(chat(QUESTIONS[3], max_new_tokens=400), timeout=120)
    first = next(call)
    assert first.token_ids
    call.cancel()
    server.wait_for(lambda: idle(server), what="the cancelled chat to free its blocks")
    req = chat(QUESTIONS[4], max_new_tokens=1000)   # SmolLM2 needs seconds for these, ending or not
    req.stopping.ignore_eos = True
    with pytest.raises(grpc.RpcError) as err:
        for msg in server.stub.Chat(req, timeout=0.5):
            assert msg.token_ids
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    server.wait_for(lambda: idle(server), what="the timed-out request to free its blocks")
    _, text, _ = answer(server, chat("What is the capital of France?"))
    assert "Paris" in text


@pytest.mark.parametrize("name", ["capital", "story"])
def test_smollm2_float64_references_over_the_wire(server, name):
    prompt, greedy = smollm2_ids(name, "prompt"), smollm2_ids(name, "greedy")
    req = pb.GenerateRequest(prompt_token_ids=prompt)
    req.sampling.temperature = 0
    req.stopping.max_new_tokens = len(greedy)
    req.stopping.ignore_eos = True
    ids, _, last = answer(server, req)
    assert ids == greedy and last.finish_reason == pb.FINISH_REASON_LENGTH


def test_stories260k_oracle_over_the_wire(server, stories_greedy):
    oracle, text = stories_greedy
    req = pb.GenerateRequest(model="stories")
    req.sampling.temperature = 0
    req.stopping.max_new_tokens = len(oracle)
    req.stopping.ignore_eos = True
    ids, got, _ = answer(server, req)
    assert ids == oracle and got == text
