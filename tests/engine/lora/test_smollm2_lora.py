"""Real adapters of SmolLM2-135M-Instruct (made by PEFT and converted by llama.cpp's own
convert_lora_to_gguf.py: tests/lora_data.py) against float64 references: the base model with
the adapter merged into its weights by PEFT, run by transformers.

The tolerance is the base model's own reference test's (test_smollm2_reference.py): relative
error under 1e-4, and at most llama.cpp's on the base model. llama.cpp loading the same GGUF
adapters is compared by bench/lora_llamacpp.py (BENCHMARKS.md), not here: it is a 5-minute build.
"""
from __future__ import annotations

import pytest

from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
from lumen.engine.core.request import GenerationRequest
from lumen.engine.sampling.sampler import SamplingParams
from tests import lora_data
from tests.engine.lora.helpers import prompt_logits
from tests.engine.model.test_llama_reference import assert_as_close_as_llama_cpp
from tests.engine.model.test_smollm2_reference import LLAMA_CPP_ERROR


@pytest.fixture(scope="module")
def engine(smollm2_model):
    pytest.importorskip("peft", reason="the LoRA test data is made with peft (pip install -e '.[test]')")
    lora_data.build_all()   # every adapter these tests use, the conversions two at a time
    return LLMEngine(smollm2_model, EngineConfig(kv_cache_bytes=64 << 20))


def adapted_logits(engine: LLMEngine, path, ids: list[int]):
    engine.load_adapter("x", engine.lora.read(path))
    try:
        return prompt_logits(engine, ids, (engine.lora.get("x").weights, 1.0))
    finally:
        engine.unload_adapter("x")


def gguf(kind: str, outtype: str = "f32"):
    if lora_data.llama_cpp_converter() is None:
        pytest.skip("llama.cpp's convert_lora_to_gguf.py is not available (no llama-cpp-python sdist: "
                    "set LUMEN_LLAMA_CPP_DIR to a llama.cpp source folder)")
    return lora_data.gguf_adapter(kind, outtype)


# rslora16's GGUF is left out: llama.cpp's converter writes lora_alpha as is and llama.cpp scales
# by alpha / rank, so an rsLoRA adapter means another scale there (the PEFT directory is exact).
@pytest.mark.parametrize("kind, form", [("random8", "peft"), ("rslora16", "peft"), ("mlp4", "peft"),
                                        ("random8", "gguf"), ("mlp4", "gguf")])
def test_logits_equal_the_merged_float64_reference(engine, kind, form):
    ids = lora_data.capital_prompt_ids()
    path = lora_data.adapter_dir(kind) if form == "peft" else gguf(kind)
    ours = adapted_logits(engine, path, ids)
    ref = lora_data.merged_reference_logits(kind, ids)
    assert (ref - lora_data.base_reference_logits(ids)).abs().max() > 0.5, "the adapter should matter"
    assert_as_close_as_llama_cpp(ours, ref, LLAMA_CPP_ERROR["capital"], "exact")


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_every_gguf_tensor_type_reads_as_the_converter_wrote_it(engine, outtype):
    """16-bit and Q8_0 adapters are the float32 one rounded: as close to the reference as
    llama.cpp's own error allows (the rounding is the converter's, not ours)."""
    ids = lora_data.capital_prompt_ids()
    ours = adapted_logits(engine, gguf("random8", outtype), ids)
    assert_as_close_as_llama_cpp(ours, lora_data.merged_reference_logits("random8", ids),
                                 LLAMA_CPP_ERROR["capital"], "int8")


@pytest.mark.parametrize("form", ["peft", "gguf"])
def test_the_trained_adapter_answers_what_it_was_taught(engine, form):
    ids = lora_data.capital_prompt_ids()
    path = lora_data.adapter_dir("trained16") if form == "peft" else gguf("trained16")
    want = lora_data.trained_answer_ids()[:lora_data.ANSWER_CHECK_TOKENS]
    engine.load_adapter("trained", engine.lora.read(path))
    try:
        for rid, adapter in (("lora", "trained"), ("base", "")):
            engine.add_request(GenerationRequest(rid, ids, len(want), SamplingParams(temperature=0), adapter=adapter))
        out = {"lora": [], "base": []}
        while engine.has_unfinished():
            for o in engine.step():
                out[o.request_id] += o.token_ids
        engine.check_invariants()
    finally:
        engine.unload_adapter("trained")
    assert out["lora"] == want
    assert out["base"] != want
    assert out["base"] == lora_data.greedy_ids(None, ids, len(want))
