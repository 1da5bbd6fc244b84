"""Ternary and 4-bit float formats (TQ1_0, TQ2_0, MXFP4, NVFP4).

Layouts follow ggml-common.h (block_tq1_0, block_tq2_0, block_mxfp4, block_nvfp4). TQ1_0 packs five trits per
byte as a base-3 fixed-point fraction, so its digits come out by wrapping uint8 multiplications,
exactly as ggml does; never widen those products before masking to a byte.
"""
from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from lumen.engine.weights.quant.base import QK_K, QuantType, fp16, on, shifted, split

QK_MXFP4 = 32  # values per MXFP4 block
KVALUES_MXFP4 = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=torch.float32)
QK_NVFP4 = 64  # values per NVFP4 block: 4 sub-blocks of 16, each with a UE4M3 scale
POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)


def _trits(packed: torch.Tensor, digits: int) -> torch.Tensor:
    """Base-3 fixed-point bytes [n, g] -> digits in {-1, 0, 1} as int32 [n, digits * g]."""
    n = packed.shape[0]
    scaled = (packed.to(torch.int32).unsqueeze(-2) * on(POW3, packed)[:digits].view(-1, 1)) & 0xFF  # [n, digits, g]
    return ((scaled * 3) >> 8).reshape(n, -1) - 1


def e8m0_to_fp32_half(e: torch.Tensor) -> torch.Tensor:
    """An E8M0 exponent byte as float32 2^(e-128) (ggml_e8m0_to_fp32_half), subnormal for e < 2."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    return bits.view(torch.float32)


def _ue4m3_half_table() -> torch.Tensor:
    """All 256 UE4M3 scale bytes as float32, halved for the doubled E2M1 values (ggml_ue4m3_to_fp32).

    Every entry is a small dyadic number, so this float32 table is exact; 0 and 0x7F decode to 0.
    """
    x = torch.arange(256, dtype=torch.int32)
    exp, man = (x >> 3) & 0xF, (x & 7).to(torch.float32)
    normal = (1.0 + man / 8.0) * torch.exp2(exp.to(torch.float32) - 7)
    value = torch.where(exp == 0, man * 2.0**-9, normal) * 0.5
    return torch.where((x == 0) | (x == 0x7F), 0.0, value).to(torch.float32)


UE4M3_HALF = _ue4m3_half_table()  # [256]


class TQ1_0(QuantType):
    qtype = T.TQ1_0
    block_size, type_size = (QK_K, (QK_K - 4 * QK_K // 64) // 5 + QK_K // 64 + 2)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        qs, qh, d = split(blocks, (QK_K - 4 * QK_K // 64) // 5, QK_K // 64, 2)
        q = torch.cat([_trits(qs[:, :32], 5), _trits(qs[:, 32:], 5), _trits(qh, 4)], dim=-1)
        return fp16(d) * q.to(torch.float32)


class TQ2_0(QuantType):
    qtype = T.TQ2_0
    block_size, type_size = (QK_K, QK_K // 4 + 2)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        qs, d = split(blocks, QK_K // 4, 2)
        q = shifted(qs.reshape(n, -1, 32), (0, 2, 4, 6), 0x03).reshape(n, QK_K).to(torch.int8) - 1
        return fp16(d) * q.to(torch.float32)


class MXFP4(QuantType):
    qtype = T.MXFP4
    block_size, type_size = (QK_MXFP4, 1 + QK_MXFP4 // 2)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        e, qs = split(blocks, 1, QK_MXFP4 // 2)
        idx = shifted(qs, (0, 4), 0x0F).reshape(n, QK_MXFP4).long()
        return e8m0_to_fp32_half(e) * on(KVALUES_MXFP4, blocks)[idx]


class NVFP4(QuantType):
    qtype = T.NVFP4
    block_size, type_size = (QK_NVFP4, QK_NVFP4 // 16 + QK_NVFP4 // 2)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        scales, qs = split(blocks, QK_NVFP4 // 16, QK_NVFP4 // 2)
        d = on(UE4M3_HALF, blocks)[scales.long()].reshape(n, 4, 1)
        # Each 16-value sub-block: 8 low nibbles, then the same 8 bytes' high nibbles.
        idx = shifted(qs.reshape(n, 4, 8), (0, 4), 0x0F).reshape(n, 4, 16).long()
        return (d * on(KVALUES_MXFP4, blocks)[idx]).reshape(n, QK_NVFP4)


TYPES: tuple[QuantType, ...] = (TQ1_0(), TQ2_0(), MXFP4(), NVFP4())
