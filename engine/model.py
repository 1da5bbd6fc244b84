"""The Llama forward pass over the flattened tokens of one engine step.

All sequences' new tokens are concatenated into one [num_tokens] batch: every
matmul runs once for the whole step, and only attention looks at each
sequence's own KV cache. No padding to the longest sequence, ever.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.config import ModelConfig
from engine.kv_cache import SequenceKVCache


@dataclass(slots=True)
class LayerWeights:
    attn_norm: torch.Tensor  # [dim] fp32
    wqkv: torch.Tensor       # [(n_heads + 2 * n_kv_heads) * head_dim, dim]
    wo: torch.Tensor         # [dim, n_heads * head_dim]
    ffn_norm: torch.Tensor   # [dim] fp32
    w_gate_up: torch.Tensor  # [2 * ffn_dim, dim]
    w_down: torch.Tensor     # [dim, ffn_dim]


@dataclass(slots=True)
class LlamaWeights:
    embed: torch.Tensor   # [vocab, dim]
    layers: list[LayerWeights]
    norm: torch.Tensor    # [dim] fp32
    output: torch.Tensor  # [vocab, dim] (the embedding itself when tied)


@dataclass(slots=True)
class SequenceSlice:
    """One sequence's share of a step: tokens [start, start + length) of the batch."""
    cache: SequenceKVCache
    start: int       # offset in the flattened batch
    length: int      # number of new tokens
    position: int    # position of its first new token (= tokens already cached)


@dataclass(slots=True)
class ForwardBatch:
    token_ids: torch.Tensor       # [num_tokens] int64
    positions: torch.Tensor       # [num_tokens] int64
    slices: list[SequenceSlice]
    logits_indices: torch.Tensor  # [num_logits] int64: rows of the batch whose logits are wanted


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 whatever the activation dtype."""
    return F.rms_norm(x.float(), weight.shape, weight, eps).to(x.dtype)


class RotaryEmbedding:
    """RoPE in GGUF's pair layout: dimensions (2i, 2i+1) rotate together."""

    def __init__(self, cfg: ModelConfig) -> None:
        inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.rope_dim, 2, dtype=torch.float64) / cfg.rope_dim))
        angles = torch.outer(torch.arange(cfg.context_length, dtype=torch.float64), inv_freq)
        self.cos = angles.cos().float()  # [context, rope_dim / 2]
        self.sin = angles.sin().float()
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
    def __init__(self, cfg: ModelConfig, weights: LlamaWeights) -> None:
        self.cfg = cfg
        self.w = weights
        self.rope = RotaryEmbedding(cfg)
        self.dtype = weights.embed.dtype

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Run one step; returns fp32 logits [num_logits, vocab]."""
        x = F.embedding(batch.token_ids, self.w.embed)  # [num_tokens, dim]
        for index, layer in enumerate(self.w.layers):
            x = x + self._attention(index, layer, rms_norm(x, layer.attn_norm, self.cfg.rms_eps), batch)
            h = F.linear(rms_norm(x, layer.ffn_norm, self.cfg.rms_eps), layer.w_gate_up)
            gate, up = h.chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.w_down)
        x = rms_norm(x[batch.logits_indices], self.w.norm, self.cfg.rms_eps)
        return F.linear(x, self.w.output).float()

    def _attention(self, index: int, layer: LayerWeights, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        cfg = self.cfg
        hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        qkv = F.linear(x, layer.wqkv).view(-1, nh + 2 * nkv, hd)
        # One RoPE call rotates the query and key heads together.
        qk = self.rope(qkv[:, : nh + nkv], batch.positions)
        q, k = qk[:, :nh], qk[:, nh:]          # [num_tokens, nh, hd], [num_tokens, nkv, hd]
        v = qkv[:, nh + nkv:]                  # [num_tokens, nkv, hd]
        out = torch.empty_like(q)
        for s in batch.slices:
            rows = slice(s.start, s.start + s.length)
            keys, values = s.cache.append(index, s.position, k[rows], v[rows])  # [ctx, nkv, hd]
            out[rows] = _sequence_attention(q[rows], keys, values, s.position)
        return F.linear(out.view(-1, nh * hd), layer.wo)


def _sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
    """Causal attention of q [L, nh, hd] over k, v [past + L, nkv, hd] (query i sits at past + i)."""
    qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    length = q.shape[0]
    if length == 1:
        out = F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
    elif past == 0:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    else:
        # SDPA's is_causal aligns top-left; queries after cached context need bottom-right.
        mask = torch.ones(length, past + length, dtype=torch.bool).tril(diagonal=past)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)
    return out.transpose(0, 1)
