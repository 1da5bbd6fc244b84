"""The model runner on the Triton placement (interpreted on a CPU device, float32): weights moved in
their stored form, logits against the float64 references, and the engine on it against the C
kernels' engine. What holds on a GPU in bfloat16 is bench/gpu_check.py's to show."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
from lumen.engine.core.request import GenerationRequest
from lumen.engine.model import linear as linear_module
from lumen.engine.model.attention import AttentionMetadata
from lumen.engine.model.device_weights import DeviceChunkedLinear, TritonQuantLinear
from lumen.engine.model.linear import (
    ConcatLinear,
    DenseLinear,
    NativeQuantLinear,
    OneDNNLinear,
    make_linear,
    plain_weights,
)
from lumen.engine.model.llama import ForwardBatch
from lumen.engine.model.placement import resolve_placement
from lumen.engine.model.runner import KVSizing, ModelRunner
from lumen.engine.sampling.sampler import SamplingParams
from lumen.engine.speculative import SpecMethod
from lumen.engine.speculative.config import SpeculativeParams
from lumen.engine.weights.gguf_loader import load_gguf
from tests.conftest import shared_file
from tests.engine.model.test_llama_reference import PROMPT, assert_as_close_as_llama_cpp

pytest.importorskip("triton")

# One file per path through the device weights: each packed type family, a mixed K-quant file,
# a type with no Triton kernel (decoded in chunks on the device), and 16-bit dense weights.
FILES = ["stories260K-Q4_0.gguf", "stories260K-Q8_0.gguf", "synth256-Q4_1.gguf", "synth256-Q5_0.gguf",
         "synth256-Q5_1.gguf", "synth256-Q2_K.gguf", "synth256-Q3_K_M.gguf", "synth256-Q4_K_M.gguf",
         "synth256-Q5_K_M.gguf", "synth256-Q6_K.gguf", "synth256-IQ4_XS.gguf", "synth256-F16.gguf",
         "synth256-BF16.gguf"]


@pytest.fixture(scope="module")
def triton_placement():
    from lumen.engine.triton_kernels import paged_attention
    if not paged_attention.INTERPRETED:
        pytest.skip("the kernels were imported without TRITON_INTERPRET=1 on a machine without CUDA")
    return resolve_placement("cpu", "triton")


def load_plain(path):
    with plain_weights():
        return load_gguf(path)


def runner_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    """All positions' logits of one prefill through the runner, blocks out of order."""
    block = runner.kv.spec.block_size
    table = list(reversed(range(-(-len(ids) // block))))
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [table], block)
    n = len(ids)
    return runner.forward(ForwardBatch(torch.tensor(ids), torch.arange(n), meta, torch.arange(n))).cpu()


def small_runner(loaded, placement) -> ModelRunner:
    return ModelRunner(loaded, placement, KVSizing(1 << 20, None, 4, 256, 64))


@pytest.mark.parametrize("name", FILES)
def test_logits_match_float64_reference(name, triton_placement):
    """As exact as the C kernels' exact mode: relative error under 1e-4, clear argmaxes equal."""
    path = shared_file("quant", name)
    ref = torch.from_numpy(np.load(shared_file("quant", name + ".ref64.logits.npy")))
    runner = small_runner(load_plain(path), triton_placement)
    assert_as_close_as_llama_cpp(runner_logits(runner, PROMPT), ref, 1.0, "exact")


@pytest.mark.parametrize("name", ["stories260K-Q8_0.gguf", "synth256-Q4_K_M.gguf", "synth256-IQ4_XS.gguf",
                                  "synth256-BF16.gguf"])
def test_bfloat16_activations(name, triton_placement):
    """The GPU's default dtype through the whole device path (the interpreter rounds activations,
    KV cache and logits inputs to bfloat16 as a GPU does, and multiplies in float32): quantized
    files within llama.cpp's own error, 16-bit files within 2e-2 (bfloat16's 8 bits)."""
    from tests.engine.weights.test_gguf_loader import LLAMA_CPP_ERROR
    path = shared_file("quant", name)
    ref = torch.from_numpy(np.load(shared_file("quant", name + ".ref64.logits.npy")))
    bf16 = dataclasses.replace(triton_placement, dtype=torch.bfloat16)   # CLI refuses it: tests only
    runner = small_runner(load_plain(path), bf16)
    assert runner.kv.keys[0].dtype == torch.bfloat16
    logits = runner_logits(runner, PROMPT)
    err = float((logits.double() - ref).abs().max() / ref.abs().max())
    bound = 2e-2 if "BF16" in name else LLAMA_CPP_ERROR[name]
    assert err <= bound, f"{name}: {err:.2e} > {bound:.1e}"


def test_weights_stay_in_their_stored_form(triton_placement):
    loaded = load_plain(shared_file("quant", "synth256-Q4_K_M.gguf"))
    runner = small_runner(loaded, triton_placement)
    kinds = {name: type(getattr(layer, name)) for layer in runner.model.w.layers
             for name in ("wqkv", "wo", "w_gate_up", "w_down")}
    assert kinds["w_gate_up"] is TritonQuantLinear                 # gate and up: one packed Q4_K weight
    assert kinds["wqkv"] in (TritonQuantLinear, ConcatLinear)      # Q4_K_M's attn_v is Q6_K in some layers
    # The device holds the file's quantized bytes, not a float copy (the tied embedding adds its rows).
    quant_bytes = sum(p.numel() for layer in loaded.weights.layers for lin in (layer.wo, layer.w_down)
                      for p in [lin.weight.raw])
    assert runner.weights_bytes < 2 * os.path.getsize(loaded.path)
    assert quant_bytes < runner.weights_bytes
    iq = small_runner(load_plain(shared_file("quant", "synth256-IQ4_XS.gguf")), triton_placement)
    assert any(isinstance(layer.w_down, DeviceChunkedLinear) for layer in iq.model.w.layers)


def test_plain_weights_are_not_prepacked(monkeypatch):
    weight = torch.randn(1024, 1024)
    cpu = make_linear(weight)
    assert isinstance(cpu, NativeQuantLinear) and cpu.weight.raw.data_ptr() == weight.data_ptr()   # a view
    with plain_weights():
        assert isinstance(make_linear(weight), DenseLinear)
    # Without the C kernels, float32 is oneDNN's prepacked GEMM (outside plain_weights).
    monkeypatch.setattr(linear_module, "_native_layout", lambda qtype: None)
    assert isinstance(make_linear(weight), OneDNNLinear) or not torch.backends.mkldnn.is_available()
    with plain_weights():
        assert isinstance(make_linear(weight), DenseLinear)


def run(engine: LLMEngine, requests: list[GenerationRequest]) -> dict[str, list]:
    """Each request's tokens, and its (prompt) logprobs as (token, logprob, top ids, top logprobs)."""
    for req in requests:
        engine.add_request(req)
    out: dict[str, list] = {req.request_id: [] for req in requests}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.token_ids
            out[o.request_id] += [(lp.token_id, lp.logprob, [t for t, _ in lp.top], [v for _, v in lp.top])
                                  for lp in o.prompt_logprobs + o.logprobs]
    engine.check_invariants()
    return out


def assert_same(ours: dict[str, list], theirs: dict[str, list]) -> None:
    """Tokens and top ids equal, logprobs within 1e-4."""
    assert ours.keys() == theirs.keys()
    for rid in ours:
        assert len(ours[rid]) == len(theirs[rid]), rid
        for a, b in zip(ours[rid], theirs[rid]):
            if isinstance(a, int):
                assert a == b, rid
            else:
                assert a[0] == b[0] and a[2] == b[2] and abs(a[1] - b[1]) < 1e-4, rid
                assert np.allclose(a[3], b[3], atol=1e-4), rid


def test_engine_on_the_runner_matches_the_c_kernels(triton_placement, stories_greedy, monkeypatch):
    """Greedy (plain; with logprobs computed beside the sampled tokens on the device; with prompt
    logprobs; with n-gram drafts verified from the rows' argmax on the device) equals the C
    kernels' engine, where logprobs come from the host's logits; alone equals batched."""
    from lumen.engine.model import runner as runner_module
    verified = []
    choices = runner_module._greedy_choices
    monkeypatch.setattr(runner_module, "_greedy_choices", lambda *a: verified.append(1) or choices(*a))
    oracle, _ = stories_greedy
    path = shared_file("quant", "stories260K-Q8_0.gguf")
    greedy = SamplingParams(temperature=0)

    def requests():
        return [GenerationRequest("plain", [1] + oracle[:3], 8, greedy, ignore_eos=True),
                GenerationRequest("logprobs", [1] + oracle[:5], 5, greedy, ignore_eos=True, logprobs=True,
                                  top_logprobs=3),
                GenerationRequest("scored", [1] + oracle[:9], 4, greedy, ignore_eos=True, prompt_logprobs=True),
                GenerationRequest("ngram", [1] + oracle[:80], 8, greedy, ignore_eos=True,
                                  speculative=SpeculativeParams(method=SpecMethod.NGRAM, num_tokens=3))]

    cpu = run(LLMEngine(load_gguf(path)), requests())
    device = LLMEngine(load_plain(path), EngineConfig(placement=triton_placement, kv_cache_bytes=1 << 20))
    assert_same(run(device, requests()), cpu)
    assert len([x for x in cpu["logprobs"] if not isinstance(x, int) and len(x[2]) == 3]) == 5
    assert len([x for x in cpu["scored"] if not isinstance(x, int)]) == 9   # the prompt's tokens after BOS
    assert verified, "the n-gram request's drafts were not verified on the device"
    assert_same(run(device, requests()[:1]), {"plain": cpu["plain"]})


def test_placement_refusals(monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_placement("cuda")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        resolve_placement("cpu", "native", "float16")
    with pytest.raises(ValueError, match="kernels must be one of"):
        resolve_placement("cpu", "cublas")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_placement("cpu", "triton")
    assert resolve_placement("cpu").kernels == "native"


def test_smollm2_logits_match_float64_reference(triton_placement, smollm2_ids_story):
    """SmolLM2 (Q4_1 layers, Q8_0 tied embedding, 30 layers) through every Triton kernel: each
    prompt position's logits as exact as the C kernels' exact mode (one prefill: interpreted,
    SmolLM2's 49152 x 576 output matmul alone takes seconds)."""
    prompt, greedy = smollm2_ids_story
    ref = torch.from_numpy(np.load(shared_file("models", "SmolLM2-135M-Instruct.story.ref64.logits.npy")))
    runner = ModelRunner(load_plain(shared_file("models", "SmolLM2-135M-Instruct.Q4_1.gguf")), triton_placement,
                         KVSizing(4 << 20, None, 16, 256, 64))
    logits = runner_logits(runner, prompt)
    assert_as_close_as_llama_cpp(logits[-ref.shape[0]:], ref, 1.0, "exact")
    assert int(logits[-1].argmax()) == greedy[0]


@pytest.fixture
def smollm2_ids_story():
    from tests.conftest import smollm2_ids
    return smollm2_ids("story", "prompt"), smollm2_ids("story", "greedy")


def test_decode_graph_buffers_give_the_eager_logits(triton_placement):
    """The CUDA-graph path's static buffers and padding (replayed eagerly here: capture needs a GPU):
    a decode step of 3 sequences padded to the ladder's 4 gives each sequence the logits and the
    KV cache an eager step gives it, and the padding row writes only the pad block."""
    from lumen.engine.model.llama import Chunk, build_batch

    loaded = load_plain(shared_file("quant", "stories260K-Q8_0.gguf"))
    sizing = KVSizing(1 << 20, None, 4, 256, 64)
    eager, graphs = small_runner(loaded, triton_placement), ModelRunner(loaded, triton_placement, sizing, 4, False)
    assert graphs.graphs.sizes == [1, 2, 4] and graphs.kv_spec == eager.kv_spec
    pad = graphs.graphs.pad_block
    assert graphs.kv.keys[0].shape[0] == pad + 1
    prompts = [[1, 403, 407], [1, 261, 378, 432, 383], [1, 286]]
    tables = [[0, 1], [2, 3], [4, 5]]

    def step(runner, chunks):
        batch, _ = build_batch(chunks, 4)
        return runner.forward(batch).cpu()

    prefill = [Chunk(p, 0, t, range(len(p) - 1, len(p))) for p, t in zip(prompts, tables)]
    torch.testing.assert_close(step(graphs, prefill), step(eager, prefill))
    assert not graphs.graphs.fits(build_batch(prefill, 4)[0])
    for i in range(3):
        decode = [Chunk([300 + i], len(p) + i, t, range(0, 1)) for p, t in zip(prompts, tables)]
        assert graphs.graphs.fits(build_batch(decode, 4)[0])
        # 4 padded rows against 3: torch's float32 GEMM may block them differently (it does on a
        # Zen 4, 1.6e-5 on logits of 15), so the bound is 1e-5 of the largest logit; a padding
        # bug (a wrong row, block or position) moves logits by whole units.
        padded, alone = step(graphs, decode), step(eager, decode)
        torch.testing.assert_close(padded, alone, rtol=0, atol=1e-5 * alone.abs().max().item())
    written = torch.tensor([t[pos // 4] * 4 + pos % 4 for p, t in zip(prompts, tables) for pos in range(len(p) + 3)])
    for ours, theirs in zip(graphs.kv.keys + graphs.kv.values, eager.kv.keys + eager.kv.values):
        torch.testing.assert_close(ours.flatten(0, 1)[written], theirs.flatten(0, 1)[written], rtol=1e-5, atol=1e-5)
    assert any(torch.count_nonzero(k[pad]) for k in graphs.kv.keys)   # the padding row wrote there


def test_random_batches_give_the_c_kernels_logits(triton_placement):
    """Random mixes of prefill chunks and decodes over shuffled blocks, step by step through the
    Triton runner and the C kernels' runner: the same logits (float32, 1e-4 of the largest)."""
    from lumen.engine.model.llama import Chunk, build_batch

    path = shared_file("quant", "stories260K-Q4_0.gguf")
    sizing = KVSizing(1 << 20, None, 4, 256, 64)
    device, cpu = small_runner(load_plain(path), triton_placement), ModelRunner(load_gguf(path), None, sizing)
    rng = np.random.default_rng(5)
    blocks = rng.permutation(cpu.kv_spec.num_blocks).tolist()
    seqs = []
    for s in range(4):
        tokens = rng.integers(3, 500, size=int(rng.integers(5, 30))).tolist()
        seqs.append({"tokens": [1] + tokens, "done": 0, "table": blocks[8 * s: 8 * s + 8]})
    while any(q["done"] < len(q["tokens"]) for q in seqs):
        chunks = []
        for q in seqs:
            left = len(q["tokens"]) - q["done"]
            if left and rng.random() < 0.8:
                n = min(left, int(rng.integers(1, 9)))
                chunks.append(Chunk(q["tokens"][q["done"]: q["done"] + n], q["done"], q["table"], range(n)))
                q["done"] += n
        if not chunks:
            continue
        batch, _ = build_batch(chunks, 4)
        ours, theirs = device.forward(batch).cpu(), cpu.forward(batch)
        assert float((ours - theirs).abs().max()) <= 1e-4 * float(theirs.abs().max())


def test_sampled_drafts_verified_on_the_device(triton_placement, stories_greedy, monkeypatch):
    """A seeded, sampled request with n-gram drafts on the Triton placement: its drafts are
    verified on the device (device_verify), and it gives the same tokens alone and among others."""
    from lumen.engine.model import runner as runner_module
    verified = []
    verdicts_of = runner_module._sampled_verdicts
    monkeypatch.setattr(runner_module, "_sampled_verdicts", lambda *a: verified.append(1) or verdicts_of(*a))
    oracle, _ = stories_greedy
    engine = LLMEngine(load_plain(shared_file("quant", "stories260K-Q8_0.gguf")),
                       EngineConfig(placement=triton_placement, kv_cache_bytes=1 << 20))

    def sampled(rid: str, seed: int) -> GenerationRequest:
        return GenerationRequest(rid, [1] + oracle[:80], 8, SamplingParams(temperature=0.7, seed=seed),
                                 ignore_eos=True, speculative=SpeculativeParams(method=SpecMethod.NGRAM, num_tokens=3))

    alone = run(engine, [sampled("s", 11)])
    together = run(engine, [sampled("s", 11), GenerationRequest("g", [1] + oracle[:5], 8, SamplingParams(
        temperature=0), ignore_eos=True)])
    assert together["s"] == alone["s"] and len(alone["s"]) == 8
    assert verified, "no sampled draft was verified on the device"
