"""Speculative decoding keeps exactly the target's outputs (greedy) and distribution (sampling),
inside continuous batching, with every KV block accounted for."""
from __future__ import annotations

import random

import pytest
import torch

from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
from lumen.engine.core.request import GenerationRequest
from lumen.engine.core.scheduler import SchedulerConfig
from lumen.engine.demo.demo_model import ensure_demo_model
from lumen.engine.errors import InvalidRequestError
from lumen.engine.model.kv_cache import KVCacheSpec
from lumen.engine.sampling.rejection import verify, verify_greedy_choices
from lumen.engine.sampling.sampler import Sampler, SamplingParams
from lumen.engine.speculative import Draft, SpecMethod, SpeculativeConfig, SpeculativeParams
from lumen.engine.speculative.ngram import find_ngram_match, propose_ngram
from lumen.engine.weights.gguf_loader import load_gguf
from tests.conftest import shared_file

METHODS = [SpecMethod.NGRAM, SpecMethod.LAYER_SKIP, SpecMethod.DRAFT, SpecMethod.AUTO]
# Chi-square checks reject at this p-value. The seeds are fixed, so a run is reproducible; with
# fresh seeds each check would fail falsely with this probability.
ALPHA = 1e-4


@pytest.fixture(scope="module")
def draft_model():
    return load_gguf(shared_file("models", "llama2xs-stories-tok512.gguf"))


def spec_engine(target, draft, k: int = 4, max_running: int = 16, **scheduler) -> LLMEngine:
    config = EngineConfig(scheduler=SchedulerConfig(max_running=max_running, **scheduler),
                          speculative=SpeculativeConfig(num_tokens=k, max_batch=64))
    return LLMEngine(target, config, draft=draft)


def run_all(engine: LLMEngine, reqs: list[GenerationRequest], check_every_step: bool = False):
    for r in reqs:
        engine.add_request(r)
    outputs: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id] += out.token_ids
            if out.finished:
                finals[out.request_id] = out
        if check_every_step:
            engine.check_invariants()
    engine.check_invariants()
    return outputs, finals


def request(rid: str, prompt: list[int], n: int, method: SpecMethod | None, sampling=None, k=None):
    return GenerationRequest(rid, prompt, n, sampling or SamplingParams(temperature=0), ignore_eos=True,
                             speculative=SpeculativeParams(method, k))


# --- n-gram lookup ---------------------------------------------------------------------------

def test_ngram_continues_the_latest_longest_match():
    #         0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 1, 5, 6, 9, 2, 5, 6]
    assert propose_ngram(tokens, 3, ngram_max=2, ngram_min=1) == [9, 2, 5]   # "5 6" last seen at 4
    assert propose_ngram([1, 2, 3, 4, 2, 3], 2, ngram_max=3, ngram_min=1) == [4, 2]
    assert propose_ngram([3, 1, 2, 9, 1, 2], 2, ngram_max=1, ngram_min=1) == [9, 1]  # "2" last at 2


def test_ngram_match_reports_its_length_and_latest_end():
    assert find_ngram_match([5, 6, 7, 1, 5, 6, 9, 2, 5, 6], ngram_max=4, ngram_min=1) == (2, 5)
    assert find_ngram_match([1, 2, 3, 1, 2, 3], ngram_max=2, ngram_min=1) == (2, 2)   # capped at ngram_max
    assert find_ngram_match([1, 2, 3, 4], ngram_max=4, ngram_min=1) == (0, -1)


def test_ngram_without_a_match_proposes_nothing():
    assert propose_ngram([1, 2, 3, 4], 4, ngram_max=3, ngram_min=1) == []
    assert propose_ngram([1, 2, 9, 2], 4, ngram_max=3, ngram_min=2) == []   # only a 1-gram matches
    assert propose_ngram([7], 4, ngram_max=3, ngram_min=1) == []


# --- greedy equivalence ----------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.value)
def test_greedy_200_from_bos_equals_the_oracle(stories_model, draft_model, stories_greedy, method):
    want_ids, want_text = stories_greedy
    engine = spec_engine(stories_model, draft_model)
    req = request("a", [stories_model.tokenizer.bos_id], 200, method)
    outputs, finals = run_all(engine, [req])
    assert outputs["a"] == want_ids[:200]
    assert finals["a"].draft_tokens > 0, "nothing was drafted: the test did not exercise speculation"
    text = stories_model.tokenizer.decode(outputs["a"])
    assert want_text.startswith(text)


