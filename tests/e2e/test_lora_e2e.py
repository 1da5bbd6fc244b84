"""LoRA end to end: `lumen serve` (a subprocess) serving SmolLM2 with two real adapters given
on the command line, a PEFT directory (trained to answer the capital question its own way) and
a GGUF file written by llama.cpp's convert_lora_to_gguf.py; asked over gRPC, each adapter and
the base answer as their float64 merged references say (tests/lora_data.py)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from lumen.v1 import inference_pb2 as pb
from tests import lora_data
from tests.conftest import shared_file
from tests.e2e.conftest import launch

N = lora_data.ANSWER_CHECK_TOKENS


@pytest.fixture(scope="module")
def lora_server():
    pytest.importorskip("peft", reason="the LoRA test data is made with peft (pip install -e '.[test]')")
    if lora_data.llama_cpp_converter() is None:
        pytest.skip("llama.cpp's convert_lora_to_gguf.py is not available (set LUMEN_LLAMA_CPP_DIR)")
    lora_data.build_all()   # every adapter the LoRA tests use, the conversions two at a time
    smol = shared_file("models", "SmolLM2-135M-Instruct.Q4_1.gguf")
    yield from launch(["--model", f"smollm2={smol}", "--matmul-mode", "exact",
                       "--lora", f"trained={lora_data.adapter_dir('trained16')}",
                       "--lora", f"random={lora_data.gguf_adapter('random8', 'f32')}"])


def ask(server, adapter: str, chat: bool) -> list[int]:
    if chat:
        req = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=lora_data.CAPITAL_QUESTION)],
                             adapter=adapter)
    else:
        req = pb.GenerateRequest(prompt_token_ids=lora_data.capital_prompt_ids(), adapter=adapter)
    req.sampling.temperature = 0
    req.stopping.max_new_tokens, req.stopping.ignore_eos = N, True
    call = server.stub.Chat if chat else server.stub.Generate
    return [t for m in call(req, timeout=120) for t in m.token_ids]


def test_each_adapter_and_the_base_answer_as_their_merged_reference(lora_server):
    models = lora_server.stub.ListModels(pb.ListModelsRequest()).models
    adapters = {a.name: a for a in models[0].adapters}
    assert (adapters["trained"].format, adapters["trained"].rank) == ("peft", 16)
    assert (adapters["random"].format, adapters["random"].rank) == ("gguf", 8)
    ids = lora_data.capital_prompt_ids()
    want = {"trained": lora_data.greedy_ids("trained16", ids, N), "random": lora_data.greedy_ids("random8", ids, N),
            "": lora_data.greedy_ids(None, ids, N)}
    assert want["trained"] == lora_data.trained_answer_ids()[:N]
    assert len({tuple(v) for v in want.values()}) == 3
    for chat in (True, False):
        assert {name: ask(lora_server, name, chat) for name in want} == want
    # All at once, each several times: one batch mixing both adapters and the base.
    names = list(want) * 2
    with ThreadPoolExecutor(len(names)) as pool:
        together = list(pool.map(lambda name: ask(lora_server, name, True), names))
    assert together == [want[name] for name in names]
    text = "".join(m.text for m in lora_server.stub.Chat(pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content=lora_data.CAPITAL_QUESTION)], adapter="trained"), timeout=120))
    assert "Lumenville" in text, text
