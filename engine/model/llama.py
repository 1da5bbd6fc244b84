"""The Llama forward pass over the flattened tokens of one engine step.

All sequences' new tokens are concatenated into one [num_tokens] batch: every
matmul runs once for the whole step, and only attention looks at each
sequence's own blocks of the paged KV pool. No padding to the longest sequence, ever.

Three forms of one computation: torch operations (GPU, bfloat16, or no C compiler); on CPU in
float32, the row-wise C kernels (native/csrc/rowwise.c) between the matmuls; and, when every
matmul of a layer has a C kernel too, each layer as one C call (layer.c), which gives the
row-wise form's bits exactly (tests/engine/native/test_rowwise.py).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from lumen.engine.model.attention import AttentionMetadata, write_kv
from lumen.engine.model.config import ModelConfig
from lumen.engine.model.kv_cache import KVCachePool
from lumen.engine.model.linear import (
    ChunkedQuantLinear,
    ConcatLinear,
    DenseEmbedding,
    DenseLinear,
    NativeQuantLinear,
    OneDNNLinear,
    PaddedFloatLinear,
    QuantEmbedding,
    layout_changes,
)
from lumen.engine.native import kernels as native

if TYPE_CHECKING:
    from lumen.engine.lora.weights import AdapterWeights, LoraStep

Linear = DenseLinear | OneDNNLinear | NativeQuantLinear | PaddedFloatLinear | ChunkedQuantLinear | ConcatLinear
Embedding = DenseEmbedding | QuantEmbedding


@dataclass(slots=True)
class LayerWeights:
    attn_norm: torch.Tensor  # [dim] fp32
    wqkv: Linear             # [(n_heads + 2 * n_kv_heads) * head_dim, dim]
    wo: Linear               # [dim, n_heads * head_dim]
    ffn_norm: torch.Tensor   # [dim] fp32
    w_gate_up: Linear        # [2 * ffn_dim, dim]
    w_down: Linear           # [dim, ffn_dim]


@dataclass(slots=True)
class LlamaWeights:
    embed: Embedding      # [vocab, dim]: token ids -> rows
    layers: list[LayerWeights]
    norm: torch.Tensor    # [dim] fp32
    output: Linear        # [vocab, dim] (over the embedding itself when tied)
    dtype: torch.dtype    # activations' dtype (and the KV cache's)

    def set_matmul_mode(self, mode: str) -> None:
        """The C kernels' matmul mode for every matmul they compute: "exact", "int8" or "auto"
        (lumen.engine.native.kernels.MATMUL_MODES; auto: a linear's parts in the int8 mode where
        every one's type is faster so, native.auto_int8). Other linears are unaffected."""
        if mode not in native.MATMUL_MODES:
            raise ValueError(f"unknown matmul mode {mode!r}: use one of {', '.join(native.MATMUL_MODES)}")
        linears = [getattr(layer, name) for layer in self.layers for name in ("wqkv", "wo", "w_gate_up", "w_down")]
        for linear in linears + [self.output]:
            parts = [p for p in (linear.parts if isinstance(linear, ConcatLinear) else [linear])
                     if isinstance(p, NativeQuantLinear)]
            int8 = mode == "int8" or (mode == "auto" and all(native.auto_int8(p.weight.qtype) for p in parts))
            for part in parts:
                part.int8 = int8
                # the layers' weights are theirs alone; the output may be the embedding's (tied)
                part.interleave = linear is not self.output


@dataclass(slots=True)
class ForwardBatch:
    token_ids: torch.Tensor       # [num_tokens] int64: the new tokens of every scheduled sequence, back to back
    positions: torch.Tensor       # [num_tokens] int64
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [num_logits] int64: rows of the batch whose logits are wanted
    lora: LoraStep | None = None  # the LoRA adapters of its rows; None when no row has one


@dataclass(slots=True)
class Chunk:
    """One sequence's part of a step: new tokens from position `start`, over its block table."""
    token_ids: list[int]
    start: int
    block_table: list[int]
    logit_rows: range  # rows of token_ids whose logits are wanted
    lora: tuple[AdapterWeights, float] | None = None  # its LoRA adapter and scale


def build_batch(chunks: list[Chunk], block_size: int) -> tuple[ForwardBatch, list[tuple[int, int]]]:
    """The flattened batch of `chunks`, and each chunk's [first, last) rows in the returned logits."""
    token_ids: list[int] = []
    positions: list[int] = []
    logit_rows: list[int] = []
    rows: list[tuple[int, int]] = []
    adapted: list[tuple[int, int, AdapterWeights, float]] = []
    for chunk in chunks:
        first = len(token_ids)
        if chunk.lora is not None:
            adapted.append((first, len(chunk.token_ids), *chunk.lora))
        token_ids.extend(chunk.token_ids)
        positions.extend(range(chunk.start, chunk.start + len(chunk.token_ids)))
        rows.append((len(logit_rows), len(logit_rows) + len(chunk.logit_rows)))
        logit_rows.extend(first + r for r in chunk.logit_rows)
    attn = AttentionMetadata.build([len(c.token_ids) for c in chunks], [c.start + len(c.token_ids) for c in chunks],
                                   [c.block_table for c in chunks], block_size)
    lora = None
    if adapted:
        from lumen.engine.lora.weights import LoraStep
        lora = LoraStep.build(adapted, len(token_ids))
    batch = ForwardBatch(torch.tensor(token_ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
                         attn, torch.tensor(logit_rows, dtype=torch.long), lora)
    return batch, rows


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm computed in fp32 whatever the activation dtype; the result in `dtype` (x's by default)."""
    return F.rms_norm(x.float(), weight.shape, weight, eps).to(dtype or x.dtype)


class RotaryEmbedding:
    """RoPE in GGUF's pair layout: dimensions (2i, 2i+1) rotate together."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu") -> None:
        inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.rope_dim, 2, dtype=torch.float64) / cfg.rope_dim))
        angles = torch.outer(torch.arange(cfg.context_length, dtype=torch.float64), inv_freq)
        self.cos = angles.cos().float().to(device)  # [context, rope_dim / 2]
        self.sin = angles.sin().float().to(device)
        self.rope_dim = cfg.rope_dim

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, heads, head_dim]
        rot = x[..., : self.rope_dim].float().unflatten(-1, (-1, 2))
        cos = self.cos[positions].unsqueeze(1)  # [num_tokens, 1, rope_dim / 2]
        sin = self.sin[positions].unsqueeze(1)
        x0, x1 = rot[..., 0], rot[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)
        if self.rope_dim == x.shape[-1]:
            return out
        return torch.cat((out, x[..., self.rope_dim:]), dim=-1)


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: LlamaWeights, kv: KVCachePool, attention,
                 native_kernels: bool = True) -> None:
        """native_kernels=False keeps the C kernels out (the Triton placement on a CPU device)."""
        self.cfg = cfg
        self.w = weights
        self.kv = kv
        # A backend from lumen.engine.model.attention: forward(q, k_cache, v_cache, meta, scale).
        self.attention = attention
        self.rope = RotaryEmbedding(cfg, weights.norm.device)
        self.dtype = weights.dtype
        self.scale = cfg.head_dim ** -0.5
        # Float32 on CPU with the C kernels: the row-wise work between matmuls runs in rowwise.c,
        # a few calls per layer instead of dozens of small torch operations (BENCHMARKS.md).
        self.native_rowwise = (native_kernels and self.dtype == torch.float32 and weights.norm.device.type == "cpu"
                            and all(k.dtype == torch.float32 for k in kv.keys) and native.available())
        # When every matmul has a C kernel and attention is the C one, each layer is one C call.
        self.layer_structs = _layer_structs(weights, kv, attention) if self.native_rowwise else None
        self._layout = layout_changes()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, num_layers: int | None = None) -> torch.Tensor:
        """Run one step; returns fp32 logits [num_logits, vocab]. With num_layers, only the first
        layers run before the final norm and output head (the layer-skip draft)."""
        if self.layer_structs is not None and self._layout != layout_changes():
            # a weight was rearranged since (a matmul mode set again): the structs hold its type
            self.layer_structs = _layer_structs(self.w, self.kv, self.attention)
            self._layout = layout_changes()
        if self.layer_structs is not None:
            lora = None if batch.lora is None else batch.lora.native_struct(self.cfg.n_layers)
            if batch.lora is None or lora is not None:
                return self._forward_fused(batch, num_layers, lora)
        if self.native_rowwise:
            return self._forward_rowwise(batch, num_layers)
        # The residual stream stays float32 whatever the activation dtype: summed over every layer
        # in bfloat16 it would lose the small updates (SmolLM2's error grew past llama.cpp's).
        eps, dtype, lora = self.cfg.rms_eps, self.dtype, batch.lora
        x = self.w.embed(batch.token_ids).float()  # [num_tokens, dim]
        for index, layer in enumerate(self.w.layers[:num_layers]):
            x = x + self._attention(index, layer, rms_norm(x, layer.attn_norm, eps, dtype), batch).float()
            h = self._linear(layer.w_gate_up, rms_norm(x, layer.ffn_norm, eps, dtype), index, "gate_up", lora)
            gate, up = h.chunk(2, dim=-1)
            x = x + self._linear(layer.w_down, F.silu(gate) * up, index, "down", lora).float()
        x = rms_norm(x[batch.logits_indices], self.w.norm, eps, dtype)
        return self.w.output(x).float()

    def _attention(self, index: int, layer: LayerWeights, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        cfg = self.cfg
        hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        qkv = self._linear(layer.wqkv, x, index, "qkv", batch.lora).view(-1, nh + 2 * nkv, hd)
        # One RoPE call rotates the query and key heads together.
        qk = self.rope(qkv[:, : nh + nkv], batch.positions)
        q, k = qk[:, :nh], qk[:, nh:]          # [num_tokens, nh, hd], [num_tokens, nkv, hd]
        v = qkv[:, nh + nkv:]                  # [num_tokens, nkv, hd]
        k_cache, v_cache = self.kv.keys[index], self.kv.values[index]
        write_kv(k, v, k_cache, v_cache, batch.attn.slot_mapping)
        out = self.attention.forward(q, k_cache, v_cache, batch.attn, self.scale).reshape(-1, nh * hd)
        return self._linear(layer.wo, out, index, "o", batch.lora)

    @staticmethod
    def _linear(linear, x: torch.Tensor, index: int, group: str, lora: LoraStep | None) -> torch.Tensor:
        """linear(x), plus the LoRA term of the adapted rows."""
        y = linear(x)
        if lora is not None:
            lora.apply(index, group, x, y)
        return y

    def _rowwise_start(self, batch: ForwardBatch, num_layers: int) -> tuple[torch.Tensor, torch.Tensor, list]:
        """(residual stream x, its first norm h, the norm after each layer) for the C paths (which
        check this step's positions and KV slots against the tables they index)."""
        cfg = self.cfg
        x = self.w.embed(batch.token_ids).contiguous()   # [num_tokens, dim]
        h = torch.empty_like(x)                           # normed input of the next matmul
        norms = [layer.attn_norm for layer in self.w.layers[:num_layers]] + [self.w.norm]
        native.add_rms_norm(x, None, norms[0], cfg.rms_eps, h)
        return x, h, norms

    def _forward_rowwise(self, batch: ForwardBatch, num_layers: int | None) -> torch.Tensor:
        """forward() with rowwise.c between the matmuls: the residual stream x is updated in place
        and each residual add is fused with the norm that follows it."""
        cfg, eps = self.cfg, self.cfg.rms_eps
        hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        layers = self.w.layers[:num_layers]
        x, h, norms = self._rowwise_start(batch, len(layers))
        slots, lora, linear = batch.attn.slot_mapping, batch.lora, self._linear
        for index, layer in enumerate(layers):
            qkv = linear(layer.wqkv, h, index, "qkv", lora)
            native.rope_store(qkv, nh, nkv, hd, self.rope.rope_dim, batch.positions, self.rope.cos,
                              self.rope.sin, self.kv.keys[index], self.kv.values[index], slots)
            q = qkv.view(-1, nh + 2 * nkv, hd)[:, :nh]
            out = self.attention.forward(q, self.kv.keys[index], self.kv.values[index], batch.attn, self.scale)
            native.add_rms_norm(x, linear(layer.wo, out.reshape(-1, nh * hd), index, "o", lora), layer.ffn_norm,
                                eps, h)
            gate_up = linear(layer.w_gate_up, h, index, "gate_up", lora)
            act = torch.empty((x.shape[0], gate_up.shape[1] // 2), dtype=torch.float32)
            native.silu_mul(gate_up, act)
            native.add_rms_norm(x, linear(layer.w_down, act, index, "down", lora), norms[index + 1], eps, h)
        return self.w.output(h[batch.logits_indices]).float()

    def _forward_fused(self, batch: ForwardBatch, num_layers: int | None, lora=None) -> torch.Tensor:
        """_forward_rowwise with each layer in one C call (layer.c): the same kernels in the same
        order, so the same bits, without Python between them. `lora`: the step's LoRA adapters in
        their C form (LoraStep.native_struct), applied inside each layer (lora.c)."""
        cfg, eps = self.cfg, self.cfg.rms_eps
        hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        layers = self.layer_structs[:num_layers]
        x, h, norms = self._rowwise_start(batch, len(layers))
        rows = x.shape[0]
        attn_rows, attn_seqs, attn_ctx = self.attention.row_contexts(batch.attn)
        block_tables = batch.attn.block_tables
        assert block_tables.dtype == torch.int32 and block_tables.stride(1) == 1
        buffers = {"qkv": (nh + 2 * nkv) * hd, "attn": nh * hd, "out": cfg.dim, "gate_up": 2 * cfg.ffn_dim,
                   "act": cfg.ffn_dim}
        scratch = {name: torch.empty((rows, width), dtype=torch.float32) for name, width in buffers.items()}
        tensors = scratch | {"x": x, "h": h, "positions": batch.positions, "slots": batch.attn.slot_mapping,
                             "cos": self.rope.cos, "sin": self.rope.sin, "block_tables": block_tables,
                             "attn_rows": attn_rows, "attn_seqs": attn_seqs, "attn_ctx": attn_ctx}
        step = native.StepStruct(rows=rows, dim=cfg.dim, ffn=cfg.ffn_dim, nq=nh, nkv=nkv, hd=hd,
                                 rope_dim=self.rope.rope_dim, block_size=self.kv.keys[0].shape[1],
                                 nthreads=torch.get_num_threads(), eps=eps, scale=self.scale,
                                 ldbt=block_tables.stride(0), rope_positions=self.rope.cos.shape[0],
                                 num_blocks=self.kv.keys[0].shape[0], n_seqs=block_tables.shape[0],
                                 table_width=block_tables.shape[1],
                                 lora=ctypes.addressof(lora[0]) if lora is not None else None,
                                 **{k: t.data_ptr() for k, t in tensors.items()})
        for index, layer in enumerate(layers):
            if lora is not None:
                lora[0].layer = index
            native.layer_forward(layer, step, norms[index + 1])
        return self.w.output(h[batch.logits_indices]).float()


def _native_linear(linear) -> native.LinearStruct | None:
    """The C form of a linear whose matmuls all run in the C kernels (in one mode), else None."""
    parts = linear.parts if isinstance(linear, ConcatLinear) else [linear]
    if len(parts) > 3 or not all(isinstance(p, NativeQuantLinear) for p in parts) \
            or len({p.int8 for p in parts}) != 1:
        return None
    for p in parts:
        p.prepare()                      # its layout for this mode first: the struct holds the weight's type
    return native.linear_struct([(p.weight.qtype, p.weight.raw) for p in parts], parts[0].int8)


def _layer_structs(weights: LlamaWeights, kv: KVCachePool, attention) -> list | None:
    """One native.LayerStruct per layer when the whole layer can run as one C call, else None."""
    if getattr(attention, "name", None) != "torch" or not getattr(attention, "use_native", False):
        return None
    if not all(k.is_contiguous() for k in kv.keys + kv.values):
        return None
    structs = []
    for layer, k_cache, v_cache in zip(weights.layers, kv.keys, kv.values):
        linears = [_native_linear(getattr(layer, name)) for name in ("wqkv", "wo", "w_gate_up", "w_down")]
        if any(linear is None for linear in linears):
            return None
        structs.append(native.LayerStruct(
            attn_norm=layer.attn_norm.data_ptr(), ffn_norm=layer.ffn_norm.data_ptr(),
            qkv=linears[0], wo=linears[1], gate_up=linears[2], down=linears[3],
            k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr()))
    return structs