def test_outputs_carry_several_verified_tokens(stories_model, draft_model):
    engine = spec_engine(stories_model, draft_model)
    engine.add_request(request("a", [stories_model.tokenizer.bos_id], 60, SpecMethod.DRAFT))
    sizes, text = [], ""
    while engine.has_unfinished():
        for out in engine.step():
            sizes.append(len(out.token_ids))
            text += out.text
    assert max(sizes) > 1 and sum(sizes) == 60
    assert 0 < out.accepted_tokens <= out.draft_tokens
    assert text == stories_model.tokenizer.decode(engine_tokens(stories_model, 60))


def engine_tokens(model, n: int) -> list[int]:
    outputs, _ = run_all(LLMEngine(model), [request("solo", [model.tokenizer.bos_id], n, None)])
    return outputs["solo"]


def mixed_requests(vocab: int, seed: int, sampled: bool) -> list[GenerationRequest]:
    rng = random.Random(seed)
    reqs = []
    for i in range(16):
        prompt = [1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(0, 40))]
        sampling = (SamplingParams(temperature=0.8, top_k=40, seed=rng.randrange(2**32)) if sampled
                    else SamplingParams(temperature=0))
        method = rng.choice(METHODS + [SpecMethod.NONE])
        reqs.append(request(str(i), prompt, rng.randint(1, 50), method, sampling, k=rng.randint(1, 6)))
    return reqs


def test_16_concurrent_mixed_greedy_requests_equal_solo(stories_model, draft_model):
    seed = random.randrange(2**32)
    reqs = mixed_requests(512, seed, sampled=False)
    solo = {}
    for r in reqs:
        plain = request(r.request_id, r.prompt_ids, r.max_new_tokens, SpecMethod.NONE)
        solo.update(run_all(LLMEngine(stories_model), [plain])[0])
    batched, finals = run_all(spec_engine(stories_model, draft_model, max_tokens_per_step=64), reqs)
    assert batched == solo, f"mixed_requests seed {seed}"
    assert sum(f.draft_tokens for f in finals.values()) > 0


def test_seeded_speculative_sampling_is_reproducible_in_a_batch(stories_model, draft_model):
    seed = random.randrange(2**32)
    reqs = mixed_requests(512, seed, sampled=True)
    first, _ = run_all(spec_engine(stories_model, draft_model), reqs)
    again, _ = run_all(spec_engine(stories_model, draft_model), reqs)
    assert first == again, f"mixed_requests seed {seed}"


# --- the target's distribution ---------------------------------------------------------------

def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P-value of Pearson's test of counts against probs, rare categories (expected < 5) pooled."""
    n = int(counts.sum())
    expected = probs / probs.sum() * n
    keep = expected >= 5
    obs = torch.cat([counts[keep].double(), counts[~keep].double().sum().reshape(1)])
    exp = torch.cat([expected[keep].double(), expected[~keep].double().sum().reshape(1)])
    if exp[-1] < 5:  # too little pooled mass to be its own category: fold it into the largest
        big = int(torch.argmax(exp[:-1]))
        obs[big] += obs[-1]
        exp[big] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("deterministic_draft", [False, True], ids=["sampled-draft", "one-hot-draft"])
def test_rejection_sampling_reproduces_the_target_distribution(deterministic_draft):
    """verify() alone, on fixed logits: the first emitted token follows p0; the second, when the
    first draft token was accepted, follows p1 (here p1 does not depend on the first token)."""
    vocab, trials = 12, 20000
    gen = torch.Generator().manual_seed(1234)
    target = torch.randn(3, vocab, generator=gen) * 2
    draft_logits = torch.randn(2, vocab, generator=gen) * 2
    params = SamplingParams(temperature=0.9, top_k=9, top_p=0.95, min_p=0.02, seed=77)
    sampler = Sampler(params)
    p = [sampler.distribution(target[i], []) for i in range(2)]
    q = [sampler.distribution(draft_logits[i], []) for i in range(2)]
    q = [x / x.sum() for x in q]
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    for _ in range(trials):
        if deterministic_draft:
            draft = Draft([int(torch.argmax(draft_logits[0])), int(torch.argmax(draft_logits[1]))])
        else:
            draft = Draft([sampler.draw(q[0]), sampler.draw(q[1])], torch.stack(q))
        out, accepted = verify(sampler, target, draft, [])
        assert len(out) == accepted + 1 and out[:accepted] == draft.tokens[:accepted]
        first[out[0]] += 1
        if accepted >= 1:
            second[out[1]] += 1
    assert chi_square_p_value(first, p[0]) > ALPHA, (first, p[0])
    assert second.sum() > 1000
    assert chi_square_p_value(second, p[1]) > ALPHA, (second, p[1])


