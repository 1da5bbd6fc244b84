"""Random GGUF blocks for tests: random bytes whose fp16 scale fields are overwritten with finite values.

Shared by the dequantizer tests and the quantized-matmul kernel tests.
"""
from __future__ import annotations

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

# Byte offsets of each fp16 scale field inside one block (ggml-common.h layouts).
FP16_FIELDS: dict[T, tuple[int, ...]] = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    T.IQ4_NL: (0,), T.IQ4_XS: (0,), T.IQ2_XXS: (0,), T.IQ2_XS: (0,), T.IQ2_S: (0,),
    T.IQ3_XXS: (0,), T.IQ3_S: (0,), T.IQ1_S: (0,), T.TQ1_0: (52,), T.TQ2_0: (64,),
}
IQ1_M_SCALES = 48  # IQ1_M spreads its fp16 scale over the top nibbles of 4 uint16 at this offset


def finite_fp16_bits(rng: np.random.Generator, n: int, max_exp: int = 30) -> np.ndarray:
    """n finite fp16 bit patterns: a quarter each of ±0, subnormals, exponent `max_exp` (30: near
    65504) and random finite values with exponents up to `max_exp`."""
    assert 1 <= max_exp <= 30, "fp16 exponent 31 is inf/NaN"
    sign = rng.integers(0, 2, n, dtype=np.uint16) << 15
    mant = rng.integers(0, 1 << 10, n, dtype=np.uint16)
    exp = rng.integers(0, max_exp + 1, n, dtype=np.uint16)
    kind = rng.integers(0, 4, n)
    exp = np.where(kind == 0, 0, np.where(kind == 1, 0, np.where(kind == 2, max_exp, exp))).astype(np.uint16)
    mant = np.where(kind == 0, 0, np.where((kind == 1) & (mant == 0), 1, mant)).astype(np.uint16)
    return sign | (exp << 10) | mant


def random_blocks(qtype: T, rng: np.random.Generator, n_blocks: int, max_exp: int = 30) -> np.ndarray:
    """n_blocks random blocks [n_blocks, type_size] of `qtype` with finite fp16 scales."""
    type_size = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for off in FP16_FIELDS.get(qtype, ()):
        blocks[:, off:off + 2] = finite_fp16_bits(rng, n_blocks, max_exp).view(np.uint8).reshape(n_blocks, 2)
    if qtype == T.IQ1_M:
        d = finite_fp16_bits(rng, n_blocks, max_exp)
        scales = blocks[:, IQ1_M_SCALES:IQ1_M_SCALES + 8].copy().view(np.uint16)  # [n, 4]
        nibbles = (d[:, None] >> np.array([0, 4, 8, 12], dtype=np.uint16)) & 0xF
        scales = (scales & 0x0FFF) | (nibbles << 12)
        blocks[:, IQ1_M_SCALES:IQ1_M_SCALES + 8] = scales.view(np.uint8)
    return blocks
