"""I-quants (IQ4_NL, IQ4_XS, IQ3_*, IQ2_*, IQ1_*): non-linear codebooks and lattice grids.

Layouts follow ggml-common.h (block_iq4_nl ... block_iq1_m). The codebooks are taken from gguf-py
at import time rather than copied, so they cannot drift from the reference. Each decode mirrors
ggml's float order (`d * (0.5 + s) * 0.25`, then `* grid * sign`); never reorder those steps,
since results must stay bit-exact with ggml.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from lumen.engine.weights.quant.base import QK_K, QuantType, bits, fp16, on, shifted, sign_of, split, u16, u32

QK4_NL = 32  # values per IQ4_NL block
KVALUES_IQ4NL = torch.tensor(gq.IQ4_NL.kvalues, dtype=torch.float32)  # [16]
KSIGNS = torch.frombuffer(bytearray(gq.IQ2_XXS.ksigns), dtype=torch.uint8)  # [128] even-parity sign bytes
IQ1S_DELTA = float(gq.IQ1_S.delta)


def _grid(reference: type) -> torch.Tensor:
    """gguf-py's decoded lattice for one type, as float32 [grid_rows, values_per_row]."""
    reference.init_grid()
    return torch.from_numpy(np.array(reference.grid, dtype=np.float32).reshape(reference.grid_shape))


GRID_IQ2XXS, GRID_IQ2XS, GRID_IQ2S = _grid(gq.IQ2_XXS), _grid(gq.IQ2_XS), _grid(gq.IQ2_S)
GRID_IQ3XXS, GRID_IQ3S, GRID_IQ1S = _grid(gq.IQ3_XXS), _grid(gq.IQ3_S), _grid(gq.IQ1_S)


def _ksigns(aux: torch.Tensor) -> torch.Tensor:
    """Four 7-bit sign indices per uint32 [n, g] -> float signs [n, g, 4, 8]."""
    idx = shifted(aux, (0, 7, 14, 21), 0x7F).transpose(-1, -2)  # [n, g, 4]
    return sign_of(bits(on(KSIGNS, idx)[idx]))


def _nibble_scales(scales: torch.Tensor) -> torch.Tensor:
    """Two 4-bit sub-block scales per byte, low nibble first: [n, bytes] -> [n, 2 * bytes]."""
    return shifted(scales, (0, 4), 0x0F).transpose(-1, -2).reshape(scales.shape[0], -1)


def _half_step_scales(d: torch.Tensor, s: torch.Tensor, step: float) -> torch.Tensor:
    """ggml's `d * (0.5 + s) * step` for 4-bit sub-block scales s."""
    return d * (0.5 + s.to(torch.float32)) * step


