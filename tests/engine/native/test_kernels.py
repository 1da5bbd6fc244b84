"""The C kernels of lumen.engine.native: exact decoding, accurate and batch-invariant matmuls, clear errors.

Fresh random blocks every run (the seed is printed on failure). Weights with the largest fp16
scales would overflow float32 sums, so matmul checks use scales up to exponent 15 (|d| < 2);
decoding is checked over the whole fp16 range.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from lumen.engine.model.linear import ChunkedQuantLinear, ConcatLinear, GGUFWeight, NativeQuantLinear, make_quant_linear
from lumen.engine.native import kernels as native
from lumen.engine.weights.quant import dequantize
from tests.engine.weights.quant.blocks import random_blocks

if not native.available():
    pytest.skip("no C compiler here: the C kernels cannot be built", allow_module_level=True)

NATIVE_TYPES = [T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.fixture
def rng(request):
    seed = random.randrange(2**32)
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def random_weight(qtype: T, rng: np.random.Generator, n: int, k: int, max_exp: int = 15) -> GGUFWeight:
    if qtype in (T.F16, T.BF16):
        values = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32))
        raw = values.to(torch.float16 if qtype == T.F16 else torch.bfloat16).view(torch.uint8)
        return GGUFWeight(raw.reshape(n, -1).contiguous(), int(qtype), n, k)
    layout = native.block_layout(qtype)
    assert layout is not None
    blocks = random_blocks(qtype, rng, n * k // layout[0], max_exp)
    return GGUFWeight(torch.from_numpy(blocks).reshape(n, -1), int(qtype), n, k)


@pytest.mark.parametrize("qtype", NATIVE_TYPES, ids=lambda t: t.name)
def test_decode_is_bit_exact(qtype, rng):
    w = random_weight(qtype, rng, 7, 512, max_exp=30)
    ref = dequantize(w.raw, qtype, (7, 512))
    ours = native.decode_rows(qtype, w.raw, 512)
    same = (ours.view(torch.int32) == ref.view(torch.int32)) | (ours.isnan() & ref.isnan())
    assert bool(same.all()), f"{int((~same).sum())} values differ"


@pytest.mark.parametrize("qtype", NATIVE_TYPES, ids=lambda t: t.name)
def test_matmul_matches_float64(qtype, rng):
    n, k = 37, 512                       # n not a multiple of the 4-row register tile
    w = random_weight(qtype, rng, n, k)
    ref_w = dequantize(w.raw, qtype, (n, k)).double()
    for m in (1, 3, 4, 5, 19, 70):      # both loop orders (<= 4 rows streams, more decodes tiles)
        x = torch.randn(m, k)
        y = torch.full((m, n), float("nan"))
        native.qmatmul_into(qtype, w.raw, k, x, y)
        ref = x.double() @ ref_w.T
        rel = float((y.double() - ref).norm() / ref.norm())
        assert rel < 1e-6, f"m={m}: relative error {rel:.2e}"


# Types with register paths (AVX-512: M <= 20, Q4_1 M <= 8; AVX2: Q8_0, Q4_0 and Q4_1, M <= 4), checked on
# every build against the tile path (M > 20), and a type without (Q5_0).
VECTOR_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.F16, T.BF16]


@pytest.mark.parametrize("qtype", VECTOR_TYPES + [T.Q5_0], ids=lambda t: t.name)
def test_rows_are_batch_invariant(qtype, rng):
    """Each output row is bit-identical whatever the batch it is computed in and the thread count."""
    n, k = 70, 512                       # n not a multiple of the register paths' 4 or 3 weight rows
    w = random_weight(qtype, rng, n, k)
    x = torch.randn(40, k)
    alone = torch.empty(40, n)
    for i in range(40):
        native.qmatmul_into(qtype, w.raw, k, x[i:i + 1], alone[i:i + 1])
    threads = torch.get_num_threads()
    try:
        for t in {1, threads}:
            torch.set_num_threads(t)
            for m in (2, 3, 4, 5, 9, 16, 17, 20, 21, 23, 26, 40):   # 21-40: every tile remainder
                y = torch.empty(m, n)
                native.qmatmul_into(qtype, w.raw, k, x[:m], y)
                assert torch.equal(y, alone[:m]), f"{m} rows on {t} threads differ from rows alone"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("qtype", VECTOR_TYPES, ids=lambda t: t.name)
def test_register_paths_match_decoded_weights(qtype, rng):
    """The register paths (1, 8, 16 and 20 rows) give the tile path's bits (25 rows), and those are the
    decoded weights' sums in the documented order, on weights over the whole finite fp16 scale range."""
    n, k = 6, 512
    w = random_weight(qtype, rng, n, k, max_exp=30)
    x = torch.randn(25, k) * 1e-3
    tile = torch.empty(25, n)
    native.qmatmul_into(qtype, w.raw, k, x, tile)
    for m in (1, 8, 16, 20):
        y = torch.empty(m, n)
        native.qmatmul_into(qtype, w.raw, k, x[:m], y)
        assert torch.equal(y, tile[:m]), f"{m} rows differ from the tile path"
    # Reference: lane l sums x[k] * w[k] for k = l, l + 16, ... with one rounding each, then a fixed tree.
    wd = native.decode_rows(qtype, w.raw, k).double()
    xd = x.double()
    acc = torch.zeros(25, n, 16, dtype=torch.float32)
    for k0 in range(0, k, 16):
        # float products are exact in float64; the float64 sum then rounds to float32 as fma does
        # (but for double rounding, which random data essentially never hits)
        acc = (xd[:, None, k0:k0 + 16] * wd[None, :, k0:k0 + 16] + acc.double()).float()
    s8 = acc[..., :8] + acc[..., 8:]
    s4 = s8[..., :4] + s8[..., 4:]
    ref = (s4[..., 0] + s4[..., 2]) + (s4[..., 1] + s4[..., 3])
    assert torch.equal(tile, ref), f"{int((tile != ref).sum())} outputs differ from the fma-order reference"


