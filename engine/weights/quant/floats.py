"""Unquantized GGUF tensor types (F32, F16, BF16): a block is one value.

They go through the same `QuantType` path as the quantized types so the loader has one code path.
Widening must stay exact; never round or canonicalize NaNs here.
"""
from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from lumen.engine.weights.quant.base import QuantType


class F32(QuantType):
    qtype = T.F32
    block_size, type_size = (1, 4)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.float32)


class F16(QuantType):
    qtype = T.F16
    block_size, type_size = (1, 2)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.float16).to(torch.float32)


class BF16(QuantType):
    qtype = T.BF16
    block_size, type_size = (1, 2)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.bfloat16).to(torch.float32)


TYPES: tuple[QuantType, ...] = (F32(), F16(), BF16())
