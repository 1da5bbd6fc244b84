"""LoRA in the engine: an adapter's logits equal the merged model's, requests of different
adapters (and none) in one batch each equal their solo run, the prefix cache never crosses
adapters, speculation drafts with the request's adapter, and loading/unloading keeps every
count right (stories260K, float32, random adapters made here)."""
from __future__ import annotations

import random

import pytest
import torch

from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
from lumen.engine.core.request import GenerationRequest
from lumen.engine.core.scheduler import SchedulerConfig
from lumen.engine.errors import FailedPreconditionError, InvalidRequestError
from lumen.engine.lora.registry import AdapterExistsError, AdapterNotFoundError, LoraConfig
from lumen.engine.sampling.sampler import SamplingParams
from lumen.engine.speculative import SpecMethod
from lumen.engine.speculative.config import SpeculativeConfig, SpeculativeParams
from tests.engine.lora.helpers import merged_model, prompt_logits, random_adapter

PROMPT = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 300, 290]


def engine_with(model, adapters: dict, **config) -> LLMEngine:
    engine = LLMEngine(model, EngineConfig(**config))
    for name, adapter in adapters.items():
        engine.load_adapter(name, adapter)
    return engine


def generate(engine: LLMEngine, reqs: list[GenerationRequest]) -> dict[str, list[int]]:
    for r in reqs:
        engine.add_request(r)
    out = {r.request_id: [] for r in reqs}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.token_ids
        engine.check_invariants()
    return out


def request(rid: str, prompt: list[int], n: int, adapter: str = "", scale: float = 1.0, sampled_seed=None,
            **kw) -> GenerationRequest:
    params = SamplingParams(temperature=0.8, top_k=40, seed=sampled_seed) if sampled_seed is not None \
        else SamplingParams(temperature=0)
    return GenerationRequest(rid, prompt, n, params, ignore_eos=True, adapter=adapter, lora_scale=scale, **kw)


@pytest.mark.parametrize("targets", ["all", "attn", "mlp"])
def test_adapted_logits_equal_the_merged_models(stories_model, targets):
    picked = {"all": ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"),
              "attn": ("attn_q", "attn_v"), "mlp": ("ffn_down",)}[targets]
    adapter = random_adapter(stories_model.config, 4, seed=1, targets=picked)
    engine = engine_with(stories_model, {"a": adapter})
    weights = engine.lora.get("a").weights
    for scale in (1.0, 0.5):
        ours = prompt_logits(engine, PROMPT, (weights, scale))
        ref = prompt_logits(LLMEngine(merged_model(stories_model, adapter, scale)), PROMPT)
        base = prompt_logits(engine, PROMPT)
        assert (ref - base).abs().max() > 0.1, "the adapter should change the logits visibly"
        err = (ours - ref).abs().max() / ref.abs().max()
        assert err < 1e-4, f"relative error {err:.2e} against the merged weights"   # float32 rounding


def test_sixteen_requests_over_four_adapters_and_the_base_equal_solo(stories_model):
    cfg = stories_model.config
    adapters = {f"a{i}": random_adapter(cfg, rank, seed=10 + i) for i, rank in enumerate((2, 4, 8, 16))}
    rng = random.Random(5)
    reqs = []
    for i in range(16):
        prompt = [1] + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 40))]
        adapter = ["", "a0", "a1", "a2", "a3"][i % 5]
        reqs.append(request(str(i), prompt, rng.randint(5, 40), adapter, scale=1.0 if i % 3 else 0.7,
                            sampled_seed=rng.randrange(2**32) if i % 2 else None))
    solo = {}
    for r in reqs:
        one = engine_with(stories_model, adapters, scheduler=SchedulerConfig(max_running=1))
        solo.update(generate(one, [r]))
    many = engine_with(stories_model, adapters, scheduler=SchedulerConfig(max_running=16, max_tokens_per_step=64))
    assert generate(many, reqs) == solo
    # Distinct adapters (and the base) really answer differently for one prompt.
    answers = generate(engine_with(stories_model, adapters), [request(f"p{a}", PROMPT, 12, a)
                                                              for a in ("", "a0", "a1", "a2", "a3")])
    assert len({tuple(v) for v in answers.values()}) == 5


def test_the_prefix_cache_never_crosses_adapters(stories_model):
    adapter = random_adapter(stories_model.config, 4, seed=2)
    engine = engine_with(stories_model, {"a": adapter, "b": adapter}, block_size=4)
    prompt = PROMPT * 2
    first = {}

    def cached(rid: str, name: str) -> int:
        engine.add_request(request(rid, prompt, 2, name))
        while engine.has_unfinished():
            for o in engine.step():
                first.setdefault(rid, o.cached_tokens)
        engine.check_invariants()
        return first[rid]

    assert cached("base", "") == 0
    assert cached("a1", "a") == 0        # the base's blocks hold other keys and values
    assert cached("a2", "a") > 0         # the same adapter shares
    assert cached("b1", "b") == 0        # the same tensors under another load: not shared
    assert cached("base2", "") > 0
    engine.unload_adapter("a")
    engine.load_adapter("a", adapter)    # a reload is a new adapter
    assert cached("a3", "a") == 0


