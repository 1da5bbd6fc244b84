"""The `QuantType` contract and the bit-unpacking helpers every GGUF block layout shares.

A quant type turns raw blocks `[n_blocks, type_size]` (uint8) into values `[n_blocks, block_size]`
(float32) with whole-tensor torch ops. The arithmetic must follow ggml's order of float operations
step for step, because callers rely on bit-exact agreement with ggml and gguf-py. This module must
never loop in Python over blocks, and never read a half-precision field any other way than
ggml's `GGML_FP16_TO_FP32` (an exact widening).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Sequence

import torch
from gguf import GGMLQuantizationType

QK_K = 256  # values in a K-quant / i-quant super-block


class QuantType(ABC):
    """One GGUF tensor type: its block layout and how to decode a batch of blocks."""

    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]  # values per block
    type_size: ClassVar[int]  # bytes per block

    @abstractmethod
    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """`blocks` uint8 [n_blocks, type_size] -> float32 [n_blocks, block_size]."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(block_size={self.block_size}, type_size={self.type_size})"


_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}
_SHIFTS: dict[tuple, torch.Tensor] = {}


def on(table: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A module's constant lookup table on `like`'s device, copied there once: blocks decode where
    they are (a GPU's, for types the Triton kernels lack), never by a trip to the host."""
    if table.device == like.device:
        return table
    key = (id(table), like.device)
    if key not in _TABLES:
        _TABLES[key] = table.to(like.device)
    return _TABLES[key]


def split(blocks: torch.Tensor, *sizes: int) -> list[torch.Tensor]:
    """Cut each block into consecutive fields of the given byte sizes (they must cover the block)."""
    return list(torch.split(blocks, list(sizes), dim=-1))


def fp16(field: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 bytes [n, 2k] -> float32 [n, k], widened exactly like GGML_FP16_TO_FP32."""
    return field.contiguous().view(torch.float16).to(torch.float32)


def u16(field: torch.Tensor) -> torch.Tensor:
    """Little-endian uint16 bytes [n, 2k] -> int32 [n, k] (int32 because torch shifts uint16 poorly)."""
    pairs = field.reshape(*field.shape[:-1], -1, 2).to(torch.int32)
    return pairs[..., 0] | (pairs[..., 1] << 8)


def u32(field: torch.Tensor) -> torch.Tensor:
    """Little-endian uint32 bytes [n, 4k] -> int64 [n, k], so `>> 28` never sees a sign bit."""
    quads = field.reshape(*field.shape[:-1], -1, 4).to(torch.int64)
    return quads[..., 0] | (quads[..., 1] << 8) | (quads[..., 2] << 16) | (quads[..., 3] << 24)


def shifted(x: torch.Tensor, shifts: Sequence[int], mask: int) -> torch.Tensor:
    """`(x >> s) & mask` for each shift s, as a new second-to-last axis: [..., n] -> [..., len(shifts), n]."""
    key = (tuple(shifts), x.dtype, x.device)
    if key not in _SHIFTS:   # made once per device: a copy from the host cannot run inside a CUDA graph
        _SHIFTS[key] = torch.tensor(list(shifts), dtype=x.dtype, device=x.device).view(-1, 1)
    return (x.unsqueeze(-2) >> _SHIFTS[key]) & mask


def bits(x: torch.Tensor) -> torch.Tensor:
    """Every bit of every byte, least significant first: uint8 [..., n] -> uint8 [..., n, 8]."""
    s = torch.arange(8, dtype=torch.uint8, device=x.device)
    return (x.unsqueeze(-1) >> s) & 1


def sign_of(bit: torch.Tensor) -> torch.Tensor:
    """A sign bit as the float factor ggml multiplies by: 0 -> +1.0, 1 -> -1.0."""
    return torch.where(bit == 0, 1.0, -1.0).to(torch.float32)
