"""GGUF weight blocks rearranged into planes the quantized-matmul kernels stream with wide loads.

A GGUF tensor of N rows (output features) and K columns is `[N, K / block_size * type_size]`
bytes of interleaved blocks (an fp16 scale, then packed quants), so its quants sit at odd byte
offsets. `pack` splits each type's blocks into planes, one per field, each `[N, ...]` and
row-contiguous: quants 16-byte aligned, scales and packed sub-block scales as fp16 or int32
words. Some planes also reorder nibbles, bytes or scale bits inside a super-block so that each
16 bytes of quants need one set of scales, cheaply decoded (see each `_planes_*`). A packed
weight is never larger than its GGUF blocks: planes only rearrange bits, so `nbytes` equals the
GGUF byte count exactly.

The kernels call a 16-byte run of the main quant plane a *group*; `Layout.group` is the number
of K values one group covers. Type ids are GGML's (`gguf.GGMLQuantizationType` values), kept
here as plain ints so that this module, like the kernels, runs where gguf is not installed.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

QK_K = 256   # values in a K-quant super-block


@dataclass(frozen=True, slots=True)
class Layout:
    name: str
    type_id: int
    block_size: int     # K values per GGUF block
    type_size: int      # bytes per GGUF block
    group: int          # K values one 16-byte group of the main quant plane covers
    planes: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]   # blocks [N, nb, type_size] -> planes


@dataclass(frozen=True, slots=True)
class PackedQuantWeight:
    """A quantized [n, k] weight (y = x @ W^T) in the planes its kernel reads."""
    qtype: int
    n: int
    k: int
    planes: tuple[torch.Tensor, ...]   # each [n, ...] contiguous; order and meaning per `_planes_*`

    @property
    def layout(self) -> Layout:
        return LAYOUTS[self.qtype]

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.planes)

    @property
    def device(self) -> torch.device:
        return self.planes[0].device


def _split(blocks: torch.Tensor, *sizes: int) -> list[torch.Tensor]:
    """Consecutive byte fields of every block: [N, nb, type_size] -> [N, nb, size] each."""
    assert sum(sizes) == blocks.shape[-1]
    return list(torch.split(blocks, list(sizes), dim=-1))


def _plane(field: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """A field's bytes as one row-contiguous plane [N, ...] of `dtype` (little-endian words)."""
    return field.contiguous().view(dtype).reshape(field.shape[0], -1)


def _planes_q4_0(b):   # d fp16 [N, K/32]; qs [N, K/2]: byte j of block i = values 32i+j | 32i+16+j << 4
    d, qs = _split(b, 2, 16)
    return _plane(d, torch.float16), _plane(qs)


def _planes_q4_1(b):   # dm int32 [N, K/32] (d | m << 16); qs as Q4_0
    dm, qs = _split(b, 4, 16)
    return _plane(dm, torch.int32), _plane(qs)


def _planes_q5_0(b):   # d fp16; qh int32 [N, K/32] (bit j: value j's fifth bit); qs as Q4_0
    d, qh, qs = _split(b, 2, 4, 16)
    return _plane(d, torch.float16), _plane(qh, torch.int32), _plane(qs)


def _planes_q5_1(b):   # dm int32; qh int32; qs
    dm, qh, qs = _split(b, 4, 4, 16)
    return _plane(dm, torch.int32), _plane(qh, torch.int32), _plane(qs)


def _planes_q8_0(b):   # d fp16 [N, K/32]; qs int8 bits [N, K]
    d, qs = _split(b, 2, 32)
    return _plane(d, torch.float16), _plane(qs)


def _k_scales_by_group(scales: torch.Tensor) -> torch.Tensor:
    """16 per-16-value scale bytes of a super-block, index 8h + 2i + r, reordered to (h, r, i) so
    that the 4 scales one 16-byte group (h, r) needs are one int32 word: [N, nsb*4]."""
    n, nsb, _ = scales.shape
    by_group = scales.reshape(n, nsb, 2, 4, 2).permute(0, 1, 2, 4, 3)
    return _plane(by_group, torch.int32)


