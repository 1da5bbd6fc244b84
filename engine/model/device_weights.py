"""A loaded model's weights moved to the device the Triton kernels compute on, in their stored form.

GGUF blocks of a type with a Triton kernel are repacked once (quant_pack: same byte count) and
multiplied compressed by quant_matmul; q/k/v and gate/up of one type become ONE packed weight
(one launch). 16-bit matrices go over as they are (cast to the activation dtype when it differs,
which keeps the size); float32 ones are cast to the activation dtype. Types without a Triton
kernel (the IQ types, TQ*) keep their blocks on the device and are decoded a few rows at a time
inside the matmul, never as a whole float copy. Weights move one tensor at a time, so the device
never holds more than the weights plus one tensor's staging.

It never changes the CPU weights it reads, and never falls back to the CPU: a linear it does not
know is a TypeError, not a slow path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lumen.engine.model.linear import (
    FLOAT_QTYPES,
    ChunkedQuantLinear,
    ConcatLinear,
    DenseEmbedding,
    DenseLinear,
    GGUFWeight,
    NativeQuantLinear,
    OneDNNLinear,
    PaddedFloatLinear,
    QuantEmbedding,
)
from lumen.engine.model.llama import LayerWeights, LlamaWeights
from lumen.engine.model.placement import Placement

_FLOAT_QTYPES = {qtype: dtype for dtype, qtype in FLOAT_QTYPES.items()}   # GGML F32, F16, BF16


class TritonQuantLinear:
    """x @ W^T with W a PackedQuantWeight on the device, by the Triton GEMV/GEMM (quant_matmul)."""

    def __init__(self, weight) -> None:
        self.weight = weight        # quant_pack.PackedQuantWeight
        self.out_features, self.in_features = weight.n, weight.k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from lumen.engine.triton_kernels.quant_matmul import quant_matmul
        lead = x.shape[:-1]
        return quant_matmul(x.reshape(-1, self.in_features).contiguous(), self.weight).reshape(
            *lead, self.out_features)


class DeviceChunkedLinear:
    """x @ W^T for a type without a Triton kernel: its blocks stay on the device and CHUNK_ROWS
    rows at a time are decoded (lumen.engine.weights.quant, torch operations) and multiplied."""

    CHUNK_ROWS = 1024

    def __init__(self, weight: GGUFWeight, dtype: torch.dtype) -> None:
        self.weight, self.dtype = weight, dtype
        self.out_features, self.in_features = weight.out_features, weight.in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = torch.empty((x2.shape[0], self.out_features), dtype=x.dtype, device=x.device)
        for start in range(0, self.out_features, self.CHUNK_ROWS):
            stop = min(start + self.CHUNK_ROWS, self.out_features)
            y[:, start:stop] = F.linear(x2, self.weight.decode_rows(slice(start, stop)).to(x.dtype))
        return y.reshape(*lead, self.out_features)


def weights_on(weights: LlamaWeights, placement: Placement) -> LlamaWeights:
    """`weights` (as a loader made them, on the CPU) on placement's device for the Triton kernels."""
    dev, dtype = placement.device, placement.dtype
    layers = [LayerWeights(attn_norm=layer.attn_norm.to(dev), wqkv=linear_on(layer.wqkv, placement),
                           wo=linear_on(layer.wo, placement), ffn_norm=layer.ffn_norm.to(dev),
                           w_gate_up=linear_on(layer.w_gate_up, placement), w_down=linear_on(layer.w_down, placement))
              for layer in weights.layers]
    embed = weights.embed
    if isinstance(embed, DenseEmbedding):
        embed = DenseEmbedding(embed.weight.to(dev, dtype))
    else:
        embed = QuantEmbedding(_raw_on(embed.weight, dev), dtype)
    return LlamaWeights(embed=embed, layers=layers, norm=weights.norm.to(dev), output=linear_on(weights.output, placement),
                        dtype=dtype)


