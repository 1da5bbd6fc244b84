"""How a request ends: any end-of-generation token (FinishReason.EOS), a stop token the request
names (STOP_TOKEN, even with ignore_eos), and bad stop ids refused up front. The stopping token
is carried in the output's ids but adds no text."""
from __future__ import annotations

import pytest

from lumen.engine.core.llm_engine import MAX_STOP_TOKEN_IDS, EngineConfig, LLMEngine
from lumen.engine.core.request import FinishReason, GenerationRequest, RequestOutput
from lumen.engine.errors import InvalidRequestError
from lumen.engine.sampling.sampler import SamplingParams

GREEDY = SamplingParams(temperature=0)


def run(model, **fields) -> tuple[list[int], str, RequestOutput]:
    engine = LLMEngine(model, EngineConfig())
    engine.add_request(GenerationRequest("r", [1], fields.pop("max_new_tokens", 40), GREEDY, **fields))
    ids, text, last = [], "", None
    while engine.has_unfinished():
        for out in engine.step():
            ids += out.token_ids
            text += out.text
            last = out
    engine.check_invariants()
    return ids, text, last


def test_a_stop_token_ends_the_request_without_its_text(stories_model, stories_greedy):
    oracle, _ = stories_greedy
    stop = oracle[7]
    first = oracle.index(stop)
    ids, text, last = run(stories_model, stop_token_ids=[stop], ignore_eos=True)
    assert ids == oracle[: first + 1]
    assert last.finish_reason is FinishReason.STOP_TOKEN and last.stop_token_id == stop
    tok = stories_model.tokenizer
    assert text == tok.decode(oracle[:first])


def test_any_end_of_generation_token_is_eos(stories_model, stories_greedy, monkeypatch):
    """A token of the model's EOG set that is not its EOS (as <|im_end|> is for a ChatML
    conversion whose EOS is <|endoftext|>) ends the request as EOS; ignore_eos ignores it."""
    oracle, _ = stories_greedy
    eog = oracle[5]
    tok = stories_model.tokenizer
    monkeypatch.setattr(type(tok), "eog_ids", property(lambda self: frozenset({tok.eos_id, eog})))
    ids, text, last = run(stories_model)
    assert ids == oracle[: oracle.index(eog) + 1] and last.finish_reason is FinishReason.EOS
    assert text == tok.decode(oracle[: oracle.index(eog)])
    ids, _, last = run(stories_model, ignore_eos=True, max_new_tokens=12)
    assert ids == oracle[:12] and last.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("stops,what", [([512], "outside the vocabulary"), ([-1], "outside the vocabulary"),
                                        (list(range(MAX_STOP_TOKEN_IDS + 1)), f"at most {MAX_STOP_TOKEN_IDS}")])
def test_bad_stop_token_ids_are_refused(stories_model, stops, what):
    engine = LLMEngine(stories_model, EngineConfig())
    with pytest.raises(InvalidRequestError, match=what) as err:
        engine.add_request(GenerationRequest("r", [1], 4, GREEDY, stop_token_ids=stops))
    assert err.value.field == "stopping.stop_token_ids"
    assert not engine.has_unfinished()
