"""Triton attention over the paged KV cache: split-KV decode (flash-decoding) and varlen prefill.

Both kernels read K/V straight from the cache [num_blocks, block_size, nkv, hd] through the
block tables, one token row at a time, so a sequence's blocks may sit anywhere. All query
heads that share a KV head are processed by one program (GQA), so each KV tile is loaded
once per KV head. The softmax is online, in fp32, in base 2 (scores are pre-scaled by log2 e).

They must never write the KV cache or synchronise with the host: every size the launchers
need (max_query_len, max_seq_len) comes from the host-side metadata. Under
TRITON_INTERPRET=1 they run on CPU tensors, which is how the tests exercise them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from lumen.engine.model.attention.metadata import AttentionMetadata

LOG2E = 1.4426950408889634
MIN_TOKENS_PER_SPLIT = 256   # below this a split's fixed cost (q load, partial write) dominates
MAX_SPLITS = 64
DEFAULT_NUM_SMS = 132        # H100/H200; only used when the device cannot be asked


@triton.jit
def _attn_tiles(acc, l_i, m_i, q, q_pos,
                k_ptr,        # [num_blocks, block_size, nkv, hd] already offset to this KV head
                v_ptr,        # same shape and strides as k_ptr
                table_ptr,    # [max_blocks_per_seq] int32: this sequence's row of the block table
                stride_cb, stride_ct,   # cache strides of a block and of a token row
                lo, hi, qk_scale,
                BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                HEAD_DIM_PAD: tl.constexpr, MASKED: tl.constexpr, COMPUTE_FP32: tl.constexpr):
    """Online softmax over KV positions [lo, hi); q [BLOCK_M, HEAD_DIM_PAD], q_pos [BLOCK_M].

    MASKED=False is the fast path for tiles that lie wholly inside [lo, hi) and wholly at or
    before every query's position; MASKED=True applies both the length and the causal mask.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    for start in range(lo, hi, BLOCK_N):
        kv_pos = start + offs_n                                       # [BLOCK_N]
        in_range = kv_pos < hi
        if MASKED:
            block = tl.load(table_ptr + kv_pos // BLOCK_SIZE, mask=in_range, other=0)
        else:
            block = tl.load(table_ptr + kv_pos // BLOCK_SIZE)
        # int64: block * stride_cb overflows int32 on a cache of a few GiB.
        rows = block.to(tl.int64) * stride_cb + (kv_pos % BLOCK_SIZE) * stride_ct   # [BLOCK_N]
        kv_mask = d_ok[None, :]
        if MASKED:
            kv_mask = kv_mask & in_range[:, None]
        k = tl.load(k_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, HEAD_DIM_PAD]
        v = tl.load(v_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if COMPUTE_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale          # [BLOCK_M, BLOCK_N]
        else:
            qk = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            keep = (kv_pos[None, :] <= q_pos[:, None]) & in_range[None, :]
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_new = tl.where(m_new > float("-inf"), m_new, 0.0)   # a row with nothing visible yet stays at 0
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])                                          # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        if COMPUTE_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _decode_split_kernel(
        q_ptr,            # [num_seqs, nh, hd]: the one new token of each sequence
        k_cache_ptr,      # [num_blocks, block_size, nkv, hd]
        v_cache_ptr,      # [num_blocks, block_size, nkv, hd]
        block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
        seq_lens_ptr,     # [num_seqs] int32
        out_ptr,          # [num_seqs, nh, hd]: written directly when NUM_SPLITS == 1
        part_out_ptr,     # [num_seqs, nh, NUM_SPLITS, hd] fp32, contiguous in (split, hd): each split's normalised output
        part_lse_ptr,     # [num_seqs, nh, NUM_SPLITS] fp32: each split's log2-sum-exp
        stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt, stride_ot, stride_oh,
        stride_pt, stride_ph, stride_lt, stride_lh,
        qk_scale, tokens_per_split,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
        COMPUTE_FP32: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    lo = split * tokens_per_split
    hi = tl.maximum(tl.minimum(lo + tokens_per_split, seq_len), lo)   # empty split: hi == lo

    offs_g = tl.arange(0, GROUP_PAD)       # row g is query head kv_head * GROUP + g
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    heads = kv_head * GROUP + offs_g
    row_mask = (offs_g < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask, other=0.0)                                  # [GROUP_PAD, HEAD_DIM_PAD]
    if COMPUTE_FP32:
        q = q.to(tl.float32)
    q_pos = tl.zeros([GROUP_PAD], dtype=tl.int32) + seq_len - 1

    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    m_i = tl.zeros([GROUP_PAD], dtype=tl.float32) - float("inf")
    k_ptr = k_cache_ptr + kv_head * stride_ch
    v_ptr = v_cache_ptr + kv_head * stride_ch
    table_ptr = block_tables_ptr + seq * stride_bt
    full_hi = lo + (hi - lo) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, q_pos, k_ptr, v_ptr, table_ptr, stride_cb, stride_ct,
                                lo, full_hi, qk_scale, BLOCK_N, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD,
                                False, COMPUTE_FP32)
    acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, q_pos, k_ptr, v_ptr, table_ptr, stride_cb, stride_ct,
                                full_hi, hi, qk_scale, BLOCK_N, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD,
                                True, COMPUTE_FP32)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        tl.store(part_out_ptr + seq * stride_pt + heads[:, None] * stride_ph + split * HEAD_DIM
                 + offs_d[None, :], out, mask=row_mask)
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + seq * stride_lt + heads * stride_lh + split, lse, mask=offs_g < GROUP)


