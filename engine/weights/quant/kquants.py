"""K-quants (Q2_K ... Q6_K): 256-value super-blocks of 16- or 32-value sub-blocks with their own scales.

Layouts follow ggml-common.h (block_q2_K ... block_q6_K). Sub-block scales are decoded in integer
arithmetic, then applied in ggml's float order (`d * sc`, then `* q - dmin * m`); never reorder
those steps, since results must stay bit-exact with ggml.
"""
from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from lumen.engine.weights.quant.base import QK_K, QuantType, fp16, shifted, split

K_SCALE_SIZE = 12  # bytes of packed 6-bit scales and mins in Q4_K / Q5_K


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K/Q5_K's 12 bytes into 8 six-bit scales and 8 six-bit mins (get_scale_min_k4)."""
    n = scales.shape[0]
    d, m, m_d = scales.reshape(n, 3, 4).unbind(1)  # each [n, 4]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn  # [n, 8] each


def _low_bits(qs: torch.Tensor, width: int, shifts: tuple[int, ...], group: int) -> torch.Tensor:
    """Bit-fields of `group`-byte runs: [n, bytes] -> [n, runs * len(shifts), group]."""
    n = qs.shape[0]
    runs = qs.reshape(n, -1, group)
    return shifted(runs, shifts, (1 << width) - 1).reshape(n, -1, group)


class Q2_K(QuantType):
    qtype = T.Q2_K
    block_size, type_size = (QK_K, QK_K // 16 + QK_K // 4 + 2 + 2)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        scales, qs, d, dmin = split(blocks, QK_K // 16, QK_K // 4, 2, 2)
        dl = (fp16(d) * (scales & 0x0F).to(torch.float32)).reshape(n, QK_K // 16, 1)
        ml = (fp16(dmin) * (scales >> 4).to(torch.float32)).reshape(n, QK_K // 16, 1)
        q = _low_bits(qs, 2, (0, 2, 4, 6), 32).reshape(n, QK_K // 16, 16).to(torch.float32)
        return (dl * q - ml).reshape(n, QK_K)


class Q3_K(QuantType):
    qtype = T.Q3_K
    block_size, type_size = (QK_K, QK_K // 8 + QK_K // 4 + 12 + 2)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        hmask, qs, scales, d = split(blocks, QK_K // 8, QK_K // 4, 12, 2)
        # 16 six-bit scales: low nibbles in bytes 0..7, top two bits in bytes 8..11.
        low = shifted(scales[:, :8], (0, 4), 0x0F).reshape(n, 16)
        high = shifted(scales[:, 8:], (0, 2, 4, 6), 0x03).reshape(n, 16)
        sc = ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32)
        dl = (fp16(d) * sc).reshape(n, 16, 1)
        ql = _low_bits(qs, 2, (0, 2, 4, 6), 32).reshape(n, 16, QK_K // 16)
        qh = _low_bits(hmask, 1, tuple(range(8)), 32).reshape(n, 16, QK_K // 16)
        # ggml subtracts 4 where the high-mask bit is clear.
        q = (ql.to(torch.int8) - ((qh ^ 1) << 2).to(torch.int8)).to(torch.float32)
        return (dl * q).reshape(n, QK_K)


class Q4_K(QuantType):
    qtype = T.Q4_K
    block_size, type_size = (QK_K, 2 + 2 + K_SCALE_SIZE + QK_K // 2)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, dmin, scales, qs = split(blocks, 2, 2, K_SCALE_SIZE, QK_K // 2)
        sc, mn = _scale_min_k4(scales)
        dl = (fp16(d) * sc.to(torch.float32)).reshape(n, -1, 1)
        ml = (fp16(dmin) * mn.to(torch.float32)).reshape(n, -1, 1)
        q = _low_bits(qs, 4, (0, 4), 32).to(torch.float32)  # [n, 8, 32]
        return (dl * q - ml).reshape(n, QK_K)


class Q5_K(QuantType):
    qtype = T.Q5_K
    block_size, type_size = (QK_K, 2 + 2 + K_SCALE_SIZE + QK_K // 8 + QK_K // 2)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, dmin, scales, qh, qs = split(blocks, 2, 2, K_SCALE_SIZE, QK_K // 8, QK_K // 2)
        sc, mn = _scale_min_k4(scales)
        dl = (fp16(d) * sc.to(torch.float32)).reshape(n, -1, 1)
        ml = (fp16(dmin) * mn.to(torch.float32)).reshape(n, -1, 1)
        ql = _low_bits(qs, 4, (0, 4), 32)  # [n, 8, 32]
        high = _low_bits(qh, 1, tuple(range(8)), 32)  # [n, 8, 32]
        q = (ql | (high << 4)).to(torch.float32)
        return (dl * q - ml).reshape(n, QK_K)


class Q6_K(QuantType):
    qtype = T.Q6_K
    block_size, type_size = (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        ql, qh, scales, d = split(blocks, QK_K // 2, QK_K // 4, QK_K // 16, 2)
        sc = scales.contiguous().view(torch.int8).to(torch.float32)
        dl = (fp16(d) * sc).reshape(n, QK_K // 16, 1)
        low = _low_bits(ql, 4, (0, 4), 64).reshape(n, -1, 32)  # [n, 8, 32]
        high = _low_bits(qh, 2, (0, 2, 4, 6), 32)  # [n, 8, 32]
        q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, QK_K // 16, -1).to(torch.float32)
        return (dl * q).reshape(n, QK_K)


TYPES: tuple[QuantType, ...] = (Q2_K(), Q3_K(), Q4_K(), Q5_K(), Q6_K())