@pytest.mark.parametrize("method", [SpecMethod.DRAFT, SpecMethod.NGRAM], ids=lambda m: m.value)
def test_engine_sampling_follows_the_target_distribution(stories_model, draft_model, method):
    """End to end: the 2nd generated token (the first one that speculation produces), among runs
    whose 1st token is the most likely one, is distributed as the target says after it."""
    tok = stories_model.tokenizer
    # A prompt whose text repeats, so that n-gram lookup has something to propose.
    prompt = tok.encode("Once upon a time, there was a cat. Once upon a time, there was", add_special_tokens=True)
    params = dict(temperature=1.0, top_k=20)
    # The target's own distributions, from a plain engine's logits.
    first_probs = target_probs(stories_model, prompt, params)
    t1 = int(torch.argmax(first_probs))
    second_probs = target_probs(stories_model, prompt + [t1], params)
    counts = torch.zeros_like(second_probs)
    seeds = iter(range(10**6))
    while counts.sum() < 1000:
        reqs = [request(str(s), prompt, 3, method, SamplingParams(seed=s, **params), k=3) for s in
                (next(seeds) for _ in range(64))]
        outputs, finals = run_all(spec_engine(stories_model, draft_model, max_running=64), reqs)
        for ids in outputs.values():
            if ids[0] == t1:
                counts[ids[1]] += 1
    assert sum(f.draft_tokens for f in finals.values()) > 0
    assert chi_square_p_value(counts, second_probs) > ALPHA


def target_probs(model, prompt: list[int], params: dict) -> torch.Tensor:
    """The target's filtered next-token distribution after prompt, from a plain engine's logits."""
    engine = LLMEngine(model)
    engine.add_request(GenerationRequest("p", prompt, 1, SamplingParams(seed=0, **params)))
    seq = engine.scheduler.waiting[0]
    computed, captured = seq.on_computed, {}

    def capture(logits: torch.Tensor, num_new: int, *sampled):
        captured["logits"] = logits[-1].clone()
        return computed(logits, num_new, *sampled)

    seq.on_computed = capture
    while engine.has_unfinished():
        engine.step()
    p = Sampler(SamplingParams(**params)).distribution(captured["logits"], prompt)
    return p / p.sum()


# --- no leaks ----------------------------------------------------------------------------------

def test_randomized_speculative_runs_with_cancellations_leak_no_blocks(stories_model, draft_model):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    # A small pool: drafts get cut, requests get preempted and recomputed.
    block_bytes = KVCacheSpec.bytes_per_block(stories_model.config, 16, torch.float32)
    config = EngineConfig(scheduler=SchedulerConfig(max_running=12, max_tokens_per_step=96),
                          kv_cache_bytes=40 * block_bytes, block_size=16,
                          speculative=SpeculativeConfig(num_tokens=4, max_batch=64))
    engine = LLMEngine(stories_model, config, draft=draft_model)
    live, submitted, cancelled = set(), 0, 0
    greedy_reqs = {}
    outputs: dict[str, list[int]] = {}
    for step in range(400):
        if submitted < 150 and rng.random() < 0.5:
            rid = f"r{submitted}"
            prompt = [1] + [rng.randrange(3, 512) for _ in range(rng.randrange(0, 60))]
            sampled = rng.random() < 0.4
            sampling = SamplingParams(temperature=0.9, seed=rng.randrange(2**32)) if sampled else None
            req = request(rid, prompt, rng.randint(1, 80), rng.choice(METHODS + [SpecMethod.NONE]), sampling,
                          k=rng.randint(1, 8))
            engine.add_request(req)
            if not sampled:
                greedy_reqs[rid] = req
            live.add(rid)
            outputs[rid] = []
            submitted += 1
        if live and rng.random() < 0.15:
            rid = rng.choice(sorted(live))
            if engine.abort_request(rid) is not None:
                cancelled += 1
                greedy_reqs.pop(rid, None)
            live.discard(rid)
        for out in engine.step():
            outputs[out.request_id] += out.token_ids
            if out.finished:
                live.discard(out.request_id)
        engine.check_invariants()
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id] += out.token_ids
        engine.check_invariants()
    assert engine.blocks.num_free == engine.blocks.num_blocks, f"target blocks leaked (seed {seed})"
    drafting = engine.speculation.draft.blocks
    assert drafting.num_free == drafting.num_blocks, f"draft-model blocks leaked (seed {seed})"
    assert cancelled > 0 and engine.scheduler.num_preemptions > 0, f"seed {seed} exercised too little"
    for rid, req in list(greedy_reqs.items())[:12]:
        plain = request(rid, req.prompt_ids, req.max_new_tokens, SpecMethod.NONE)
        assert outputs[rid] == run_all(LLMEngine(stories_model), [plain])[0][rid], f"{rid} (seed {seed})"


