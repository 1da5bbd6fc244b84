"""The device path end to end: `TRITON_INTERPRET=1 lumen serve --device cpu --kernels triton`
(Triton paged attention, Triton quantized matmuls, the batched device sampler, all on the
model runner) answers over gRPC as the issue's interpreter e2e asks.

What it guarantees (README, "Serving on a GPU"): in float32 under the interpreter, greedy
decoding reproduces the stories260K oracle, alone and batched; the quantized model's greedy
answers equal the CPU kernels'; a seeded sampled request gives the same tokens alone and among
others; a cancel frees every block.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from lumen.v1 import inference_pb2 as pb
from tests.conftest import shared_file
from tests.e2e.conftest import launch
from tests.e2e.test_chat_e2e import answer, idle

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def triton_server():
    stories = shared_file("models", "stories260K.gguf")
    q4 = shared_file("quant", "stories260K-Q4_0.gguf")
    yield from launch(["--model", f"stories={stories}", "--model", f"q4={q4}", "--device", "cpu",
                       "--kernels", "triton", "--max-tokens-per-step", "64",
                       # The interpreter copies every tensor argument each launch: a small KV pool.
                       "--kv-cache-memory", "2MiB"], {"TRITON_INTERPRET": "1"})


def greedy(prompt_ids: list[int], n: int, model: str = "stories") -> pb.GenerateRequest:
    req = pb.GenerateRequest(model=model, prompt_token_ids=prompt_ids)
    req.sampling.temperature = 0
    req.stopping.max_new_tokens = n
    req.stopping.ignore_eos = True
    return req


def test_list_models_says_device_and_kernels(triton_server):
    models = triton_server.stub.ListModels(pb.ListModelsRequest()).models
    assert {(m.name, m.device, m.kernels, m.dtype) for m in models} == {
        ("stories", "cpu", "triton", "float32"), ("q4", "cpu", "triton", "float32")}
    # The KV pool (2 MiB asked for) and the weights on the device, as metrics.
    assert 0 < triton_server.metric("lumen_model_memory_bytes", part="kv_cache", gen_ai_request_model="q4") <= 2 << 20
    assert triton_server.metric("lumen_model_memory_bytes", part="weights", gen_ai_request_model="q4") > 0


def test_oracle_alone_and_batched(triton_server, stories_greedy):
    oracle, _ = stories_greedy
    ids, _, last = answer(triton_server, greedy([1], 24))
    assert ids == oracle[:24] and last.finish_reason == pb.FINISH_REASON_LENGTH
    # Four at once, each from another point of the oracle: prefill and decode share steps.
    starts = [0, 5, 17, 30]
    with ThreadPoolExecutor(len(starts)) as pool:
        got = list(pool.map(lambda s: answer(triton_server, greedy([1] + oracle[:s], 8))[0], starts))
    assert got == [oracle[s:s + 8] for s in starts]


def test_quantized_model_answers_as_the_cpu_kernels(triton_server, stories_greedy):
    from lumen.engine.core.llm_engine import LLMEngine
    from lumen.engine.core.request import GenerationRequest
    from lumen.engine.sampling.sampler import SamplingParams
    from lumen.engine.weights.gguf_loader import load_gguf

    oracle, _ = stories_greedy
    prompt = [1] + oracle[:6]
    engine = LLMEngine(load_gguf(shared_file("quant", "stories260K-Q4_0.gguf")))   # the C kernels, in process
    engine.add_request(GenerationRequest("cpu", prompt, 12, SamplingParams(temperature=0), ignore_eos=True))
    expected: list[int] = []
    while engine.has_unfinished():
        expected += [t for out in engine.step() for t in out.token_ids]
    assert answer(triton_server, greedy(prompt, 12, "q4"))[0] == expected


def test_seeded_sampling_and_logprobs_alone_and_among_others(triton_server):
    def sampled(seed: int, logprobs: bool = False) -> pb.GenerateRequest:
        req = pb.GenerateRequest(model="q4", prompt="Once upon a time")
        req.sampling.temperature, req.sampling.top_k, req.sampling.top_p = 1.5, 100, 0.98
        req.sampling.seed = seed
        req.stopping.max_new_tokens = 6
        req.logprobs = logprobs
        return req

    def run(req: pb.GenerateRequest) -> tuple[list[int], list[pb.TokenLogprob]]:
        msgs = list(triton_server.stub.Generate(req, timeout=120))
        return [t for m in msgs for t in m.token_ids], [lp for m in msgs for lp in m.logprobs]

    alone, _ = run(sampled(7))
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(run, [sampled(7), sampled(8), sampled(7, True)]))
    assert together[0][0] == alone and together[2][0] == alone
    assert together[1][0] != alone   # another seed, another story
    logprobs = together[2][1]        # the rows the host reads for logprobs: same tokens
    assert [lp.token_id for lp in logprobs] == alone and all(lp.logprob <= 0 for lp in logprobs)


def test_cancel_frees_every_block(triton_server):
    call = triton_server.stub.Generate(greedy([1], 500), timeout=120)
    assert next(call).token_ids
    call.cancel()
    triton_server.wait_for(lambda: idle(triton_server), what="the cancelled request to free its blocks")
