"""CPU attention over the paged KV cache: the backend that runs on machines without a GPU.

Every query row goes to the C kernel in native/csrc/attention.c, in ONE call per layer for
the whole batch: it reads each sequence's keys and values straight from its blocks, and a
row's float operations depend only on its query and its context, never on the batch, the
prefill chunking or a speculative verify around it. So a token gets the same bits whether
it is decoded alone, batched, prefilled in any chunks or verified as a draft (its speed
against torch's float32 SDPA: BENCHMARKS.md, "Figures from code comments"). Without a C
compiler, torch's scaled_dot_product_attention runs per sequence over its gathered blocks
instead (one warning; results then depend on chunking in the last bits).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from lumen.engine.model.attention.metadata import AttentionMetadata
from lumen.engine.native import kernels as native

log = logging.getLogger(__name__)


class TorchAttention:
    name = "torch"

    def __init__(self, use_native: bool | None = None) -> None:
        """use_native: use the C kernel (default: when it builds here), else SDPA per sequence."""
        self.use_native = _native_available() if use_native is None else use_native
        # The step's (rows, sequences, contexts) for the C kernel: the same for every layer.
        self._rows: tuple[AttentionMetadata, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q [num_tokens, nh, hd] -> out [num_tokens, nh, hd]."""
        if self.use_native and k_cache.dtype in (torch.float32, torch.bfloat16):
            # A view of the qkv rows is fine as it is: the kernel takes the row stride.
            q32 = q if q.dtype == torch.float32 and q.stride()[1:] == (q.shape[2], 1) else q.float().contiguous()
            out = torch.empty(q32.shape, dtype=torch.float32)
            native.paged_attention_rows(q32, k_cache, v_cache, meta.block_tables, *self.row_contexts(meta), scale, out)
            return out if q.dtype == torch.float32 else out.to(q.dtype)
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

    def row_contexts(self, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The C kernel's (rows, sequences, context lengths) for this step, computed once per step."""
        if self._rows is None or self._rows[0] is not meta:
            self._rows = (meta, _row_contexts(meta))
        return self._rows[1]


def _native_available() -> bool:
    try:
        native.library()
    except native.NativeUnavailable as exc:
        log.warning("C kernels unavailable, attention runs per sequence on SDPA: %s", exc)
        return False
    return True


def _row_contexts(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, its sequence, its context length) for every query row: row i of sequence s sees
    its first seq_len - query_len + i + 1 positions."""
    query_lens = torch.tensor(meta.query_lens_list, dtype=torch.int64)
    seqs = torch.repeat_interleave(torch.arange(len(query_lens), dtype=torch.int32), query_lens)
    rows = torch.arange(int(query_lens.sum()), dtype=torch.int64)
    past = (meta.seq_lens.long() - query_lens)[seqs.long()]
    ctx = (past + rows - meta.query_start_loc.long()[seqs.long()] + 1).to(torch.int32)
    return rows, seqs, ctx


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