# --- bad input -------------------------------------------------------------------------------

def test_draft_with_another_vocabulary_is_refused(stories_model):
    other = load_gguf(ensure_demo_model())
    assert other.config.vocab_size != stories_model.config.vocab_size
    with pytest.raises(ValueError, match="same vocabulary"):
        LLMEngine(stories_model, draft=other)


def test_draft_method_without_a_draft_model_is_an_invalid_request(stories_model):
    engine = LLMEngine(stories_model)
    with pytest.raises(InvalidRequestError, match="draft-model"):
        engine.add_request(request("a", [1], 4, SpecMethod.DRAFT))
    with pytest.raises(ValueError, match="draft model"):
        LLMEngine(stories_model, EngineConfig(speculative=SpeculativeConfig(method=SpecMethod.DRAFT)))


@pytest.mark.parametrize("k", [0, 17])
def test_draft_length_out_of_range_is_an_invalid_request(k):
    with pytest.raises(InvalidRequestError, match="num_tokens"):
        SpeculativeParams(SpecMethod.NGRAM, k)


def test_method_names_parse_with_a_clear_error():
    assert SpecMethod.parse("layer-skip") is SpecMethod.LAYER_SKIP
    with pytest.raises(InvalidRequestError, match="ngram"):
        SpecMethod.parse("bogus")


def test_speculation_turns_off_in_large_batches(stories_model):
    config = EngineConfig(speculative=SpeculativeConfig(method=SpecMethod.NGRAM, max_batch=2))
    reqs = [request(str(i), [stories_model.tokenizer.bos_id], 120, None) for i in range(4)]
    _, finals = run_all(LLMEngine(stories_model, config), reqs)
    assert all(f.draft_tokens == 0 for f in finals.values())
    _, finals = run_all(LLMEngine(stories_model, config), reqs[:1])
    assert finals["0"].draft_tokens > 0


def test_adaptive_draft_length_schedule():
    from lumen.engine.speculative.config import adapt_draft_length
    assert adapt_draft_length(2, proposed=2, accepted=2, k_max=4) == 4      # all accepted: 2 more
    assert adapt_draft_length(4, proposed=4, accepted=4, k_max=4) == 4      # never above the request's k
    assert adapt_draft_length(4, proposed=4, accepted=3, k_max=4) == 3      # a rejection: 1 fewer
    assert adapt_draft_length(1, proposed=1, accepted=0, k_max=4) == 1      # never below 1
    assert adapt_draft_length(3, proposed=2, accepted=2, k_max=8) == 5      # a short n-gram draft, all taken


@pytest.mark.parametrize("method", [SpecMethod.NGRAM, SpecMethod.DRAFT], ids=lambda m: m.value)
def test_adaptive_draft_length_keeps_greedy_outputs_and_follows_acceptance(stories_model, draft_model,
                                                                           stories_greedy, method):
    ids, _ = stories_greedy
    config = EngineConfig(scheduler=SchedulerConfig(max_running=16),
                          speculative=SpeculativeConfig(num_tokens=6, max_batch=64, adaptive=True))
    engine = LLMEngine(stories_model, config, draft=draft_model)
    lengths: list[int] = []
    original = engine.speculation.propose

    def spy(running):
        original(running)
        lengths.extend(len(s.draft.tokens) for s in running if s.draft is not None)
    engine.speculation.propose = spy
    outputs, finals = run_all(engine, [request("r", [stories_model.tokenizer.bos_id], 200, method)])
    assert outputs["r"] == ids[:200]
    assert finals["r"].draft_tokens == sum(lengths) and set(lengths) - {1, 2, 3, 4, 5, 6} == set()
    assert len(set(lengths)) > 1, "the draft length never moved"


def test_greedy_verification_from_the_rows_argmax_equals_verify():
    """The model runner verifies greedy drafts from each row's argmax on the device: the same
    tokens and acceptance as verify() on the logits, on fresh random cases."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        k = int(torch.randint(1, 6, (), generator=gen))
        logits = torch.randn(k + 1, 12, generator=gen)
        choices = logits.argmax(-1).tolist()
        # Drafts that agree with the target for a random prefix, then anything.
        agree = int(torch.randint(0, k + 1, (), generator=gen))
        draft = choices[:agree] + torch.randint(0, 12, (k - agree,), generator=gen).tolist()
        expected = verify(Sampler(SamplingParams(temperature=0)), logits, Draft(draft, None), [1, 2])
        assert verify_greedy_choices(choices, draft) == expected
