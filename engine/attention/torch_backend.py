"""CPU attention over the paged KV cache, built on torch's scaled_dot_product_attention.

Each sequence's blocks are gathered into a contiguous [seq_len, nkv, hd] view and
attended with SDPA (GQA native); it is what runs on machines without a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.metadata import AttentionMetadata


class TorchAttention:
    name = "torch"

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q [num_tokens, nh, hd] -> out [num_tokens, nh, hd]."""
        out = torch.empty_like(q)
        bs = meta.block_size
        start = 0
        for s, (q_len, seq_len) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
            blocks = meta.block_tables[s, : (seq_len + bs - 1) // bs]
            keys = k_cache[blocks].flatten(0, 1)[:seq_len]    # [seq_len, nkv, hd]
            values = v_cache[blocks].flatten(0, 1)[:seq_len]
            rows = slice(start, start + q_len)
            out[rows] = _causal_sdpa(q[rows], keys.to(q.dtype), values.to(q.dtype), seq_len - q_len, scale)
            start += q_len
        return out


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, scale: float) -> torch.Tensor:
    """q [L, nh, hd] over k, v [past + L, nkv, hd]; query i sits at position past + i."""
    qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    length = q.shape[0]
    if length == 1:
        out = F.scaled_dot_product_attention(qt, kt, vt, scale=scale, enable_gqa=True)
    elif past == 0:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
    else:
        # SDPA's is_causal aligns top-left; queries after cached context need bottom-right.
        mask = torch.ones(length, past + length, dtype=torch.bool, device=q.device).tril(diagonal=past)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)