@triton.jit
def _decode_reduce_kernel(
        part_out_ptr,     # [num_seqs, nh, NUM_SPLITS, hd] fp32
        part_lse_ptr,     # [num_seqs, nh, NUM_SPLITS] fp32
        out_ptr,          # [num_seqs, nh, hd]
        stride_pt, stride_ph, stride_lt, stride_lh, stride_ot, stride_oh,
        NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    s_ok = offs_s < NUM_SPLITS
    lse = tl.load(part_lse_ptr + seq * stride_lt + head * stride_lh + offs_s, mask=s_ok,
                  other=float("-inf"))                                       # [SPLITS_PAD]
    m = tl.max(lse, 0)
    m = tl.where(m > float("-inf"), m, 0.0)
    w = tl.exp2(lse - m)                                   # empty splits weigh exactly 0
    mask = s_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    parts = tl.load(part_out_ptr + seq * stride_pt + head * stride_ph + offs_s[:, None] * HEAD_DIM
                    + offs_d[None, :], mask=mask, other=0.0)                 # [SPLITS_PAD, HEAD_DIM_PAD]
    out = tl.sum(parts * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)   # [HEAD_DIM_PAD]
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@triton.jit
def _prefill_kernel(
        q_ptr,            # [num_tokens, nh, hd]: each sequence's new tokens back to back
        k_cache_ptr,      # [num_blocks, block_size, nkv, hd]
        v_cache_ptr,      # [num_blocks, block_size, nkv, hd]
        block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
        seq_lens_ptr,     # [num_seqs] int32
        query_start_loc_ptr,  # [num_seqs + 1] int32
        out_ptr,          # [num_tokens, nh, hd]
        stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt, stride_ot, stride_oh,
        qk_scale,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
        COMPUTE_FP32: tl.constexpr):
    q_block = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= q_len:     # the grid is sized for the longest query
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len

    # Row r holds query q_block * BLOCK_Q + r // GROUP_PAD of head kv_head * GROUP + r % GROUP_PAD.
    offs_m = tl.arange(0, BLOCK_Q * GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_idx = q_block * BLOCK_Q + offs_m // GROUP_PAD
    heads = kv_head * GROUP + offs_m % GROUP_PAD
    row_ok = (q_idx < q_len) & (offs_m % GROUP_PAD < GROUP)
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    tokens = (q_start + q_idx).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask, other=0.0)                                      # [BLOCK_M, HEAD_DIM_PAD]
    if COMPUTE_FP32:
        q = q.to(tl.float32)
    q_pos = context + q_idx            # rows past q_len see everything below hi; they are not stored

    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32) - float("inf")
    k_ptr = k_cache_ptr + kv_head * stride_ch
    v_ptr = v_cache_ptr + kv_head * stride_ch
    table_ptr = block_tables_ptr + seq * stride_bt
    first_pos = context + q_block * BLOCK_Q
    hi = context + tl.minimum((q_block + 1) * BLOCK_Q, q_len)      # one past the last query's position
    full_hi = (first_pos + 1) // BLOCK_N * BLOCK_N                 # tiles every query of the block sees whole
    acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, q_pos, k_ptr, v_ptr, table_ptr, stride_cb, stride_ct,
                                0, full_hi, qk_scale, BLOCK_N, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD,
                                False, COMPUTE_FP32)
    acc, l_i, m_i = _attn_tiles(acc, l_i, m_i, q, q_pos, k_ptr, v_ptr, table_ptr, stride_cb, stride_ct,
                                full_hi, hi, qk_scale, BLOCK_N, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD,
                                True, COMPUTE_FP32)
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