def linear_on(linear, placement: Placement):
    """One CPU linear (any kind linear.py makes) as its device form."""
    if isinstance(linear, ConcatLinear):
        fused = _fused_blocks(linear.parts)
        if fused is not None:
            return _blocks_on(fused, placement)
        return ConcatLinear([linear_on(part, placement) for part in linear.parts])
    if isinstance(linear, NativeQuantLinear):
        return _blocks_on(linear.file_layout(), placement)
    if isinstance(linear, PaddedFloatLinear):
        return DenseLinear(linear.dense().to(placement.device, placement.dtype))
    if isinstance(linear, ChunkedQuantLinear):
        return _blocks_on(linear.weight, placement)
    if isinstance(linear, DenseLinear):
        return DenseLinear(linear.weight.to(placement.device, placement.dtype))
    if isinstance(linear, OneDNNLinear):
        raise TypeError("a oneDNN-packed linear keeps no plain weight to move; load the model inside "
                        "linear.plain_weights() for a device placement")
    raise TypeError(f"no device form for a {type(linear).__name__}")


def _blocks_on(weight: GGUFWeight, placement: Placement):
    from lumen.engine.triton_kernels.quant_pack import pack, supported
    dev, dtype = placement.device, placement.dtype
    if weight.qtype in _FLOAT_QTYPES:
        dense = weight.raw.view(_FLOAT_QTYPES[weight.qtype]).reshape(weight.out_features, weight.in_features)
        return DenseLinear(dense.to(dev).to(dtype))
    if supported(weight.qtype):
        return TritonQuantLinear(pack(weight.raw, weight.qtype, weight.out_features, weight.in_features, dev))
    return DeviceChunkedLinear(_raw_on(weight, dev), dtype)


def _raw_on(weight: GGUFWeight, device: torch.device) -> GGUFWeight:
    return GGUFWeight(weight.raw.to(device), weight.qtype, weight.out_features, weight.in_features)


def _fused_blocks(parts: list) -> GGUFWeight | None:
    """The parts' GGUF rows stacked into one weight when they share one quantized type (q/k/v or
    gate/up as one matmul); None when types differ (Q4_K_M's attn_v is Q6_K) or one is dense."""
    if not all(isinstance(p, (NativeQuantLinear, ChunkedQuantLinear)) for p in parts):
        return None
    weights = [p.file_layout() if isinstance(p, NativeQuantLinear) else p.weight for p in parts]
    if len({w.qtype for w in weights}) != 1:
        return None
    raw = torch.cat([w.raw for w in weights])   # host staging, one fused tensor at a time
    return GGUFWeight(raw, weights[0].qtype, sum(w.out_features for w in weights), weights[0].in_features)


LAYER_LINEARS = ("wqkv", "wo", "w_gate_up", "w_down")


def nbytes_on_device(*parts) -> int:
    """Bytes the given device weights hold (linears, embeddings, tensors), each tensor counted once."""
    seen: dict[int, int] = {}

    def visit(obj) -> None:
        if isinstance(obj, torch.Tensor):
            seen[obj.data_ptr()] = obj.nbytes
        elif isinstance(obj, TritonQuantLinear):
            for plane in obj.weight.planes:
                visit(plane)
        elif isinstance(obj, (DeviceChunkedLinear, QuantEmbedding)):
            visit(obj.weight.raw)
        elif isinstance(obj, (DenseLinear, DenseEmbedding)):
            visit(obj.weight)
        elif isinstance(obj, ConcatLinear):
            for part in obj.parts:
                visit(part)

    for part in parts:
        visit(part)
    return sum(seen.values())


def weights_nbytes(weights: LlamaWeights) -> int:
    """Bytes the whole model's weights hold on their device (the startup log, lumen.model.memory)."""
    layers = [getattr(layer, name) for layer in weights.layers for name in ("attn_norm", "ffn_norm", *LAYER_LINEARS)]
    return nbytes_on_device(*layers, weights.embed, weights.norm, weights.output)
