"""rowwise.c, the row-wise work between a layer's matmuls, against torch's operations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lumen.engine.model.config import ModelConfig
from lumen.engine.model.llama import RotaryEmbedding
from lumen.engine.native import kernels as native
from tests.engine.model.test_llama_reference import PROMPT, engine_logits

if not native.available():
    pytest.skip("no C compiler here: the C kernels cannot be built", allow_module_level=True)


def test_add_rms_norm_matches_torch_and_updates_the_residual():
    g = torch.Generator().manual_seed(0)
    x, dx = torch.randn(5, 2051, generator=g), torch.randn(5, 2051, generator=g)
    w = torch.randn(2051, generator=g)
    expected_x = x + dx
    out = torch.empty_like(x)
    native.add_rms_norm(x, dx, w, 1e-5, out)
    assert torch.equal(x, expected_x)
    torch.testing.assert_close(out, F.rms_norm(expected_x, w.shape, w, 1e-5), rtol=2e-6, atol=1e-6)
    alone = torch.empty_like(x)
    native.add_rms_norm(x[2:3].clone(), None, w, 1e-5, alone[:1])
    assert torch.equal(alone[0], out[2]), "a row's norm must not depend on its batch"


def test_rope_store_gives_torch_rope_bits_and_fills_the_cache():
    cfg = ModelConfig.__new__(ModelConfig)
    object.__setattr__(cfg, "rope_base", 10000.0)
    object.__setattr__(cfg, "rope_dim", 48)
    object.__setattr__(cfg, "context_length", 64)
    rope = RotaryEmbedding(cfg)
    nq, nkv, hd, rows = 4, 2, 64, 3
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(rows, (nq + 2 * nkv) * hd, generator=g)
    positions, slots = torch.tensor([0, 17, 63]), torch.tensor([5, 0, 9])
    expected = rope(qkv.view(rows, -1, hd)[:, :nq + nkv], positions)
    k_cache, v_cache = torch.zeros(10, nkv, hd), torch.zeros(10, nkv, hd)
    values = qkv.view(rows, -1, hd)[:, nq + nkv:].clone()
    native.check_positions_slots(positions, slots, rope.cos.shape[0], 10)
    native.rope_store(qkv, nq, nkv, hd, 48, positions, rope.cos, rope.sin, k_cache, v_cache, slots)
    assert torch.equal(qkv.view(rows, -1, hd)[:, :nq + nkv], expected)
    assert torch.equal(k_cache[slots], expected[:, nq:])
    assert torch.equal(v_cache[slots], values)


def test_positions_and_slots_outside_their_tables_are_refused():
    with pytest.raises(ValueError, match="RoPE table"):
        native.check_positions_slots(torch.tensor([3, 64]), torch.tensor([0, 1]), 64, 10)
    with pytest.raises(ValueError, match="outside the cache"):
        native.check_positions_slots(torch.tensor([3, 4]), torch.tensor([0, 10]), 64, 10)


def test_silu_mul_matches_torch():
    h = torch.randn(4, 2 * 300, generator=torch.Generator().manual_seed(2)) * 6
    out = torch.empty(4, 300)
    native.silu_mul(h, out)
    torch.testing.assert_close(out, F.silu(h[:, :300]) * h[:, 300:], rtol=2e-6, atol=1e-6)


def test_glued_forward_matches_the_torch_forward(stories_model, monkeypatch):
    glued = engine_logits(stories_model, PROMPT)
    monkeypatch.setattr("lumen.engine.model.llama.native.available", lambda: False)
    plain = engine_logits(stories_model, PROMPT)
    torch.testing.assert_close(glued, plain, rtol=1e-5, atol=1e-5)


def test_silu_mul_over_the_whole_float_range():
    g = torch.cat([torch.linspace(-120, 120, 4001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.5, -88.5, 300, -300])])
    h = torch.cat([g, torch.ones_like(g)]).view(1, -1)
    out = torch.empty(1, g.numel())
    native.silu_mul(h, out)
    torch.testing.assert_close(out[0], F.silu(g), rtol=3e-7, atol=1e-30)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "F16"])  # what the synthetic writer makes
def test_one_call_layers_give_the_glued_forwards_bits(qtype, tmp_path, monkeypatch):
    from gguf import GGMLQuantizationType

    from lumen.engine.demo.demo_model import DEMO_SHAPE, demo_vocab
    from lumen.engine.demo.synthetic import write_synthetic_llama
    from lumen.engine.weights.gguf_loader import load_gguf
    from tests.engine.model.test_llama_reference import paged_model
    path = write_synthetic_llama(tmp_path / "m.gguf", DEMO_SHAPE, demo_vocab(),
                                 qtype=GGMLQuantizationType[qtype], seed=3, name="m")
    loaded = load_gguf(path)
    assert paged_model(loaded).layer_structs is not None, "every matmul of this file has a C kernel"
    fused = engine_logits(loaded, PROMPT)
    monkeypatch.setattr("lumen.engine.model.llama._layer_structs", lambda *args: None)
    assert paged_model(loaded).layer_structs is None
    assert torch.equal(engine_logits(loaded, PROMPT), fused)
    monkeypatch.setattr("lumen.engine.model.llama.native.available", lambda: False)
    torch.testing.assert_close(engine_logits(loaded, PROMPT), fused, rtol=1e-5, atol=1e-5)


def test_a_layer_with_a_matmul_outside_the_c_kernels_stays_row_wise():
    from lumen.engine.weights.gguf_loader import load_gguf
    from tests.conftest import shared_file
    from tests.engine.model.test_llama_reference import paged_model
    # ffn_down is F16 with rows of 172 values: the chunked torch path, so no one-call layers.
    model = paged_model(load_gguf(shared_file("quant", "stories260K-Q4_0.gguf")))
    assert model.native_rowwise and model.layer_structs is None
