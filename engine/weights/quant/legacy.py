"""The original 32-value block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).

Layouts follow ggml-common.h (block_q4_0 ... block_q8_0). Each decode mirrors ggml's float order
(`d * q`, then `+ m`) so results stay bit-exact; never fuse or reorder those steps.
"""
from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from lumen.engine.weights.quant.base import QuantType, bits, fp16, shifted, split

QK = 32  # values per legacy block


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32]: low nibbles are values 0..15, high nibbles values 16..31."""
    return shifted(qs, (0, 4), 0x0F).reshape(qs.shape[0], QK)


def _fifth_bit(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes (one little-endian uint32) -> [n, 32]: bit i is value i's bit 4."""
    return bits(qh).reshape(qh.shape[0], QK)


class Q4_0(QuantType):
    qtype = T.Q4_0
    block_size, type_size = (QK, 2 + QK // 2)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d, qs = split(blocks, 2, QK // 2)
        q = _nibbles(qs).to(torch.int8) - 8
        return fp16(d) * q.to(torch.float32)


class Q4_1(QuantType):
    qtype = T.Q4_1
    block_size, type_size = (QK, 2 + 2 + QK // 2)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d, m, qs = split(blocks, 2, 2, QK // 2)
        return fp16(d) * _nibbles(qs).to(torch.float32) + fp16(m)


class Q5_0(QuantType):
    qtype = T.Q5_0
    block_size, type_size = (QK, 2 + 4 + QK // 2)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d, qh, qs = split(blocks, 2, 4, QK // 2)
        q = (_nibbles(qs) | (_fifth_bit(qh) << 4)).to(torch.int8) - 16
        return fp16(d) * q.to(torch.float32)


class Q5_1(QuantType):
    qtype = T.Q5_1
    block_size, type_size = (QK, 2 + 2 + 4 + QK // 2)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d, m, qh, qs = split(blocks, 2, 2, 4, QK // 2)
        q = _nibbles(qs) | (_fifth_bit(qh) << 4)
        return fp16(d) * q.to(torch.float32) + fp16(m)


class Q8_0(QuantType):
    qtype = T.Q8_0
    block_size, type_size = (QK, 2 + QK)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d, qs = split(blocks, 2, QK)
        return qs.contiguous().view(torch.int8).to(torch.float32) * fp16(d)


TYPES: tuple[QuantType, ...] = (Q4_0(), Q4_1(), Q5_0(), Q5_1(), Q8_0())
