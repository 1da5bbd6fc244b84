"""CUDA attention over the paged KV cache, built on the Triton kernels of lumen.engine.triton_kernels.

Steps whose every sequence brings one new token go to the split-KV decode kernel; any other
mix (prefill, chunked prefill, decodes among prefills) goes to the varlen prefill kernel.
It must never move tensors between devices or synchronise with the host: the metadata has
to be on q's device already (AttentionMetadata.to) and host-side sizes come from its lists.
"""
from __future__ import annotations

import torch

from lumen.engine.model.attention.metadata import AttentionMetadata
from lumen.engine.triton_kernels.paged_attention import paged_decode_attention, paged_prefill_attention


class TritonAttention:
    name = "triton"

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q [num_tokens, nh, hd] -> out [num_tokens, nh, hd]."""
        if meta.max_query_len == 1:
            return paged_decode_attention(q, k_cache, v_cache, meta, scale)
        return paged_prefill_attention(q, k_cache, v_cache, meta, scale)
