"""Dequantization of GGUF tensors into float32 torch tensors, one small unit per GGML type.

`QUANT_TYPES` maps each supported `GGMLQuantizationType` to its `QuantType`; `dequantize` checks a
raw tensor against the type's block layout and decodes it. Every unit is bit-exact with ggml's own
dequantization. This package must never guess: an unregistered type or a byte count that does not
match the shape raises `ValueError` saying which.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch
from gguf import GGMLQuantizationType

from lumen.engine.weights.quant import floats, iquants, kquants, legacy, other
from lumen.engine.weights.quant.base import QuantType

QUANT_TYPES: dict[GGMLQuantizationType, QuantType] = {
    unit.qtype: unit
    for family in (floats, legacy, kquants, iquants, other)
    for unit in family.TYPES
}

__all__ = ["QUANT_TYPES", "QuantType", "dequantize", "quant_type"]


def quant_type(qtype: GGMLQuantizationType | int) -> QuantType:
    """The registered unit for `qtype`, or ValueError naming the type."""
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        raise ValueError(f"unknown GGML tensor type id {qtype!r}") from None
    unit = QUANT_TYPES.get(qtype)
    if unit is None:
        supported = ", ".join(t.name for t in QUANT_TYPES)
        raise ValueError(f"GGML tensor type {qtype.name} has no dequantizer (supported: {supported})")
    return unit


def _as_uint8_tensor(raw: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(raw, np.ndarray):
        # gguf-py hands F16/F32 tensors over as typed arrays; their bytes are what we decode.
        with warnings.catch_warnings():
            # GGUF tensors are read-only memmaps; we only ever read them, so the warning is noise.
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8))
    if raw.dtype != torch.uint8:
        raise ValueError(f"raw tensor data must be uint8 bytes, got {raw.dtype}")
    return raw


def dequantize(
    raw: torch.Tensor | np.ndarray, qtype: GGMLQuantizationType | int, shape: Sequence[int]
) -> torch.Tensor:
    """Decode raw bytes `[rows, bytes_per_row]` of a `qtype` tensor to float32 `[rows, cols]`.

    `shape` is the logical shape in row-major order (numpy order, the reverse of ggml's `ne`);
    its last entry is the row length `cols`, the others multiply to `rows`.
    """
    unit = quant_type(qtype)
    data = _as_uint8_tensor(raw)
    cols, rows = int(shape[-1]), math.prod(int(n) for n in shape[:-1])
    if cols % unit.block_size:
        raise ValueError(
            f"{unit.qtype.name} row length {cols} is not a multiple of its block size {unit.block_size}"
        )
    expected = rows * (cols // unit.block_size) * unit.type_size
    if data.numel() != expected:
        raise ValueError(
            f"{unit.qtype.name} tensor of shape {tuple(shape)} needs {expected} bytes, got {data.numel()}"
        )
    blocks = data.reshape(-1, unit.type_size)  # [n_blocks, type_size]
    return unit.dequantize_blocks(blocks).reshape(rows, cols)