def _planes_q2_k(b):   # scales int32 [N, K/64] (group order); qs [N, K/4] (as GGUF); dm int32 [N, K/256]
    scales, qs, dm = _split(b, QK_K // 16, QK_K // 4, 4)
    return _k_scales_by_group(scales), _plane(qs), _plane(dm, torch.int32)


def _planes_q3_k(b):   # hmask [N, K/8]; qs [N, K/4]; scales int32 [N, K/256*3] (GGUF's 12 bytes); d fp16
    hmask, qs, scales, d = _split(b, QK_K // 8, QK_K // 4, 12, 2)
    return _plane(hmask), _plane(qs), _plane(scales, torch.int32), _plane(d, torch.float16)


def _by_sub_block(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K quants [N, nsb, 128] to one Q4_0-style 16-byte group per 32-value sub-block.

    GGUF packs sub-blocks 2c and 2c+1 as the low and high nibbles of the same 32 bytes; here
    byte j of sub-block s holds its values j (low nibble) and j + 16 (high), so a group needs
    one scale and one min."""
    n, nsb, _ = qs.shape
    chunks = qs.reshape(n, nsb, 4, 1, 32)
    values = torch.cat([chunks & 0x0F, chunks >> 4], dim=3).reshape(n, nsb, 8, 32)   # K order
    return _plane(values[..., :16] | (values[..., 16:] << 4))


def _k4_meta(dd: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K's 16 bytes of scales as int32 [N, nsb*4], the 8 six-bit scales sc_s and mins m_s
    of a super-block rearranged so that each needs one shift and mask, not a select:

        word 0: d | dmin << 16 (as GGUF)
        bytes 4-11: byte s = sc_s | (m_s >> 4) << 6
        bytes 12-15: nibble s (low nibble first) = m_s & 15
    """
    lo, hi, mixed = scales.reshape(*scales.shape[:-1], 3, 4).unbind(-2)     # GGUF's get_scale_min_k4
    sc = torch.cat([lo & 63, (mixed & 15) | ((lo >> 2) & 48)], dim=-1)         # [N, nsb, 8]
    mn = torch.cat([hi & 63, (mixed >> 4) | ((hi >> 2) & 48)], dim=-1)
    nibbles = (mn & 15).reshape(*mn.shape[:-1], 4, 2)
    packed = [dd, sc | ((mn >> 4) << 6), nibbles[..., 0] | (nibbles[..., 1] << 4)]
    return _plane(torch.cat(packed, dim=-1), torch.int32)


def _planes_q4_k(b):   # meta int32 [N, K/256*4] (see _k4_meta); qs by sub-block
    dd, scales, qs = _split(b, 4, 12, QK_K // 2)
    return _k4_meta(dd, scales), _by_sub_block(qs)


def _planes_q5_k(b):   # meta; qh int32 [N, K/32] (bit j: value j of the sub-block); qs by sub-block
    dd, scales, qh, qs = _split(b, 4, 12, QK_K // 8, QK_K // 2)
    n, nsb, _ = qh.shape
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)
    bits = (qh[:, :, None, :] >> shifts[:, None]) & 1                     # [N, nsb, 8 sub-blocks, 32]
    words = (bits.reshape(n, nsb, 8, 4, 8) << shifts).sum(-1).to(torch.uint8)   # [N, nsb, 8, 4] bytes
    return _k4_meta(dd, scales), _plane(words, torch.int32), _by_sub_block(qs)


def _planes_q6_k(b):
    """qla, qlb [N, K/4]: GGUF's ql[l] and ql[l+32] of each group (h, r), l = 16r + j, in separate
    planes so both loads are contiguous; qh [N, K/4] as GGUF; scales int32 [N, K/64] (group
    order); d fp16 [N, K/256]."""
    ql, qh, scales, d = _split(b, QK_K // 2, QK_K // 4, QK_K // 16, 2)
    n, nsb, _ = ql.shape
    ql = ql.reshape(n, nsb, 2, 2, 2, 16)                                    # (h, a, r, j)
    return (_plane(ql[:, :, :, 0]), _plane(ql[:, :, :, 1]), _plane(qh), _k_scales_by_group(scales),
            _plane(d, torch.float16))


LAYOUTS: dict[int, Layout] = {lay.type_id: lay for lay in (
    Layout("Q4_0", 2, 32, 2 + 16, 32, _planes_q4_0),
    Layout("Q4_1", 3, 32, 4 + 16, 32, _planes_q4_1),
    Layout("Q5_0", 6, 32, 2 + 4 + 16, 32, _planes_q5_0),
    Layout("Q5_1", 7, 32, 4 + 4 + 16, 32, _planes_q5_1),
    Layout("Q8_0", 8, 32, 2 + 32, 16, _planes_q8_0),
    Layout("Q2_K", 10, QK_K, QK_K // 16 + QK_K // 4 + 4, 64, _planes_q2_k),
    Layout("Q3_K", 11, QK_K, QK_K // 8 + QK_K // 4 + 12 + 2, 64, _planes_q3_k),
    Layout("Q4_K", 12, QK_K, 4 + 12 + QK_K // 2, 32, _planes_q4_k),
    Layout("Q5_K", 13, QK_K, 4 + 12 + QK_K // 8 + QK_K // 2, 32, _planes_q5_k),
    Layout("Q6_K", 14, QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2, 64, _planes_q6_k),
)}


def supported(qtype: int) -> bool:
    """Whether the quantized matmul kernels take GGML type `qtype` (an int or GGMLQuantizationType)."""
    return int(qtype) in LAYOUTS


def layout_of(qtype: int) -> Layout:
    """The layout of `qtype`, or ValueError naming it and the supported types."""
    lay = LAYOUTS.get(int(qtype))
    if lay is None:
        names = ", ".join(lay.name for lay in LAYOUTS.values())
        label = getattr(qtype, "name", f"id {int(qtype)}")
        raise ValueError(f"GGML type {label} has no quantized matmul kernel (supported: {names})")
    return lay


def pack(raw: torch.Tensor | np.ndarray, qtype: int, n: int, k: int,
         device: torch.device | str | None = None) -> PackedQuantWeight:
    """Planes of a GGUF tensor with `n` rows of `k` values: raw uint8 bytes [n, k/block_size*type_size]
    (any shape with that many bytes), moved to `device` (default: where `raw` is) and split there."""
    lay = layout_of(qtype)
    if k <= 0 or k % lay.block_size:
        raise ValueError(f"{lay.name} rows must hold a positive multiple of {lay.block_size} values, got k={k}")
    if isinstance(raw, np.ndarray):
        with warnings.catch_warnings():   # GGUF memmaps are read-only; the bytes are only read
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8))
    if raw.dtype != torch.uint8:
        raise ValueError(f"raw {lay.name} data must be uint8 bytes, got {raw.dtype}")
    expected = n * (k // lay.block_size) * lay.type_size
    if raw.numel() != expected:
        raise ValueError(f"{lay.name} weight [{n}, {k}] needs {expected} bytes, got {raw.numel()}")
    blocks = raw.to(device if device is not None else raw.device).reshape(n, k // lay.block_size, lay.type_size)
    packed = PackedQuantWeight(int(qtype), n, k, lay.planes(blocks))
    assert packed.nbytes == expected, f"{lay.name} planes hold {packed.nbytes} bytes, GGUF {expected}"
    return packed
