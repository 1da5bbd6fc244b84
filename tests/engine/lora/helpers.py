"""Adapters made in the test (random A and B of any rank and targets) and what they must equal:
the base model with each adapted weight replaced by W + B @ A (B holds the scale)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from lumen.engine.lora.adapter import TARGETS, LoraAdapter, target_shapes
from lumen.engine.lora.weights import GROUPS
from lumen.engine.model.linear import DenseLinear, NativeQuantLinear, PaddedFloatLinear, make_linear
from lumen.engine.model.llama import Chunk, LayerWeights, build_batch

LINEARS = {"qkv": "wqkv", "o": "wo", "gate_up": "w_gate_up", "down": "w_down"}


def random_adapter(cfg, rank: int, seed: int, targets=tuple(TARGETS), size: float = 0.3) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.n_layers):
        for t in targets:
            out, inp = target_shapes(cfg)[t]
            tensors[(layer, t)] = (torch.randn(rank, inp, generator=g) * size, torch.randn(out, rank, generator=g) * size)
    return LoraAdapter(Path(f"random-{seed}"), "test", rank, float(rank), tensors)


def dense_weight(linear) -> torch.Tensor:
    """The float32 matrix of a linear over float weights (dense, or F32 rows in the C kernels)."""
    if isinstance(linear, DenseLinear):
        return linear.weight
    if isinstance(linear, PaddedFloatLinear):
        return linear.dense()
    assert isinstance(linear, NativeQuantLinear) and linear.weight.qtype == 0, "merging needs float32 weights"
    return linear.weight.raw.view(torch.float32)


def merged_model(loaded, adapter: LoraAdapter, scale: float = 1.0):
    """`loaded` (dense float weights) with the adapter merged into its weights, in float64 then float32."""
    shapes = target_shapes(loaded.config)
    layers = []
    for index, layer in enumerate(loaded.weights.layers):
        merged = {}
        for group, name in LINEARS.items():
            linear = getattr(layer, name)
            w = dense_weight(linear).double().clone()
            row = 0
            for t in GROUPS[group]:
                if (index, t) in adapter.tensors:
                    a, b = adapter.tensors[(index, t)]
                    w[row:row + shapes[t][0]] += scale * (b.double() @ a.double())
                row += shapes[t][0]
            merged[name] = make_linear(w.to(torch.float32))
        layers.append(LayerWeights(layer.attn_norm, merged["wqkv"], merged["wo"], layer.ffn_norm,
                                   merged["w_gate_up"], merged["w_down"]))
    return replace(loaded, weights=replace(loaded.weights, layers=layers))


def prompt_logits(engine, ids: list[int], lora=None) -> torch.Tensor:
    """Every position's logits of one prefill through the engine's runner (an idle engine: its
    first blocks are free), with `lora` = (AdapterWeights, scale) or None."""
    table = list(range(-(-len(ids) // engine.blocks.block_size)))
    batch, _ = build_batch([Chunk(ids, 0, table, range(len(ids)), lora)], engine.blocks.block_size)
    return engine.runner.forward(batch).cpu()
