"""What an attacking client sends is refused early, with a short message naming the limit.

Unbounded request parts (huge prompts, thousands of stop strings, megabyte ids), requests
that do not parse, over-long names repeated in errors, a second server on a used port, and
server paths in ListModels: each once cost the server or leaked something."""
from __future__ import annotations

import socket

import grpc
import pytest
import pytest_asyncio

from lumen.engine.core.llm_engine import EngineConfig
from lumen.service.limits import RequestLimits
from lumen.service.registry import ModelRegistry
from lumen.service.server import LumenServer, start_runtime
from lumen.telemetry import setup_telemetry
from lumen.v1 import inference_pb2 as pb
from tests.service.conftest import assert_still_serving, start_harness

LIMITS = RequestLimits(max_prompt_bytes=64 << 10, max_stop_sequences=4, max_reply_bytes=16 << 10)


@pytest_asyncio.fixture
async def limited(stories_model):
    harness = await start_harness(stories_model, limits=LIMITS)
    yield harness
    await harness.close()


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def generate_error(harness, request: pb.GenerateRequest) -> grpc.aio.AioRpcError:
    async def run():
        async for _ in harness.stub.Generate(request):
            pass
    return await refused(run())


def greedy(prompt: str = "Once upon a time", **fields) -> pb.GenerateRequest:
    r = pb.GenerateRequest(prompt=prompt, **fields)
    r.sampling.temperature = 0
    r.stopping.max_new_tokens = 4
    return r


@pytest.mark.parametrize("stops,what", [
    (["a"] * 5, "at most 4 are allowed"),
    (["x" * 257], "at most 256"),
])
async def test_stop_strings_are_limited(limited, stops, what):
    r = greedy()
    r.stopping.stop.extend(stops)
    err = await generate_error(limited, r)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stopping.stop" in err.details() and what in err.details()
    await assert_still_serving(limited)


async def test_request_id_length_is_limited(limited):
    err = await generate_error(limited, greedy(request_id="i" * (1 << 20)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in err.details() and "at most 128" in err.details() and len(err.details()) < 200


async def test_a_long_prompt_is_refused_before_it_is_tokenized(limited, monkeypatch):
    tokenizer = limited.runtime.model.tokenizer
    calls = []
    real_encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    err = await generate_error(limited, greedy(prompt="word " * (20 << 10)))   # 100 KiB
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in err.details() and "--max-prompt-bytes" in err.details()
    assert calls == []


async def test_a_prompt_longer_than_the_context_could_hold_is_refused_untokenized(stories, monkeypatch):
    """stories260K: 2048 tokens of at most a few bytes each; 60 KiB of text cannot fit."""
    tokenizer = stories.runtime.model.tokenizer
    assert stories.runtime.max_prompt_bytes < 60 << 10
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: pytest.fail("tokenized a prompt that cannot fit"))
    err = await generate_error(stories, greedy(prompt="x" * (60 << 10)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than the model's context can hold" in err.details()


async def test_the_context_bound_never_refuses_a_prompt_that_fits(stories):
    """The longest prompt the bound lets through is within the byte count of a fitting one."""
    tokenizer = stories.runtime.model.tokenizer
    longest_token = max(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))
    assert stories.runtime.max_prompt_bytes >= stories.runtime.model.config.context_length * longest_token


async def test_tokenize_text_and_reply_are_limited(limited):
    err = await refused(limited.stub.Tokenize(pb.TokenizeRequest(text="word " * (20 << 10))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-prompt-bytes" in err.details()
    err = await refused(limited.stub.Tokenize(pb.TokenizeRequest(text="Once upon a time " * 2000)))  # 34 KB
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reply" in err.details() and "tokenize shorter text" in err.details()
    ok = await limited.stub.Tokenize(pb.TokenizeRequest(text="Once upon a time"))
    assert len(ok.token_ids) > 1


async def test_messages_quote_client_input_briefly(stories):
    name = "m" * 20_000
    err = await generate_error(stories, pb.GenerateRequest(model=name, prompt="hi"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert len(err.details()) < 400 and "20000 characters" in err.details()
    err = await refused(stories.stub.Tokenize(pb.TokenizeRequest(model=name, text="hi")))
    assert err.code() == grpc.StatusCode.NOT_FOUND and len(err.details()) < 400


async def test_a_duplicate_long_request_id_is_already_exists(stories):
    long_id = "r" * 128
    first = stories.stub.Generate(greedy(request_id=long_id, stopping=pb.StoppingCriteria(max_new_tokens=1900,
                                                                                         ignore_eos=True)))
    await first.read()
    err = await generate_error(stories, greedy(request_id=long_id))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and len(err.details()) < 300
    first.cancel()


NOT_PROTOBUF = b"\xff\xff\xff\xff"
BAD_UTF8 = b"\x12\x02\xff\xfe"   # field 2 (prompt / text), two bytes that are not UTF-8
MALFORMED = [("Generate", NOT_PROTOBUF), ("Generate", BAD_UTF8), ("Tokenize", NOT_PROTOBUF),
             ("Tokenize", BAD_UTF8), ("ListModels", NOT_PROTOBUF)]


@pytest.mark.parametrize("method,body", MALFORMED, ids=[f"{m}-{'utf8' if b == BAD_UTF8 else 'bytes'}"
                                                       for m, b in MALFORMED])
async def test_malformed_requests_are_invalid_argument(stories, method, body):
    path = f"/lumen.v1.Inference/{method}"
    if method == "Generate":
        call = stories.channel.unary_stream(path, request_serializer=None, response_deserializer=None)(body)
    else:
        call = stories.channel.unary_unary(path, request_serializer=None, response_deserializer=None)(body)
    code, details = await call.code(), await call.details()
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "not a valid lumen.v1." in details and "Error" not in details and "<" not in details
    await assert_still_serving(stories)


async def test_list_models_shows_file_names_not_server_paths(stories):
    (model,) = (await stories.stub.ListModels(pb.ListModelsRequest())).models
    assert model.path == "stories260K.gguf"


async def test_a_second_server_on_a_used_port_fails_at_start(stories, stories_model):
    port = int(stories.target.rsplit(":", 1)[1])
    telemetry = setup_telemetry()
    runtime = start_runtime(stories_model, EngineConfig(), telemetry)
    second = LumenServer(ModelRegistry([runtime]), telemetry, EngineConfig())
    try:
        with pytest.raises(OSError, match="in use"):
            await second.start("127.0.0.1", port)
    finally:
        await second.stop(0)
    with socket.socket() as s:  # and the first still answers every connection
        s.connect(("127.0.0.1", port))
    for _ in range(4):
        await assert_still_serving(stories)


async def test_sampling_values_that_cannot_work_are_refused_with_their_range(stories):
    r = greedy()
    r.sampling.temperature = 1e-40
    err = await generate_error(stories, r)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "[0.01, 100]" in err.details()
    r = greedy()
    r.sampling.repetition_penalty = 1e-40
    err = await generate_error(stories, r)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "[0.01, 100]" in err.details()
