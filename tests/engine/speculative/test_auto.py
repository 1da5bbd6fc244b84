"""SpecMethod.AUTO (lumen.engine.speculative.auto): n-gram drafts only after a match, as long as
the match makes likely, cut to the batch's row budget; greedy output unchanged."""
from __future__ import annotations

import types

from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
from lumen.engine.speculative import SpecMethod, SpeculativeConfig, SpeculativeParams
from lumen.engine.speculative.auto import auto_draft_length, cut_to_rows, propose_auto
from lumen.engine.speculative.ngram import find_ngram_match
from tests.engine.speculative.test_speculative import request, run_all


def fake_seq(tokens: list[int]):
    """What propose_auto reads and writes of a Sequence."""
    return types.SimpleNamespace(token_ids=tokens, draft=None)


def test_auto_draft_length_follows_the_match_length():
    assert auto_draft_length(0, k=7, ngram_max=4) == 0     # no match: no draft, one row verified
    assert auto_draft_length(1, k=7, ngram_max=4) == 1
    assert auto_draft_length(2, k=7, ngram_max=4) == 3
    assert auto_draft_length(3, k=2, ngram_max=4) == 2     # never above the request's k
    assert auto_draft_length(4, k=7, ngram_max=4) == 7


def test_auto_drafts_only_where_the_tokens_repeat():
    repeats, fresh = fake_seq([1, 2, 3, 4, 5, 9, 1, 2, 3]), fake_seq([1, 2, 3, 4, 5, 6, 7, 8])
    propose_auto([(repeats, 7), (fresh, 7)], num_decoding=1, ngram_max=4, ngram_min=1, batch_rows=4)
    assert repeats.draft.tokens == [4, 5, 9]   # a 3-token match drafts 3 tokens
    assert fresh.draft is None                 # no earlier occurrence of 8: nothing to verify


def test_auto_cuts_the_longest_drafts_to_fit_a_batch():
    drafts = [[1, 2, 3, 4, 5, 6, 7], [1], [1, 2, 3]]
    cut_to_rows(drafts, 3)
    assert [len(d) for d in drafts] == [1, 1, 1]
    long_match = [7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4]
    seqs = [fake_seq(list(long_match)) for _ in range(3)]
    propose_auto([(s, 7) for s in seqs], num_decoding=3, ngram_max=4, ngram_min=1, batch_rows=4)
    assert sum(len(s.draft.tokens) for s in seqs if s.draft is not None) == 1   # 3 rows + 1 drafted
    propose_auto([(s, 7) for s in seqs[:1]], num_decoding=1, ngram_max=4, ngram_min=1, batch_rows=4)
    assert seqs[0].draft.tokens == [5, 6, 7, 8, 9, 1, 2]   # a lone request drafts its full k


def test_auto_keeps_greedy_outputs_and_drafts_only_after_a_match(stories_model):
    tok = stories_model.tokenizer
    prompt = tok.encode("Once upon a time, there was a cat. Once upon a time, there was", add_special_tokens=True)
    engine = LLMEngine(stories_model, EngineConfig(speculative=SpeculativeConfig(num_tokens=7)))
    seen: list[tuple[bool, int]] = []   # (the step's tokens offered a match, tokens drafted)
    original = engine.speculation.propose

    def spy(running):
        original(running)
        for seq in running:
            if seq.has_sampled:
                match = find_ngram_match(seq.token_ids, 4, 1)[0] > 0
                seen.append((match, len(seq.draft.tokens) if seq.draft is not None else 0))
    engine.speculation.propose = spy
    outputs, finals = run_all(engine, [request("a", prompt, 80, SpecMethod.AUTO)])
    assert outputs["a"] == run_all(LLMEngine(stories_model), [request("a", prompt, 80, None)])[0]["a"]
    assert finals["a"].accepted_tokens > 0
    assert all(drafted == 0 for match, drafted in seen if not match)
    assert all(drafted > 0 for match, drafted in seen[:-1] if match)  # the last step has no room left


def test_auto_does_not_draft_without_a_match(stories_model):
    # Token ids that never repeat, and an answer whose first tokens are new too: every step's
    # last token is its first occurrence, so no step drafts (each verifies one row).
    prompt = [1] + list(range(100, 140))
    engine = LLMEngine(stories_model, EngineConfig(speculative=SpeculativeConfig(num_tokens=7)))
    outputs, finals = run_all(engine, [request("a", prompt, 6, SpecMethod.AUTO)])
    tokens = prompt + outputs["a"]
    assert len(set(tokens)) == len(tokens), "the answer repeats a token: pick another prompt"
    assert finals["a"].draft_tokens == 0
    assert engine.tokens_computed == len(prompt) + 5    # the prompt, then one row per step


def test_auto_is_a_method_name():
    assert SpecMethod.parse("AUTO") is SpecMethod.AUTO
    assert SpeculativeParams(SpecMethod.parse("auto"), 7).method is SpecMethod.AUTO
