"""LoRA inside the fused C layers (lora.c), on a small quantized model (synth256-Q8_0, dim 256):
the adapted logits equal the torch path's, and a row's result is the same bits alone or in a
batch of rows of other adapters. Small and fast, so it also runs under `make sanitize` and for
every kernel variant this CPU runs."""
from __future__ import annotations

import pytest
import torch

from lumen.engine.core.llm_engine import EngineConfig, LLMEngine
from lumen.engine.lora.weights import LoraStep
from lumen.engine.model.llama import Chunk, build_batch
from lumen.engine.native import kernels as native
from lumen.engine.weights.gguf_loader import load_gguf
from tests.conftest import shared_file
from tests.engine.lora.helpers import random_adapter

if not native.available():
    pytest.skip("the C kernels are not built here", allow_module_level=True)

IDS = [1, 17, 200, 33, 90, 5, 61, 250, 7, 12, 140]


@pytest.fixture(scope="module")
def engine():
    model = load_gguf(shared_file("quant", "synth256-Q8_0.gguf"))
    engine = LLMEngine(model, EngineConfig(kv_cache_bytes=1 << 22))
    assert engine.model.layer_structs is not None
    engine.load_adapter("a", random_adapter(model.config, 8, seed=1, size=0.05))
    engine.load_adapter("b", random_adapter(model.config, 5, seed=2, targets=("attn_v", "ffn_gate"), size=0.05))
    return engine


def logits(engine, rows) -> torch.Tensor:
    """Each (ids, adapter name or "", scale) a sequence of its own, every position's logits."""
    chunks, block = [], engine.blocks.block_size
    for i, (ids, name, scale) in enumerate(rows):
        lora = (engine.lora.get(name).weights, scale) if name else None
        chunks.append(Chunk(ids, 0, [i * 2, i * 2 + 1], range(len(ids)), lora))
    return engine.runner.forward(build_batch(chunks, block)[0])


def test_adapted_rows_equal_the_torch_path_and_their_solo_bits(engine, monkeypatch):
    rows = [(IDS, "a", 1.0), (IDS[:4], "", 1.0), (IDS[:7], "b", 0.5), (IDS[:1], "a", 2.0)]
    together = logits(engine, rows)
    alone = torch.cat([logits(engine, [row]) for row in rows])
    assert torch.equal(together, alone)
    monkeypatch.setattr(LoraStep, "native_struct", lambda self, n: None)
    torch_path = logits(engine, rows)
    assert (together - torch_path).abs().max() / torch_path.abs().max() < 1e-5
    assert (together[:len(IDS)] - logits(engine, [(IDS, "", 1.0)])).abs().max() > 1e-3   # the adapter acts