INTERPRETED = isinstance(_prefill_kernel, InterpretedFunction)   # TRITON_INTERPRET=1 at import time


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float, num_splits: int | None = None) -> torch.Tensor:
    """One query token per sequence: q [num_seqs, nh, hd] -> out [num_seqs, nh, hd].

    The KV length is cut into at most `num_splits` pieces (chosen from max_seq_len and the
    batch size when None); each (sequence, KV head, split) is one program, and a second
    kernel merges the splits by their log-sum-exp.
    """
    group = _check_inputs(q, k_cache, v_cache, meta)
    num_seqs, num_heads, head_dim = q.shape
    assert num_seqs == meta.num_seqs and meta.max_query_len == 1, \
        "decode attention takes exactly one query token per sequence; use paged_prefill_attention"
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    max_seq_len = meta.max_seq_len
    if num_splits is None:
        num_splits = choose_num_splits(max_seq_len, num_seqs, k_cache.shape[2], _num_sms(q.device))
    assert num_splits >= 1, f"num_splits must be at least 1, got {num_splits}"
    tokens_per_split = triton.cdiv(max_seq_len, min(num_splits, max_seq_len))
    num_splits = triton.cdiv(max_seq_len, tokens_per_split)     # no split column is empty for every sequence
    head_dim_pad = _head_dim_pad(head_dim)
    block_n, num_warps, num_stages = _decode_config(head_dim_pad, tokens_per_split)
    part_out = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
    grid = (num_seqs, k_cache.shape[2], num_splits)
    _decode_split_kernel[grid](
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, out, part_out, part_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        meta.block_tables.stride(0), out.stride(0), out.stride(1),
        part_out.stride(0), part_out.stride(1), part_lse.stride(0), part_lse.stride(1),
        scale * LOG2E, tokens_per_split,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_SIZE=meta.block_size, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, NUM_SPLITS=num_splits,
        COMPUTE_FP32=_compute_fp32(q.dtype), num_warps=num_warps, num_stages=num_stages)
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part_out, part_lse, out, part_out.stride(0), part_out.stride(1), part_lse.stride(0),
            part_lse.stride(1), out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad, num_warps=4)
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Any mix of query lengths (1 included), causal over cached context: q, out [num_tokens, nh, hd]."""
    group = _check_inputs(q, k_cache, v_cache, meta)
    num_tokens, _, head_dim = q.shape
    assert num_tokens == sum(meta.query_lens_list), \
        f"q has {num_tokens} tokens but the metadata schedules {sum(meta.query_lens_list)}"
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    group_pad = triton.next_power_of_2(group)
    head_dim_pad = _head_dim_pad(head_dim)
    block_q, block_n, num_warps, num_stages = _prefill_config(group_pad, head_dim_pad, meta.max_query_len,
                                                              meta.max_seq_len)
    grid = (triton.cdiv(meta.max_query_len, block_q), meta.num_seqs, k_cache.shape[2])
    _prefill_kernel[grid](
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        meta.block_tables.stride(0), out.stride(0), out.stride(1), scale * LOG2E,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_SIZE=meta.block_size,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, COMPUTE_FP32=_compute_fp32(q.dtype),
        num_warps=num_warps, num_stages=num_stages)
    return out


def choose_num_splits(max_seq_len: int, num_seqs: int, num_kv_heads: int, num_sms: int = DEFAULT_NUM_SMS) -> int:
    """Split until the (sequence, KV head, split) programs cover the SMs twice, never below
    MIN_TOKENS_PER_SPLIT tokens a split: short contexts and big batches stay unsplit."""
    wanted = triton.cdiv(2 * num_sms, max(1, num_seqs * num_kv_heads))
    most = max(1, triton.cdiv(max_seq_len, MIN_TOKENS_PER_SPLIT))
    return max(1, min(wanted, most, MAX_SPLITS))


def _check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> int:
    """Assert what the kernels rely on; return the GQA group size nh // nkv."""
    assert q.dim() == 3 and k_cache.dim() == 4, \
        "q must be [num_tokens, nh, hd] and the caches [num_blocks, block_size, nkv, hd]"
    assert k_cache.shape == v_cache.shape, f"k_cache {tuple(k_cache.shape)} != v_cache {tuple(v_cache.shape)}"
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    assert q.shape[2] == head_dim, f"q head_dim {q.shape[2]} != cache head_dim {head_dim}"
    assert q.shape[1] % num_kv_heads == 0, f"{q.shape[1]} query heads are not a multiple of {num_kv_heads} KV heads"
    assert head_dim <= 256, f"head_dim {head_dim} > 256 is not supported"
    assert block_size == meta.block_size and block_size & (block_size - 1) == 0, \
        f"cache block size {block_size} must equal meta.block_size {meta.block_size} and be a power of two"
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {q.dtype}"
    assert q.dtype == k_cache.dtype == v_cache.dtype, \
        f"q {q.dtype} and the caches {k_cache.dtype}/{v_cache.dtype} must share one dtype"
    assert q.stride(2) == 1, "q's head_dim must be contiguous (a view over heads is fine)"
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "the KV caches must be contiguous"
    for name in ("query_start_loc", "seq_lens", "block_tables"):
        t = getattr(meta, name)
        assert t.dtype == torch.int32, f"meta.{name} must be int32, got {t.dtype}"
        assert t.device == q.device, f"meta.{name} is on {t.device}, q on {q.device}: call meta.to(device)"
    assert meta.block_tables.stride(1) == 1, "meta.block_tables rows must be contiguous"
    assert k_cache.device == q.device == v_cache.device, "q and the caches must be on one device"
    assert q.is_cuda or INTERPRETED, "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 set before import)"
    return q.shape[1] // num_kv_heads


