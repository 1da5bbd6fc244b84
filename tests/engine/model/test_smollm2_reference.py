"""SmolLM2-135M-Instruct (Q4_1, Q8_0 embedding) against its float64 references, in every matmul mode.

The exact mode (float32 on the exactly decoded weights) must reproduce the float64 greedy
continuations token for token; both modes' logits must be at least as close to the float64
logits as llama.cpp's own (which quantizes activations to 8 bits). llama.cpp's errors below were
measured with llama-cpp-python 0.3.36 (2 threads, default settings) by bench/llamacpp_logits.py:

    .venv/bin/python bench/llamacpp_logits.py     # needs `pip install llama-cpp-python`
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
from lumen.engine.core.request import GenerationRequest
from lumen.engine.native import kernels as native
from lumen.engine.sampling.sampler import SamplingParams
from tests.conftest import shared_file
from tests.engine.model.test_llama_reference import assert_as_close_as_llama_cpp, engine_logits

NAME = "SmolLM2-135M-Instruct"
# max |llama.cpp - ref64| / max |ref64| over every prompt position's logits.
LLAMA_CPP_ERROR = {"capital": 4.7e-2, "story": 3.5e-2}


@pytest.fixture(scope="module")
def smollm2(smollm2_model):
    yield smollm2_model
    smollm2_model.weights.set_matmul_mode("exact")


def ids(name: str, kind: str) -> list[int]:
    return [int(t) for t in shared_file("models", f"{NAME}.{name}.{kind}.ids").read_text().split()]


@pytest.mark.parametrize("prompt", ["capital", "story"])
def test_exact_mode_greedy_equals_the_float64_reference(smollm2, prompt):
    want = ids(prompt, "greedy")
    engine = LLMEngine(smollm2, EngineConfig(matmul_mode="exact"))
    engine.add_request(GenerationRequest("r", ids(prompt, "prompt"), len(want), SamplingParams(temperature=0),
                                         ignore_eos=True))   # `capital` runs on past <|im_end|>, as the reference
    got = []
    while engine.has_unfinished():
        for out in engine.step():
            got += out.token_ids
    assert got == want


@pytest.mark.parametrize("mode", ["exact", "int8", "auto"])
@pytest.mark.parametrize("prompt", ["capital", "story"])
def test_logits_are_at_least_as_close_as_llama_cpps(smollm2, prompt, mode):
    if mode != "exact" and not native.available():
        pytest.skip("no C kernels here: the int8 mode is theirs")
    ref = torch.from_numpy(np.load(shared_file("models", f"{NAME}.{prompt}.ref64.logits.npy")))
    smollm2.weights.set_matmul_mode(mode)
    try:
        ours = engine_logits(smollm2, ids(prompt, "prompt"))
    finally:
        smollm2.weights.set_matmul_mode("exact")
    assert_as_close_as_llama_cpp(ours, ref, LLAMA_CPP_ERROR[prompt], mode)


def test_int8_mode_batched_equals_solo(smollm2):
    """Activations are quantized per row, so a request's output alone equals its output in a batch."""
    import random

    from tests.engine.core.test_equivalence import assert_batched_equals_solo, make_requests
    if not native.available():
        pytest.skip("no C kernels here: the int8 mode is theirs")
    try:
        seed = random.randrange(2**32)
        assert_batched_equals_solo(smollm2, make_requests(49152, (4, 12), 40, False, seed), "int8", seed)
    finally:
        smollm2.weights.set_matmul_mode("exact")


def test_an_unknown_matmul_mode_is_refused():
    with pytest.raises(ValueError, match="matmul_mode must be one of exact, int8, auto, got 'fast'"):
        EngineConfig(matmul_mode="fast")


@pytest.mark.parametrize("isa", ["AVX2", "AVX-512", None])
def test_auto_mode_takes_int8_per_weight_type(smollm2, monkeypatch, isa):
    """auto: a linear in the int8 mode where its types' int8 kernels are the faster on the kernel
    build (kernels.auto_int8): every one on the AVX2 build, Q4_1 (the layers) but not Q8_0 (the
    output, the tied embedding) on the AVX-512 build, none on the scalar one. Its logits are then
    those of the int8 mode, of the two mixed, or of the exact mode."""
    from lumen.engine.model.linear import ConcatLinear, NativeQuantLinear
    if not native.available():
        pytest.skip("no C kernels here: the int8 mode is theirs")
    w = smollm2.weights
    prompt = ids("capital", "prompt")[:12]

    def flags(linear) -> set[bool]:
        return {p.int8 for p in (linear.parts if isinstance(linear, ConcatLinear) else [linear])
                if isinstance(p, NativeQuantLinear)}

    try:
        modes = {}
        for mode in ("exact", "int8"):
            w.set_matmul_mode(mode)
            modes[mode] = engine_logits(smollm2, prompt)
        monkeypatch.setattr(native, "vector_isa", lambda: isa)
        w.set_matmul_mode("auto")
        layers = set().union(*(flags(getattr(layer, n)) for layer in w.layers
                               for n in ("wqkv", "wo", "w_gate_up", "w_down")))
        assert layers == {isa is not None} and flags(w.output) == {isa == "AVX2"}
        auto = engine_logits(smollm2, prompt)
    finally:
        w.set_matmul_mode("exact")
    if isa == "AVX2":
        assert torch.equal(auto, modes["int8"])
    elif isa is None:
        assert torch.equal(auto, modes["exact"])
    else:
        assert not torch.equal(auto, modes["int8"]) and not torch.equal(auto, modes["exact"])