def test_unload_waits_for_its_requests_and_reload_works(stories_model):
    adapter = random_adapter(stories_model.config, 4, seed=3)
    engine = engine_with(stories_model, {"a": adapter})
    want = generate(engine, [request("x", PROMPT, 10, "a")])["x"]
    engine.add_request(request("y", PROMPT, 10, "a"))
    engine.step()
    with pytest.raises(FailedPreconditionError, match="in use by 1 request"):
        engine.unload_adapter("a")
    while engine.has_unfinished():
        engine.step()
    engine.unload_adapter("a")
    with pytest.raises(AdapterNotFoundError, match="'a' is not loaded"):
        engine.add_request(request("z", PROMPT, 10, "a"))
    engine.load_adapter("a", adapter)
    assert generate(engine, [request("w", PROMPT, 10, "a")])["w"] == want
    # An abort releases the adapter too.
    engine.add_request(request("v", PROMPT, 10, "a"))
    engine.step()
    engine.abort_request("v")
    engine.check_invariants()
    engine.unload_adapter("a")
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_bad_requests_and_loads_are_refused_clearly(stories_model):
    adapter = random_adapter(stories_model.config, 4, seed=4)
    engine = engine_with(stories_model, {"a": adapter}, lora=LoraConfig(max_loras=2, max_rank=8))
    with pytest.raises(AdapterNotFoundError, match=r"'nope' is not loaded \(loaded: a\)"):
        engine.add_request(request("r", PROMPT, 4, "nope"))
    for scale in (-1.0, 11.0, float("nan")):
        with pytest.raises(InvalidRequestError, match=r"lora_scale: must be in \[0, 10\]"):
            engine.add_request(request("r", PROMPT, 4, "a", scale=scale))
    with pytest.raises(AdapterExistsError, match="already loaded"):
        engine.load_adapter("a", adapter)
    with pytest.raises(InvalidRequestError, match="is not an adapter name"):
        engine.load_adapter("bad name!", adapter)
    engine.load_adapter("b", adapter)
    with pytest.raises(FailedPreconditionError, match="--max-loras 2"):
        engine.load_adapter("c", adapter)
    assert not engine.has_unfinished()
    engine.check_invariants()


def test_layer_skip_and_ngram_draft_with_the_requests_adapter(stories_model, stories_draft_model):
    adapter = random_adapter(stories_model.config, 4, seed=6, size=0.15)
    plain = generate(engine_with(stories_model, {"a": adapter}), [request("p", PROMPT, 30, "a")])["p"]
    for method in (SpecMethod.LAYER_SKIP, SpecMethod.NGRAM):
        engine = engine_with(stories_model, {"a": adapter})
        r = request("s", PROMPT, 30, "a", speculative=SpeculativeParams(method=method, num_tokens=3))
        assert generate(engine, [r])["s"] == plain
        if method is SpecMethod.LAYER_SKIP:
            assert engine.speculation.layer_skip is not None
    # A draft model has no adapter: asked for, it is refused; as the server's default, the request decodes plainly.
    engine = LLMEngine(stories_model, EngineConfig(speculative=SpeculativeConfig(method=SpecMethod.DRAFT)),
                       draft=stories_draft_model)
    engine.load_adapter("a", adapter)
    with pytest.raises(InvalidRequestError, match="'draft' cannot draft for LoRA adapter 'a'"):
        engine.add_request(request("d", PROMPT, 30, "a", speculative=SpeculativeParams(method=SpecMethod.DRAFT)))
    assert generate(engine, [request("d", PROMPT, 30, "a")])["d"] == plain


def test_the_c_layers_adapt_rows_as_torch_does_and_base_rows_pay_nothing(smollm2_model, monkeypatch):
    """With the C kernels' fused layers (a quantized model), LoRA rows are adapted inside each
    layer's one C call (lora.c) and give the torch path's logits; a step without adapter rows
    runs exactly as before, adapters loaded or not."""
    from lumen.engine.lora.weights import LoraStep
    model = smollm2_model
    adapters = {"a": random_adapter(model.config, 16, seed=7, size=0.02),
                "b": random_adapter(model.config, 8, seed=8, targets=("attn_k", "ffn_up"), size=0.02)}
    engine = engine_with(model, adapters)
    if engine.model.layer_structs is None:
        pytest.skip("no fused C layers here (no C compiler)")
    want = generate(LLMEngine(model), [request("base", PROMPT, 8)])["base"]
    assert generate(engine, [request("base", PROMPT, 8)])["base"] == want

    def batch_logits():
        from lumen.engine.model.llama import Chunk, build_batch
        chunks = [Chunk(PROMPT[:n], 0, [i * 4 + j for j in range(4)], range(n), lora) for i, (n, lora) in enumerate(
            [(9, (engine.lora.get("a").weights, 1.0)), (5, None), (18, (engine.lora.get("b").weights, 0.5)),
             (1, (engine.lora.get("a").weights, 1.0))])]
        return engine.runner.forward(build_batch(chunks, engine.blocks.block_size)[0])

    fused = batch_logits()
    monkeypatch.setattr(LoraStep, "native_struct", lambda self, n: None)   # the torch path instead
    rowwise = batch_logits()
    assert (fused - rowwise).abs().max() / rowwise.abs().max() < 1e-5
    assert torch.equal(fused[9:14], rowwise[9:14])   # the base rows: the same kernels, the same bits


