"""The model's logits against an independent reference: transformers loading the same GGUF."""
from __future__ import annotations

import pytest
import torch

from engine.kv_cache import SequenceKVCache
from engine.model import ForwardBatch, SequenceSlice

PROMPT = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]


def engine_logits(loaded, ids: list[int]) -> torch.Tensor:
    from engine.model import LlamaModel
    model = LlamaModel(loaded.config, loaded.weights)
    cache = SequenceKVCache(loaded.config, len(ids), model.dtype)
    batch = ForwardBatch(torch.tensor(ids), torch.arange(len(ids)), [SequenceSlice(cache, 0, len(ids), 0)],
                         torch.arange(len(ids)))
    return model.forward(batch)


def test_logits_match_transformers(stories_path, stories_model):
    transformers = pytest.importorskip("transformers")
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(stories_path.parent), gguf_file=stories_path.name, dtype=torch.float32,
        pad_token_id=None)  # the file says 0xFFFFFFFF ("none"), which transformers rejects
    with torch.no_grad():
        ref = ref_model(torch.tensor([PROMPT])).logits[0].float()
    ours = engine_logits(stories_model, PROMPT)
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, f"max relative difference {rel:.2e}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_incremental_decode_matches_full_prefill(stories_model):
    """Logits of a token decoded after a cached prefix equal those of one full prefill."""
    from engine.model import LlamaModel
    model = LlamaModel(stories_model.config, stories_model.weights)
    full = engine_logits(stories_model, PROMPT)
    cache = SequenceKVCache(stories_model.config, len(PROMPT), model.dtype)
    split = 9
    first = ForwardBatch(torch.tensor(PROMPT[:split]), torch.arange(split), [SequenceSlice(cache, 0, split, 0)],
                         torch.tensor([split - 1]))
    model.forward(first)
    rest = len(PROMPT) - split
    second = ForwardBatch(torch.tensor(PROMPT[split:]), torch.arange(split, len(PROMPT)),
                          [SequenceSlice(cache, 0, rest, split)], torch.arange(rest))
    torch.testing.assert_close(model.forward(second), full[split:], rtol=1e-5, atol=1e-5)