def _compute_fp32(dtype: torch.dtype) -> bool:
    # The interpreter's bf16 arithmetic is wrong, so there bf16 is upcast right after loading.
    return dtype == torch.float32 or (INTERPRETED and dtype == torch.bfloat16)


def _head_dim_pad(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))   # tl.dot needs every dimension >= 16


def _decode_config(head_dim_pad: int, tokens_per_split: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the decode split kernel."""
    if INTERPRETED:   # interpreted cost is per operation, not per element: few, large tiles
        return min(256, max(16, triton.next_power_of_2(tokens_per_split))), 4, 2
    return (64 if head_dim_pad <= 128 else 32), 4, 2


def _prefill_config(group_pad: int, head_dim_pad: int, max_query_len: int,
                    max_seq_len: int) -> tuple[int, int, int, int]:
    """(BLOCK_Q, BLOCK_N, num_warps, num_stages); a program's rows are BLOCK_Q queries x group_pad
    heads, at least 16."""
    min_q = max(1, 16 // group_pad)
    if INTERPRETED:
        block_q = max(min_q, min(triton.next_power_of_2(max_query_len), max(1, 256 // group_pad)))
        return block_q, min(128, max(16, triton.next_power_of_2(max_seq_len))), 4, 2
    rows = 128 if head_dim_pad <= 64 else 64
    block_q = max(min_q, rows // group_pad)
    return block_q, 64 if head_dim_pad <= 128 else 32, 4 if block_q * group_pad <= 64 else 8, 2


_SM_COUNTS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]