class IQ4_NL(QuantType):
    qtype = T.IQ4_NL
    block_size, type_size = (QK4_NL, 2 + QK4_NL // 2)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, qs = split(blocks, 2, QK4_NL // 2)
        idx = shifted(qs, (0, 4), 0x0F).reshape(n, QK4_NL).long()
        return fp16(d) * on(KVALUES_IQ4NL, blocks)[idx]


class IQ4_XS(QuantType):
    qtype = T.IQ4_XS
    block_size, type_size = (QK_K, 2 + 2 + QK_K // 64 + QK_K // 2)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, scales_h, scales_l, qs = split(blocks, 2, 2, QK_K // 64, QK_K // 2)
        low = shifted(scales_l, (0, 4), 0x0F).transpose(-1, -2).reshape(n, QK_K // 32)
        high = shifted(u16(scales_h), tuple(range(0, 16, 2)), 0x03).reshape(n, QK_K // 32)
        sc = ((low.to(torch.int32) | (high << 4)) - 32).to(torch.float32)
        dl = (fp16(d) * sc).reshape(n, -1, 1)
        idx = shifted(qs.reshape(n, -1, 16), (0, 4), 0x0F).reshape(n, -1, 32).long()
        return (dl * on(KVALUES_IQ4NL, blocks)[idx]).reshape(n, QK_K)


class IQ2_XXS(QuantType):
    qtype = T.IQ2_XXS
    block_size, type_size = (QK_K, 2 + QK_K // 4)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, qs = split(blocks, 2, QK_K // 4)
        groups = qs.reshape(n, QK_K // 32, 8)  # per 32 values: 4 grid indices, then a uint32 aux
        aux = u32(groups[..., 4:]).squeeze(-1)  # [n, 8]
        db = _half_step_scales(fp16(d), aux >> 28, 0.25).reshape(n, -1, 1, 1)
        grid = on(GRID_IQ2XXS, blocks)[groups[..., :4].long()]  # [n, 8, 4, 8]
        return (db * grid * _ksigns(aux)).reshape(n, QK_K)


class IQ2_XS(QuantType):
    qtype = T.IQ2_XS
    block_size, type_size = (QK_K, 2 + 2 * QK_K // 8 + QK_K // 32)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, qs, scales = split(blocks, 2, 2 * QK_K // 8, QK_K // 32)
        q = u16(qs)  # [n, 32]: 9-bit grid index, 7-bit sign index
        sc = _nibble_scales(scales)
        db = _half_step_scales(fp16(d), sc, 0.25).reshape(n, -1, 1, 1)
        signs = sign_of(bits(on(KSIGNS, blocks)[(q >> 9).long()])).reshape(n, -1, 2, 8)
        grid = on(GRID_IQ2XS, blocks)[(q & 511).long()].reshape(n, -1, 2, 8)
        return (db * grid * signs).reshape(n, QK_K)


class IQ2_S(QuantType):
    qtype = T.IQ2_S
    block_size, type_size = (QK_K, 2 + QK_K // 4 + QK_K // 16)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, qs, sign_bits, qh, scales = split(blocks, 2, QK_K // 8, QK_K // 8, QK_K // 32, QK_K // 32)
        sc = _nibble_scales(scales)
        db = _half_step_scales(fp16(d), sc, 0.25).reshape(n, -1, 1, 1)
        signs = sign_of(bits(sign_bits)).reshape(n, -1, 2, 8)
        high = shifted(qh, (0, 2, 4, 6), 0x03).transpose(-1, -2).reshape(n, -1)
        idx = qs.long() | (high.long() << 8)
        grid = on(GRID_IQ2S, blocks)[idx].reshape(n, -1, 2, 8)
        return (db * grid * signs).reshape(n, QK_K)


class IQ3_XXS(QuantType):
    qtype = T.IQ3_XXS
    block_size, type_size = (QK_K, 2 + 3 * QK_K // 8)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, qs, scales = split(blocks, 2, QK_K // 4, QK_K // 8)
        aux = u32(scales)  # [n, 8]
        db = _half_step_scales(fp16(d), aux >> 28, 0.5).reshape(n, -1, 1, 1)
        grid = on(GRID_IQ3XXS, blocks)[qs.long()].reshape(n, -1, 4, 8)
        return (db * grid * _ksigns(aux)).reshape(n, QK_K)


class IQ3_S(QuantType):
    qtype = T.IQ3_S
    block_size, type_size = (QK_K, 2 + QK_K // 4 + QK_K // 32 + QK_K // 8 + QK_K // 64)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, qs, qh, sign_bits, scales = split(blocks, 2, QK_K // 4, QK_K // 32, QK_K // 8, QK_K // 64)
        sc = _nibble_scales(scales)
        db = (fp16(d) * (1 + 2 * sc.to(torch.int32)).to(torch.float32)).reshape(n, -1, 1, 1)
        signs = sign_of(bits(sign_bits)).reshape(n, -1, 4, 8)
        idx = qs.long() | (bits(qh).reshape(n, -1).long() << 8)
        grid = on(GRID_IQ3S, blocks)[idx].reshape(n, -1, 4, 8)
        return (db * grid * signs).reshape(n, QK_K)


class IQ1_S(QuantType):
    qtype = T.IQ1_S
    block_size, type_size = (QK_K, 2 + QK_K // 8 + QK_K // 16)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        d, qs, qh_bytes = split(blocks, 2, QK_K // 8, QK_K // 16)
        qh = u16(qh_bytes)  # [n, 8]: 4 x 3 index bits, 3 scale bits, delta sign
        dl = (fp16(d) * (2 * ((qh >> 12) & 7) + 1).to(torch.float32)).reshape(n, -1, 1, 1)
        delta = torch.where((qh & 0x8000) == 0, IQ1S_DELTA, -IQ1S_DELTA).reshape(n, -1, 1, 1)
        high = shifted(qh, (0, 3, 6, 9), 7).transpose(-1, -2).reshape(n, -1)
        grid = on(GRID_IQ1S, blocks)[qs.long() | (high.long() << 8)].reshape(n, -1, 4, 8)
        return (dl * (grid + delta.to(torch.float32))).reshape(n, QK_K)


class IQ1_M(QuantType):
    qtype = T.IQ1_M
    block_size, type_size = (QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        n = blocks.shape[0]
        qs, qh, scales_bytes = split(blocks, QK_K // 8, QK_K // 16, QK_K // 32)
        scales = u16(scales_bytes)  # [n, 4]; their top nibbles together hold the fp16 scale
        top = scales >> 12
        d_bits = top[:, 0] | (top[:, 1] << 4) | (top[:, 2] << 8) | (top[:, 3] << 12)
        d = fp16(torch.stack([d_bits & 0xFF, d_bits >> 8], dim=-1).to(torch.uint8))  # [n, 1]
        sc = shifted(scales, (0, 3, 6, 9), 7).transpose(-1, -2).reshape(n, -1)
        dl = (d * (2 * sc + 1).to(torch.float32)).reshape(n, -1, 2, 1, 1)
        nib = shifted(qh, (0, 4), 0x0F).transpose(-1, -2).reshape(n, -1)  # [n, 32]
        delta = torch.where((nib & 0x08) == 0, IQ1S_DELTA, -IQ1S_DELTA).to(torch.float32)
        grid = on(GRID_IQ1S, blocks)[qs.long() | ((nib & 7).long() << 8)].reshape(n, -1, 2, 2, 8)
        return (dl * (grid + delta.reshape(n, -1, 2, 2, 1))).reshape(n, QK_K)


TYPES: tuple[QuantType, ...] = (
    IQ4_NL(), IQ4_XS(), IQ2_XXS(), IQ2_XS(), IQ2_S(), IQ3_XXS(), IQ3_S(), IQ1_S(), IQ1_M(),
)
