"""The int8 matmul mode (q8matmul.c): what it computes, that a row's result does not depend on its
batch, how far it is from the exact product, and that it refuses what the exact mode refuses.

The mode quantizes each activation row and multiplies integers: for Q8_0 to 8 bits in groups of
8 values (scale amax / 127 in float32); for Q4_0 and Q4_1 to 8 bits in groups of 8 times an integer
multiplier (1-128) of a scale per group of 32 (amax / (127 * 128)); for the K-quants likewise in
groups of 16 with a scale per block of 256; quants rounded to nearest even; tests/engine/weights/test_gguf_loader.py
and tests/engine/model/test_smollm2_reference.py check whole models against llama.cpp's error.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from lumen.engine.native import kernels as native
from lumen.engine.native.kernels import E_SHAPE, NativeInputError
from lumen.engine.weights.quant import dequantize
from tests.engine.native.test_kernels import random_weight, rng  # noqa: F401  (rng is a fixture)

if not native.available():
    pytest.skip("no C compiler here: the C kernels cannot be built", allow_module_level=True)

INT8_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K]
K_TYPES = (T.Q4_K, T.Q5_K, T.Q6_K)
GROUP_TYPES = (T.Q4_0, T.Q4_1)


def quantized_activations(x: torch.Tensor, qtype) -> torch.Tensor:
    """x as the int8 mode sees it for qtype (dequantized, float64): the same float32 steps as
    quantize_row (Q8_0: 8-bit, groups of 8), quantize_rowg (Q4_0, Q4_1: a scale d per group of 32,
    an integer multiplier r per 8 values and 8-bit quants, qx = r q) or quantize_row16 (the
    K-quants: a scale d per block of 256, r per 16 values)."""
    m, k = x.shape
    if qtype in GROUP_TYPES:
        return with_multipliers(x, 32, 8)
    if qtype in K_TYPES:
        return with_multipliers(x, 256, 16)
    g = x.reshape(m, k // 8, 8)
    dx = g.abs().amax(-1, keepdim=True) / torch.tensor(127.0)
    inv = torch.where(dx != 0, 1.0 / dx, torch.zeros_like(dx))
    q = torch.round(torch.clamp(g * inv, -127.0, 127.0))     # round: to nearest even, as nearbyintf
    return (q.double() * dx.double()).reshape(m, k)


def with_multipliers(x: torch.Tensor, block: int, part: int) -> torch.Tensor:
    """A scale d = amax / (127 * 128) per `block` values, an integer multiplier r (0-128) per `part`
    values and 8-bit quants, dequantized: q r d."""
    m, k = x.shape
    g = x.reshape(m, k // block, block // part, part)
    amax_p = g.abs().amax(-1, keepdim=True)                       # [m, blocks, parts, 1]
    dx = amax_p.amax(-2, keepdim=True) / torch.tensor(127.0 * 128)
    inv = torch.where(dx != 0, 1.0 / dx, torch.zeros_like(dx))
    r = torch.clamp(torch.ceil(amax_p * inv / torch.tensor(127.0)), 0, 128)
    inv_p = torch.where(r != 0, 1.0 / (dx * r), torch.zeros_like(dx * r))
    q = torch.round(torch.clamp(g * inv_p, -127.0, 127.0))
    return (q.double() * r.double() * dx.double()).reshape(m, k)


def mm(qtype, w, x, mode="int8"):
    y = torch.full((x.shape[0], w.out_features), float("nan"))
    native.qmatmul_into(qtype, w.raw, w.in_features, x, y, mode=mode)
    return y


@pytest.mark.parametrize("qtype", INT8_TYPES, ids=lambda t: t.name)
def test_int8_mode_computes_the_quantized_product(qtype, rng):
    """Against float64 over the quantized activations and the exactly decoded weights: the only
    difference left is float32 rounding, so any unpacking mistake would show at once."""
    n, k = 37, 768                       # n not a multiple of the 4- and 2-row tiles; 3 K-quant blocks
    w = random_weight(qtype, rng, n, k)
    ref_w = dequantize(w.raw, qtype, (n, k)).double()
    assert native.int8_type(qtype)
    for m in (1, 2, 3, 4, 5, 9, 19):
        x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
        if m in (1, 9):   # 8-value runs of very different sizes: multipliers from 1 to 128
            x *= torch.from_numpy(10.0 ** -rng.integers(0, 5, (m, k // 8, 1))).float().expand(m, k // 8, 8).reshape(m, k)
        y = mm(qtype, w, x).double()
        ref = quantized_activations(x, qtype) @ ref_w.T
        scale = x.double().abs() @ ref_w.abs().T          # 0 where a random row's scales are all 0
        bad = (y - ref).abs() > 1e-5 * scale
        assert not bad.any(), f"m={m}: {int(bad.sum())} outputs differ from the quantized product"


@pytest.mark.parametrize("qtype", INT8_TYPES, ids=lambda t: t.name)
def test_int8_mode_is_within_activation_quantization_of_the_exact_product(qtype, rng):
    n, k = 16, 1024
    w = random_weight(qtype, rng, n, k)
    ref_w = dequantize(w.raw, qtype, (n, k)).double()
    x = torch.from_numpy(rng.standard_normal((6, k)).astype(np.float32))
    exact = x.double() @ ref_w.T
    scale = x.double().abs() @ ref_w.abs().T
    err8 = (mm(qtype, w, x).double() - exact).abs()
    err32 = (mm(qtype, w, x, "exact").double() - exact).abs()
    assert bool((err8 <= 1e-2 * scale).all()) and bool((err32 <= 1e-6 * scale).all())


@pytest.mark.parametrize("qtype", INT8_TYPES, ids=lambda t: t.name)
def test_int8_rows_are_batch_and_thread_invariant(qtype, rng):
    n, k = 29, 512
    w = random_weight(qtype, rng, n, k)
    x = torch.from_numpy(rng.standard_normal((11, k)).astype(np.float32))
    x[3] = 0.0                                     # a zero row: scale 0, every quant 0
    x[4, :32] = 0.0                                # and a zero group inside a row
    batch = mm(qtype, w, x)
    assert torch.equal(batch[3], torch.zeros(n))
    threads = torch.get_num_threads()
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            for i in range(x.shape[0]):
                solo = mm(qtype, w, x[i:i + 1].contiguous())
                assert torch.equal(solo[0].view(torch.int32), batch[i].view(torch.int32)), f"row {i}, {t} threads"
            for lo, hi in ((0, 4), (2, 7), (5, 11)):
                part = mm(qtype, w, x[lo:hi].contiguous())
                assert torch.equal(part.view(torch.int32), batch[lo:hi].view(torch.int32)), (lo, hi, t)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("qtype", [T.F16, T.BF16, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K], ids=lambda t: t.name)
def test_types_without_integer_kernels_compute_as_in_the_exact_mode(qtype, rng):
    w = random_weight(qtype, rng, 9, 256)
    x = torch.from_numpy(rng.standard_normal((3, 256)).astype(np.float32))
    assert not native.int8_type(qtype)
    assert torch.equal(mm(qtype, w, x), mm(qtype, w, x, "exact"))


def test_int8_mode_refuses_what_the_exact_mode_refuses():
    raw = torch.zeros(8, 34, dtype=torch.uint8)     # 34-byte Q8_0 rows: 32 values, not 64
    x, y = torch.ones(2, 64), torch.empty(2, 8)
    with pytest.raises(NativeInputError, match="takes 68 bytes, the rows given have 34"):
        native.qmatmul_into(T.Q8_0, raw, 64, x, y, mode="int8")
    rc = native.library().lumen_qmatmul_int8(int(T.Q8_0), raw.data_ptr(), 34, 8, 64, x.data_ptr(), 2, 64,
                                             y.data_ptr(), 8, 1)
    assert rc == E_SHAPE
    with pytest.raises(ValueError, match="unknown matmul mode 'int4'"):
        native.qmatmul_into(T.Q8_0, raw, 32, torch.ones(2, 32), y, mode="int4")


@pytest.mark.parametrize("n", [37, 8, 16, 5, 64])
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1], ids=lambda t: t.name)
def test_interleaved_weights_give_the_file_layouts_bits(qtype, n, rng):
    """The _X8 layouts (8 rows interleaved, 8 outputs a register) compute each output as the
    file's layout does (whose kernels interleave 8 rows at a time into a buffer, the last n mod 8
    padded): the same bits at every batch size, with the last n mod 8 rows left as rows of their
    type; and turning a weight back restores every byte."""
    k = 320                                              # 10 groups: not a multiple of 8 groups
    w = random_weight(qtype, rng, n, k)
    raw = w.raw.clone()
    native.interleave(raw, qtype, k, True)
    assert torch.equal(raw[n // 8 * 8:], w.raw[n // 8 * 8:])
    assert n < 8 or not torch.equal(raw, w.raw)
    for m in (1, 2, 3, 4, 5, 9, 19):
        x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
        if m in (1, 9):   # 8-value runs of very different sizes: multipliers from 1 to 128
            x *= torch.from_numpy(10.0 ** -rng.integers(0, 5, (m, k // 8, 1))).float().expand(m, k // 8, 8).reshape(m, k)
        x[0, 32:64] = 0.0                                # a zero group
        want = mm(qtype, w, x)
        got = torch.full((m, n), float("nan"))
        native.qmatmul_into(native.X8[qtype], raw, k, x, got, mode="int8")
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), f"m={m}"
    native.interleave(raw, qtype, k, False)
    assert torch.equal(raw, w.raw)


def test_an_interleaved_weight_is_refused_outside_the_int8_mode(rng):
    w = random_weight(T.Q4_0, rng, 16, 64)
    raw = w.raw.clone()
    native.interleave(raw, T.Q4_0, 64, True)
    x, y = torch.ones(2, 64), torch.empty(2, 16)
    x8 = native.X8[T.Q4_0]
    with pytest.raises(NativeInputError, match="int8 mode only"):
        native.qmatmul_into(x8, raw, 64, x, y)
    assert native.library().lumen_qmatmul(x8, raw.data_ptr(), 18 * 2, 16, 64, x.data_ptr(), 2, 64,
                                          y.data_ptr(), 16, 1) == native.E_TYPE
    with pytest.raises(NativeInputError, match="takes 36 bytes, the rows given have 34"):
        native.interleave(torch.zeros(16, 34, dtype=torch.uint8), T.Q4_0, 64, True)
    with pytest.raises(NativeInputError, match="takes 36 bytes, the rows given have 34"):
        native.qmatmul_into(x8, torch.zeros(16, 34, dtype=torch.uint8), 64, x, y, mode="int8")
    for qtype, row_bytes, k in ((T.Q4_K, 144, 256), (T.Q8_0, 34, 32)):
        with pytest.raises(NativeInputError, match=f"GGML type {int(qtype)} has no interleaved layout"):
            native.interleave(torch.zeros(16, row_bytes, dtype=torch.uint8), qtype, k, True)


@pytest.mark.parametrize("isa", ["AVX2", "AVX-512", None])
def test_auto_mode_puts_a_linear_in_the_int8_mode_only_if_each_of_its_types_is_faster_so(monkeypatch, rng, isa):
    """kernels.auto_int8 per type (the vector ISA of the kernel build stood in for), and
    LlamaWeights.set_matmul_mode per linear: a fused linear of Q4_0 and Q6_K parts is int8 only
    where Q6_K's int8 kernels are the faster too (AVX2); a type without integer kernels (F16) holds
    nothing back. The output linear follows its own type."""
    from types import SimpleNamespace

    from lumen.engine.model.linear import ConcatLinear, NativeQuantLinear
    from lumen.engine.model.llama import LlamaWeights
    monkeypatch.setattr(native, "vector_isa", lambda: isa)
    assert [native.auto_int8(t) for t in (T.Q4_0, T.Q4_1, native.X8[T.Q4_0], T.Q8_0, T.Q6_K, T.F16)] == \
        [isa is not None] * 3 + [isa == "AVX2"] * 2 + [True]

    def linear(*types):
        parts = [NativeQuantLinear(random_weight(t, rng, 8, 256)) for t in types]
        return ConcatLinear(parts) if len(parts) > 1 else parts[0]

    layer = SimpleNamespace(wqkv=linear(T.Q4_0, T.Q4_0, T.Q6_K), wo=linear(T.Q4_0), w_gate_up=linear(T.Q4_0, T.F16),
                            w_down=linear(T.Q6_K))
    weights = SimpleNamespace(layers=[layer], output=linear(T.Q4_1))
    LlamaWeights.set_matmul_mode(weights, "auto")

    def flags(linear) -> set[bool]:
        return {p.int8 for p in (linear.parts if isinstance(linear, ConcatLinear) else [linear])}

    assert [flags(getattr(layer, n)) for n in ("wqkv", "wo", "w_gate_up", "w_down")] == \
        [{isa == "AVX2"}, {isa is not None}, {isa is not None}, {isa == "AVX2"}]
    assert flags(weights.output) == {isa is not None}
    LlamaWeights.set_matmul_mode(weights, "exact")
    assert flags(layer.wqkv) == flags(weights.output) == {False}
