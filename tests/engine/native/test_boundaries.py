"""Every C entry point checks what it is given before touching memory: rows that do not hold
their k values, types it cannot decode, block ids, sequences, slots and positions out of range.

Each check is exercised twice where it matters: through the Python wrapper (a clear
NativeInputError) and against the C function itself (its error code), so the check does not
depend on the wrapper."""
from __future__ import annotations

import ctypes

import pytest
import torch
from gguf import GGMLQuantizationType as T

from lumen.engine.native import kernels as native
from lumen.engine.native.kernels import E_INDEX, E_SHAPE, E_TYPE, NativeInputError


def q8_rows(n: int, k: int) -> torch.Tensor:
    """n rows of k Q8_0 values: scale 1.0 (fp16 0x3c00) and int8 quants 1."""
    blocks = torch.zeros(n, k // 32, 34, dtype=torch.uint8)
    blocks[..., 1] = 0x3C
    blocks[..., 2:] = 1
    return blocks.reshape(n, -1).contiguous()


def test_rows_too_short_for_k_are_refused():
    """The issue's case: a 34-byte Q8_0 row read as 64 values once read past the tensor."""
    raw = q8_rows(8, 32)            # 34 bytes a row: 32 values
    x, y = torch.ones(2, 64), torch.empty(2, 8)
    with pytest.raises(NativeInputError, match="takes 68 bytes, the rows given have 34"):
        native.qmatmul_into(T.Q8_0, raw, 64, x, y)
    lib = native.library()
    rc = lib.lumen_qmatmul(int(T.Q8_0), raw.data_ptr(), 34, 8, 64, x.data_ptr(), 2, 64, y.data_ptr(), 8, 1)
    assert rc == E_SHAPE
    assert lib.lumen_check_rows(int(T.Q8_0), 68, 64) == 0 and lib.lumen_check_rows(int(T.Q8_0), 68, 48) == E_SHAPE


def test_decoding_a_type_without_a_decoder_or_with_short_rows_is_refused():
    raw = q8_rows(2, 64)
    torch.testing.assert_close(native.decode_rows(T.Q8_0, raw, 64), torch.ones(2, 64))
    with pytest.raises(NativeInputError, match="cannot decode GGML type 20"):
        native.decode_rows(int(T.IQ4_NL), raw, 64)
    with pytest.raises(NativeInputError, match="takes 136 bytes"):
        native.decode_rows(T.Q8_0, raw, 128)
    out = torch.empty(64)
    assert native.library().lumen_decode_row(int(T.IQ4_NL), raw.data_ptr(), 68, 64, out.data_ptr()) == E_TYPE


def attention_case(block_table: list[int], ctx: int, num_blocks: int = 4):
    nh, nkv, hd, block_size = 2, 1, 16, 4
    q, out = torch.randn(1, nh, hd), torch.empty(1, nh, hd)
    cache = torch.randn(num_blocks, block_size, nkv, hd)
    tables = torch.tensor([block_table], dtype=torch.int32)
    rows, seqs, ctx_lens = torch.tensor([0]), torch.tensor([0], dtype=torch.int32), torch.tensor([ctx], dtype=torch.int32)
    return q, cache, tables, rows, seqs, ctx_lens, out


@pytest.mark.parametrize("table,ctx", [([0, 4], 8), ([0, -1], 5), ([1, 2], 9)],
                         ids=["block id past the cache", "negative block id", "context past the table"])
def test_attention_refuses_block_ids_and_contexts_out_of_range(table, ctx):
    q, cache, tables, rows, seqs, ctx_lens, out = attention_case(table, ctx)
    with pytest.raises(NativeInputError, match="out of range"):
        native.paged_attention_rows(q, cache, cache, tables, rows, seqs, ctx_lens, 0.25, out)


def test_attention_refuses_rows_and_sequences_out_of_range():
    q, cache, tables, rows, seqs, ctx_lens, out = attention_case([0, 1], 6)
    native.paged_attention_rows(q, cache, cache, tables, rows, seqs, ctx_lens, 0.25, out)   # in range: fine
    with pytest.raises(NativeInputError, match="out of range"):
        native.paged_attention_rows(q, cache, cache, tables, torch.tensor([1]), seqs, ctx_lens, 0.25, out)
    with pytest.raises(NativeInputError, match="out of range"):
        native.paged_attention_rows(q, cache, cache, tables, rows, torch.tensor([1], dtype=torch.int32), ctx_lens,
                                    0.25, out)
    lib = native.library()
    rc = lib.lumen_paged_attention_rows(
        q.data_ptr(), q.stride(0), cache.data_ptr(), cache.data_ptr(), 0, tables.data_ptr(), tables.stride(0),
        rows.data_ptr(), seqs.data_ptr(), ctx_lens.data_ptr(), 1, 2, 1, 16, 4, ctypes.c_float(0.25),
        out.data_ptr(), out.stride(0), 1, 1, 1, 2, 1)       # the cache said to hold 1 block: id 1 is past it
    assert rc == E_INDEX


@pytest.mark.parametrize("positions,slots,message", [([0, 64], [0, 1], "RoPE table"), ([0, -1], [0, 1], "RoPE table"),
                                                     ([0, 1], [0, 10], "outside the cache"),
                                                     ([0, 1], [-3, 1], "outside the cache")])
def test_rope_store_refuses_positions_and_slots_out_of_range(positions, slots, message):
    nq, nkv, hd = 2, 1, 16
    qkv = torch.randn(2, (nq + 2 * nkv) * hd)
    cos, sin = torch.ones(64, hd // 2), torch.zeros(64, hd // 2)
    k_cache, v_cache = torch.zeros(10, nkv, hd), torch.zeros(10, nkv, hd)
    before = qkv.clone()
    with pytest.raises(NativeInputError, match=message):
        native.rope_store(qkv, nq, nkv, hd, hd, torch.tensor(positions), cos, sin, k_cache, v_cache,
                          torch.tensor(slots))
    assert torch.equal(qkv, before) and not k_cache.any()   # refused before any write


@pytest.fixture(scope="module")
def q8_model(tmp_path_factory):
    """A small synthetic Q8_0 model, whose layers run as one C call each."""
    from lumen.engine.demo.demo_model import demo_vocab
    from lumen.engine.demo.synthetic import SyntheticShape, write_synthetic_llama
    from lumen.engine.weights.gguf_loader import load_gguf
    shape = SyntheticShape(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, context_length=128)
    path = write_synthetic_llama(tmp_path_factory.mktemp("q8") / "m.gguf", shape, demo_vocab(), qtype=T.Q8_0,
                                 seed=5, name="m")
    return load_gguf(path)


def test_a_layer_is_checked_before_its_first_write(q8_model):
    """A fused layer with an out-of-range KV block, and one with a weight of the wrong row length:
    both refused, and nothing it would have written has changed."""
    from tests.engine.model.test_llama_reference import paged_model
    model = paged_model(q8_model)
    assert model.layer_structs is not None, "every matmul of a Q8_0 file has a C kernel"
    layer = model.layer_structs[0]
    cfg, rows = q8_model.config, 1
    hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    x, h = torch.randn(rows, cfg.dim), torch.randn(rows, cfg.dim)
    scratch = {name: torch.zeros(rows, width) for name, width in (
        ("qkv", (nh + 2 * nkv) * hd), ("attn", nh * hd), ("out", cfg.dim), ("gate_up", 2 * cfg.ffn_dim),
        ("act", cfg.ffn_dim))}
    num_blocks = model.kv.keys[0].shape[0]
    tensors = scratch | {"x": x, "h": h, "positions": torch.tensor([0]), "slots": torch.tensor([0]),
                         "cos": model.rope.cos, "sin": model.rope.sin,
                         "block_tables": torch.tensor([[num_blocks]], dtype=torch.int32),
                         "attn_rows": torch.tensor([0]), "attn_seqs": torch.tensor([0], dtype=torch.int32),
                         "attn_ctx": torch.tensor([1], dtype=torch.int32)}
    step = native.StepStruct(rows=rows, dim=cfg.dim, ffn=cfg.ffn_dim, nq=nh, nkv=nkv, hd=hd,
                             rope_dim=model.rope.rope_dim, block_size=model.kv.keys[0].shape[1], nthreads=1,
                             eps=cfg.rms_eps, scale=0.125, ldbt=1, rope_positions=model.rope.cos.shape[0],
                             num_blocks=num_blocks, n_seqs=1, table_width=1,
                             **{k: t.data_ptr() for k, t in tensors.items()})
    before = {name: t.clone() for name, t in (("x", x), ("h", h), ("qkv", scratch["qkv"]))}
    with pytest.raises(NativeInputError, match="out of range"):
        native.layer_forward(layer, step, q8_model.weights.norm)
    step.n_seqs, tensors["block_tables"][0, 0] = 1, 0
    layer.qkv.row_bytes[0] -= 1
    try:
        with pytest.raises(NativeInputError, match="rows do not hold"):
            native.layer_forward(layer, step, q8_model.weights.norm)
    finally:
        layer.qkv.row_bytes[0] += 1
    for name, t in (("x", x), ("h", h), ("qkv", scratch["qkv"])):
        assert torch.equal(t, before[name]), f"{name} was written before the checks"
