"""CPU attention over the paged KV cache: the backend that runs on machines without a GPU.

Decode rows (sequences with one new token) go to the C kernel in engine/csrc/attention.c in
ONE call per layer for the whole batch: it reads each sequence's keys and values straight
from its blocks and gives every row the same float operations alone or batched. Rows of
prefill chunks use torch's scaled_dot_product_attention per sequence, over that sequence's
blocks gathered into a contiguous [seq_len, nkv, hd] view (GQA native). Without a C compiler
the decode rows take the SDPA path too (one warning, from engine.native).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from engine import native
from engine.attention.metadata import AttentionMetadata

log = logging.getLogger(__name__)


class TorchAttention:
    name = "torch"

    def __init__(self, native_decode: bool | None = None) -> None:
        """native_decode: use the C decode kernel (default: when it builds here)."""
        self.native_decode = _native_available() if native_decode is None else native_decode

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q [num_tokens, nh, hd] -> out [num_tokens, nh, hd]."""
        out = torch.empty_like(q)
        bs = meta.block_size
        native_rows = self.native_decode and k_cache.dtype in (torch.float32, torch.bfloat16)
        decodes: list[int] = []
        start = 0
        for s, (q_len, seq_len) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
            if q_len == 1 and native_rows:
                decodes.append(s)
            else:
                blocks = meta.block_tables[s, : (seq_len + bs - 1) // bs]
                keys = k_cache[blocks].flatten(0, 1)[:seq_len]    # [seq_len, nkv, hd]
                values = v_cache[blocks].flatten(0, 1)[:seq_len]
                rows = slice(start, start + q_len)
                out[rows] = _causal_sdpa(q[rows], keys.to(q.dtype), values.to(q.dtype), seq_len - q_len, scale)
            start += q_len
        if decodes:
            _decode_rows(q, k_cache, v_cache, meta, decodes, scale, out)
        return out


def _native_available() -> bool:
    try:
        native.library()
    except native.NativeUnavailable as exc:
        log.warning("C kernels unavailable, decode attention runs per sequence on SDPA: %s", exc)
        return False
    return True


def _decode_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                 seqs: list[int], scale: float, out: torch.Tensor) -> None:
    """The single-token sequences `seqs`, all in one C call (float32 arithmetic)."""
    rows = meta.query_start_loc[seqs].long()
    index = torch.tensor(seqs, dtype=torch.int32)
    ctx = meta.seq_lens[index.long()]
    q32 = q if q.dtype == torch.float32 else q.float()
    out32 = out if out.dtype == torch.float32 else torch.empty_like(q32)
    native.paged_attention_rows(q32, k_cache, v_cache, meta.block_tables, rows, index, ctx, scale, out32)
    if out32 is not out:
        out[rows] = out32[rows].to(out.dtype)


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