def test_output_slices_and_concat(rng):
    """ConcatLinear writes each part into its own columns of one output, whatever the parts' types."""
    parts = [random_weight(T.Q4_K, rng, 64, 256), random_weight(T.Q6_K, rng, 32, 256),
             random_weight(T.Q8_0, rng, 16, 256)]
    lin = ConcatLinear([make_quant_linear(p) for p in parts])
    x = torch.randn(6, 256)
    ref = torch.cat([x.double() @ dequantize(p.raw, p.qtype, (p.out_features, 256)).double().T for p in parts], 1)
    y = lin(x)
    assert y.shape == (6, 112)
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-6


def test_chunked_path_agrees_with_native(rng):
    w = random_weight(T.Q5_K, rng, 300, 512)       # more rows than one chunk
    x = torch.randn(5, 512)
    a, b = NativeQuantLinear(w)(x), ChunkedQuantLinear(w)(x)
    assert float((a - b).norm() / b.norm()) < 1e-5


def test_types_without_c_kernels_use_the_chunked_path(rng):
    blocks = random_blocks(T.IQ4_NL, rng, 4 * 256 // 32)
    w = GGUFWeight(torch.from_numpy(blocks).reshape(4, -1), int(T.IQ4_NL), 4, 256)
    lin = make_quant_linear(w)
    assert isinstance(lin, ChunkedQuantLinear)
    x = torch.randn(3, 256)
    ref = x.double() @ dequantize(w.raw, T.IQ4_NL, (4, 256)).double().T
    assert float((lin(x).double() - ref).norm() / ref.norm()) < 1e-6


def test_bad_arguments_are_refused(rng):
    w = random_weight(T.Q8_0, rng, 8, 64)
    with pytest.raises(AssertionError, match="float32"):
        native.qmatmul_into(T.Q8_0, w.raw, 64, torch.randn(2, 64).half(), torch.empty(2, 8))
    with pytest.raises(AssertionError, match=r"\[m, 64\]"):
        native.qmatmul_into(T.Q8_0, w.raw, 64, torch.randn(2, 32), torch.empty(2, 8))
    with pytest.raises(AssertionError, match="y must be"):
        native.qmatmul_into(T.Q8_0, w.raw, 64, torch.randn(2, 64), torch.empty(2, 9))
    with pytest.raises(ValueError, match="cannot decode GGML type"):
        native.qmatmul_into(int(T.IQ4_NL), w.raw, 64, torch.randn(2, 64), torch.empty(2, 8))
    assert native.block_layout(int(T.IQ4_NL)) is None