def test_the_triton_placement_adapts_rows_as_the_cpu_does(stories_path):
    """The stacked Triton kernels (interpreted here) give the torch path's logits for a batch of
    rows of two adapters and none."""
    from lumen.engine.model.linear import plain_weights
    from lumen.engine.model.llama import Chunk, build_batch
    from lumen.engine.model.placement import resolve_placement
    from lumen.engine.triton_kernels import paged_attention
    from lumen.engine.weights.gguf_loader import load_gguf
    if not paged_attention.INTERPRETED:
        pytest.skip("the kernels were imported without TRITON_INTERPRET=1 on a machine without CUDA")
    cpu_model = load_gguf(stories_path)
    with plain_weights():
        device_model = load_gguf(stories_path)
    adapters = {"a": random_adapter(cpu_model.config, 4, seed=20),
                "b": random_adapter(cpu_model.config, 8, seed=21, targets=("attn_q", "ffn_down"))}
    cpu = engine_with(cpu_model, adapters)
    device = engine_with(device_model, adapters, placement=resolve_placement("cpu", "triton"), kv_cache_bytes=1 << 20)
    assert device.lora.stack is not None and cpu.lora.stack is None
    block = cpu.blocks.block_size

    def logits(engine):
        chunks, start = [], 0
        for name, ids in (("a", PROMPT[:7]), ("", PROMPT[:5]), ("b", PROMPT), ("a", PROMPT[:3])):
            n_blocks = -(-len(ids) // block)
            lora = (engine.lora.get(name).weights, 0.8) if name else None
            chunks.append(Chunk(ids, 0, list(range(start, start + n_blocks)), range(len(ids)), lora))
            start += n_blocks
        return engine.runner.forward(build_batch(chunks, block)[0]).cpu()

    want, got = logits(cpu), logits(device)
    assert (got - want).abs().max() / want.abs().max() < 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_the_c_layers_check_the_lora_indices_before_writing(smollm2_model, monkeypatch):
    """A row naming no adapter of the step, or a target whose columns overflow its linear, is
    refused by lumen_lora_check before the layer writes anything."""
    from lumen.engine.lora.weights import LoraStep
    from lumen.engine.model.llama import Chunk, build_batch
    from lumen.engine.native.kernels import NativeInputError
    engine = engine_with(smollm2_model, {"a": random_adapter(smollm2_model.config, 4, seed=9, size=0.02)})
    if engine.model.layer_structs is None:
        pytest.skip("no fused C layers here (no C compiler)")
    weights = engine.lora.get("a").weights
    real = LoraStep.native_struct
    for damage in ("row", "columns"):
        def damaged(self, n_layers, damage=damage):
            struct, keep = real(self, n_layers)
            if damage == "row":
                keep[0][0] = 5
            else:
                weights.native[0][0].t[0].col = 10_000
            return struct, keep
        monkeypatch.setattr(LoraStep, "native_struct", damaged)
        batch, _ = build_batch([Chunk(PROMPT[:4], 0, [0], range(4), (weights, 1.0))], engine.blocks.block_size)
        with pytest.raises(NativeInputError):
            engine.runner.forward(batch)


def test_the_c_layers_give_each_request_its_solo_output_in_a_mixed_batch(smollm2_model):
    """SmolLM2 (Q4_1: the fused C layers with lora.c): 16 requests over 4 adapters and the base,
    greedy and seeded-sampled, each equal to its run alone."""
    cfg = smollm2_model.config
    adapters = {f"a{i}": random_adapter(cfg, rank, seed=30 + i, size=0.02) for i, rank in enumerate((4, 8, 16, 64))}
    rng = random.Random(7)
    reqs = [request(str(i), [rng.randrange(3, cfg.vocab_size) for _ in range(rng.randrange(1, 12))],
                    rng.randint(2, 8), ["", "a0", "a1", "a2", "a3"][i % 5], scale=1.0 if i % 3 else 0.5,
                    sampled_seed=rng.randrange(2**32) if i % 2 else None) for i in range(16)]
    solo_engine = engine_with(smollm2_model, adapters, scheduler=SchedulerConfig(max_running=1),
                              kv_cache_bytes=64 << 20)
    if solo_engine.model.layer_structs is None:
        pytest.skip("no fused C layers here (no C compiler)")
    solo = {}
    for r in reqs:
        solo.update(generate(solo_engine, [r]))
    many = engine_with(smollm2_model, adapters, scheduler=SchedulerConfig(max_running=16), kv_cache_bytes=64 << 20)
    assert generate(many, reqs) == solo
