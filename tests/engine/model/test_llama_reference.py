"""The model's logits against an independent reference: transformers loading the same GGUF."""
from __future__ import annotations

import pytest
import torch

from lumen.engine.model.attention import AttentionMetadata
from lumen.engine.model.attention.torch_backend import TorchAttention
from lumen.engine.model.kv_cache import KVCachePool, KVCacheSpec
from lumen.engine.model.llama import ForwardBatch, LlamaModel

PROMPT = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]
BLOCK = 4


def paged_model(loaded, num_blocks: int = 16) -> LlamaModel:
    pool = KVCachePool(loaded.config, KVCacheSpec(BLOCK, num_blocks), loaded.weights.dtype)
    return LlamaModel(loaded.config, loaded.weights, pool, TorchAttention())


def step(model: LlamaModel, ids: list[int], past: int, table: list[int], all_logits: bool = True) -> torch.Tensor:
    n = len(ids)
    meta = AttentionMetadata.build([n], [past + n], [table], BLOCK)
    rows = torch.arange(n) if all_logits else torch.tensor([n - 1])
    return model.forward(ForwardBatch(torch.tensor(ids), torch.arange(past, past + n), meta, rows))


def assert_as_close_as_llama_cpp(ours: torch.Tensor, ref: torch.Tensor, llama_cpp_error: float, mode: str) -> None:
    """Logits against a float64 reference: max |ours - ref| / max |ref| at most llama.cpp's (and
    under 1e-4 in the exact mode), the same argmax wherever the reference's top-2 gap exceeds 1.0."""
    ours = ours.double()
    err = float((ours - ref).abs().max() / ref.abs().max())
    assert err <= llama_cpp_error, f"{mode}: relative error {err:.2e} > llama.cpp's {llama_cpp_error:.1e}"
    assert mode != "exact" or err < 1e-4, f"relative error {err:.2e}: exact weights in float32 should be far closer"
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1.0
    assert torch.equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear])


def engine_logits(loaded, ids: list[int]) -> torch.Tensor:
    """All positions' logits of one prefill, blocks deliberately out of order."""
    table = list(reversed(range(-(-len(ids) // BLOCK))))
    return step(paged_model(loaded, len(table)), ids, 0, table)


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


def test_chunked_prefill_and_decode_match_one_prefill(stories_model):
    """Logits computed in chunks over cached context equal those of one full prefill."""
    full = engine_logits(stories_model, PROMPT)
    model = paged_model(stories_model)
    table = [7, 2, 11, 5]
    parts = [step(model, PROMPT[:6], 0, table), step(model, PROMPT[6:13], 6, table),
             step(model, PROMPT[13:14], 13, table), step(model, PROMPT[14:], 14, table)]
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-5, atol=1e-5)
