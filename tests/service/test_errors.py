"""Bad input gets the right status and a message naming the field; the server keeps serving."""
from __future__ import annotations

import math

import grpc
import pytest

from lumen.v1 import inference_pb2 as pb
from tests.service.conftest import StepGate, assert_still_serving, read_rest


def req(**kw) -> pb.GenerateRequest:
    r = pb.GenerateRequest(prompt="Once upon a time")
    for path, value in kw.items():
        target = r
        *parents, leaf = path.split("__")
        for p in parents:
            target = getattr(target, p)
        if isinstance(value, list):
            getattr(target, leaf).extend(value)
        else:
            setattr(target, leaf, value)
    return r


INVALID = [
    ("negative temperature", req(sampling__temperature=-0.5), "sampling.temperature"),
    ("NaN temperature", req(sampling__temperature=math.nan), "sampling.temperature"),
    ("top_p zero", req(sampling__top_p=0.0), "sampling.top_p"),
    ("top_p above one", req(sampling__top_p=1.5), "sampling.top_p"),
    ("negative top_k", req(sampling__top_k=-1), "sampling.top_k"),
    ("min_p above one", req(sampling__min_p=1.5), "sampling.min_p"),
    ("negative min_p", req(sampling__min_p=-0.1), "sampling.min_p"),
    ("max_new_tokens beyond context", req(stopping__max_new_tokens=5000), "stopping.max_new_tokens"),
    ("max_new_tokens zero", req(stopping__max_new_tokens=0), "stopping.max_new_tokens"),
    ("prompt fills the context", req(prompt="", prompt_token_ids=[1] * 2048), "prompt"),
    ("top_logprobs over 20", req(top_logprobs=21), "top_logprobs"),
    ("token id outside vocab", req(prompt="", prompt_token_ids=[1, 512]), "prompt_token_ids"),
    ("prompt and token ids", req(prompt_token_ids=[1, 2]), "prompt"),
    ("empty prompt without BOS", req(prompt="", add_special_tokens=False), "prompt"),
    ("empty stop string", req(stopping__stop=[""]), "stopping.stop"),
    ("non-positive repetition penalty", req(sampling__repetition_penalty=0.0), "sampling.repetition_penalty"),
    ("unknown speculative method", req(speculative__method="bogus"), "speculative.method"),
    ("zero speculative tokens", req(speculative__num_tokens=0), "speculative.num_tokens"),
    ("17 speculative tokens", req(speculative__num_tokens=17), "speculative.num_tokens"),
    ("draft method without a draft model", req(speculative__method="draft"), "speculative.method"),
]


@pytest.mark.parametrize("name,request_msg,field", INVALID, ids=[c[0] for c in INVALID])
async def test_invalid_argument(stories, name, request_msg, field):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stories.stub.Generate(request_msg):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    await assert_still_serving(stories)


async def test_unknown_model_is_not_found(stories):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stories.stub.Generate(pb.GenerateRequest(model="no-such-model", prompt="hi")):
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in err.value.details() and "stories260K" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stories.stub.Tokenize(pb.TokenizeRequest(model="no-such-model", text="hi"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await assert_still_serving(stories)


async def test_duplicate_running_request_id_is_rejected(stories):
    gate = StepGate(stories.llm, free_steps=1)
    try:
        first = stories.stub.Generate(req(request_id="same", stopping__max_new_tokens=20))
        await first.read()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stories.stub.Generate(req(request_id="same")):
                pass
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    finally:
        gate.release.set()
    assert (await read_rest(first))[-1].usage.completion_tokens == 20
    await assert_still_serving(stories)



async def test_model_failure_is_internal_and_server_recovers(stories, monkeypatch):
    """A failing forward reaches the client as INTERNAL with the cause: never a made-up answer."""
    real_forward = stories.llm.model.forward

    def broken(batch, num_layers=None):
        raise RuntimeError("simulated kernel fault")

    monkeypatch.setattr(stories.llm.model, "forward", broken)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stories.stub.Generate(req(stopping__max_new_tokens=5)):
            pass
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "simulated kernel fault" in err.value.details()
    monkeypatch.setattr(stories.llm.model, "forward", real_forward)
    await assert_still_serving(stories)


async def test_unset_max_new_tokens_is_clipped_to_the_context(stories):
    r = pb.GenerateRequest(prompt_token_ids=[1] + [300] * 2040)  # 2041 of 2048 context tokens
    r.sampling.temperature = 0
    r.stopping.ignore_eos = True
    msgs = [m async for m in stories.stub.Generate(r)]
    assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert msgs[-1].usage.completion_tokens == 7


async def test_add_special_tokens_false_omits_bos(stories):
    with_bos = await stories.stub.Tokenize(pb.TokenizeRequest(text="Once upon a time"))
    without = await stories.stub.Tokenize(pb.TokenizeRequest(text="Once upon a time", add_special_tokens=False))
    assert list(with_bos.token_ids) == [1] + list(without.token_ids)
    r = req(add_special_tokens=False, stopping__max_new_tokens=2)
    msgs = [m async for m in stories.stub.Generate(r)]
    assert msgs[-1].usage.prompt_tokens == len(without.token_ids)
