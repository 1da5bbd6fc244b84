"""Python entry points of the C kernels (see library.py for how they are built and loaded).

Each function checks the tensors' dtypes and layouts before handing their addresses to C, and
the C side checks every size and index it is given before it touches memory (qmatmul.h's
error codes); a refusal becomes a `NativeInputError` saying what was wrong.
"""
from __future__ import annotations

import ctypes

import torch

from lumen.engine.native.library import (LayerStruct, LinearStruct, NativeUnavailable, StepStruct, available, library,
                                        vector_isa)

__all__ = ["LayerStruct", "LinearStruct", "NativeInputError", "NativeUnavailable", "StepStruct", "available",
           "library"]

# qmatmul.h's return codes.
OK, E_TYPE, E_NOMEM, E_SHAPE, E_INDEX = 0, -1, -2, -3, -4


class NativeInputError(ValueError):
    """A C kernel refused what it was given (a type it cannot decode, rows that do not hold k
    values, an index out of range); the message says which."""


def rows_problem(qtype: int, row_bytes: int, k: int) -> str:
    """Why rows of `row_bytes` bytes cannot hold `k` values of `qtype` (for an error message)."""
    layout = block_layout(qtype)
    if layout is None:
        return f"cannot decode GGML type {qtype} (the C kernels have no decoder for it)"
    bs, ts = layout
    if k <= 0 or k % bs:
        return f"k = {k} is not a positive multiple of GGML type {qtype}'s {bs}-value blocks"
    return f"a row of {k} values of GGML type {qtype} takes {k // bs * ts} bytes, the rows given have {row_bytes}"


def _check(rc: int, what: str, problem) -> None:
    """Raise for a C entry point's error code; `problem()` describes an input it refused."""
    if rc == OK:
        return
    if rc == E_NOMEM:
        raise MemoryError(f"{what} could not allocate its buffers")
    raise NativeInputError(f"{what}: {problem()}")


def block_layout(qtype: int) -> tuple[int, int] | None:
    """(values per block, bytes per block) if the C kernels handle `qtype`, else None."""
    bs, ts = ctypes.c_int(), ctypes.c_int()
    if library().lumen_block_layout(int(qtype), ctypes.byref(bs), ctypes.byref(ts)) != 0:
        return None
    return bs.value, ts.value


# The matmul modes (qmatmul.h): "exact" widens the weights to float32 and multiplies in float32;
# "int8" quantizes each activation row and multiplies integers (q8matmul.c), for the types
# int8_type() names: to 8 bits with a scale per 8 values for Q8_0; for Q4_0 and Q4_1 to 8 bits per
# 8 values times an integer multiplier of a scale per 32 values; for the K-quants to 8 bits per 16
# values times an integer multiplier of a scale per 256 values; other types compute as in "exact".
# "auto" takes one of the two for each weight: the one this kernel build runs faster for its type
# (auto_int8). A linear's mode never depends on the batch, so a row's result does not either.
MATMUL_MODES = ("exact", "int8", "auto")

Q4_0, Q4_1 = 2, 3
INT8_NAMES = {8: "Q8_0", Q4_0: "Q4_0", Q4_1: "Q4_1", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}   # the GGML ids
# The types whose int8 kernels the AVX-512 build runs faster than its 16-lane float paths, in
# prefill, decode and 16 streams alike on Xeon-ICX and EPYC-Zen4 but for Q4_0 prefill on the
# latter, 0.96x (BENCHMARKS.md, "auto per weight type"); its float paths stay faster for the other
# types' batches. The AVX2 build's int8 kernels are the faster for every type; the scalar build's
# float path is.
AVX512_INT8 = (Q4_0, Q4_1)


def auto_int8(qtype: int) -> bool:
    """Whether the "auto" matmul mode multiplies a weight of `qtype` (a GGML type or an _X8 layout)
    in the int8 mode on this kernel build. A type without integer kernels computes the same in
    either mode: True, so that it does not keep a linear it shares with others out of the int8 mode."""
    base = X8_BASE.get(qtype, qtype)
    try:
        if not int8_type(base):
            return True
        isa = vector_isa()
    except NativeUnavailable:
        return False
    return isa == "AVX2" or (isa == "AVX-512" and base in AVX512_INT8)


def describe_auto() -> str:
    """What the "auto" matmul mode takes on this kernel build, for the server's log."""
    int8 = [name for t, name in INT8_NAMES.items() if auto_int8(t)]
    exact = [name for name in INT8_NAMES.values() if name not in int8]
    if not exact:
        return "int8 for every type with integer kernels (" + ", ".join(int8) + ")"
    if not int8:
        return "exact for every type"
    return f"int8 for {', '.join(int8)}; exact for {', '.join(exact)} and the other types"


def int8_type(qtype: int) -> bool:
    """Whether the int8 mode has integer kernels for `qtype`."""
    return bool(library().lumen_int8_type(int(qtype)))


def qmatmul_into(qtype: int, raw: torch.Tensor, k: int, x: torch.Tensor, y: torch.Tensor,
                 mode: str = "exact") -> None:
    """y[:, :n] = x @ W^T, W the GGUF rows `raw` (uint8 [n, row_bytes]); x float32 [m, k].

    y may be a column slice of a wider float32 matrix (its rows must be contiguous inside).
    `mode`: one of MATMUL_MODES."""
    n, row_bytes = raw.shape
    m = x.shape[0]
    assert raw.dtype == torch.uint8 and raw.stride(1) == 1 and raw.stride(0) == row_bytes, \
        "raw must be contiguous uint8 rows"
    assert x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == k and x.stride(1) == 1, \
        f"x must be float32 [m, {k}] with contiguous rows, got {x.dtype} {tuple(x.shape)}"
    assert y.dtype == torch.float32 and y.shape == (m, n) and y.stride(1) == 1, \
        f"y must be float32 [{m}, {n}] with contiguous rows, got {y.dtype} {tuple(y.shape)}"
    if mode not in MATMUL_MODES:
        raise ValueError(f"unknown matmul mode {mode!r}: use one of {', '.join(MATMUL_MODES)}")
    if m == 0 or n == 0:
        return
    qmatmul_checked_weight(int(qtype), raw.data_ptr(), row_bytes, n, k, x, y,
                           mode == "int8" or (mode == "auto" and auto_int8(int(qtype))))


# qmatmul.h's _X8 types: Q4_0 and Q4_1 weights whose rows are interleaved 8 at a time
# (q8matmul.c), so that the int8 mode's kernels compute 8 outputs a vector register (on weights in
# the file's layout they interleave 8 rows at a time into a buffer as they go). Not GGML
# types (the GGML id plus 1000): only the int8 mode reads them, and `interleave` turns them back.
X8 = {Q4_0: 1002, Q4_1: 1003}
X8_BASE = {v: k for k, v in X8.items()}


def interleave(raw: torch.Tensor, qtype: int, k: int, to_x8: bool) -> None:
    """Rearrange a Q4_0 or Q4_1 weight (`qtype`: its GGML type; uint8 [n, row_bytes], k
    values a row) in place: into its _X8 layout (to_x8) or back into the file's; its last n mod 8
    rows stay as they are."""
    n, row_bytes = raw.shape
    assert raw.dtype == torch.uint8 and raw.is_contiguous() and raw.device.type == "cpu", \
        "raw must be contiguous uint8 rows in CPU memory"
    rc = library().lumen_interleave(int(qtype), raw.data_ptr(), n, row_bytes, k, int(to_x8))
    _check(rc, "lumen_interleave", lambda: rows_problem(qtype, row_bytes, k) if qtype in X8
           else f"GGML type {qtype} has no interleaved layout (Q4_0 and Q4_1 do)")


def qmatmul_checked_weight(qtype: int, raw_ptr: int, row_bytes: int, n: int, k: int, x: torch.Tensor,
                           y: torch.Tensor, int8: bool = False) -> None:
    """qmatmul_into over a weight checked once by the caller (its address and row length), for
    x and y of the right shapes: the per-call path of lumen.engine.model.linear.NativeQuantLinear."""
    lib = library()
    if qtype in X8_BASE and not int8:
        raise NativeInputError(f"an interleaved weight (type {qtype}) is multiplied by the int8 mode only: "
                               "turn it back into the file's layout (interleave) for the exact mode")
    rc = (lib.lumen_qmatmul_int8 if int8 else lib.lumen_qmatmul)(
        qtype, raw_ptr, row_bytes, n, k, x.data_ptr(), x.shape[0], x.stride(0), y.data_ptr(), y.stride(0),
        torch.get_num_threads())
    _check(rc, "lumen_qmatmul", lambda: rows_problem(X8_BASE.get(qtype, qtype), row_bytes, k))


def decode_rows(qtype: int, raw: torch.Tensor, k: int) -> torch.Tensor:
    """Decode GGUF rows (uint8 [n, row_bytes]) to float32 [n, k] with the C decoders."""
    raw = raw.contiguous()
    assert raw.dtype == torch.uint8 and raw.dim() == 2, f"raw must be uint8 [n, row_bytes], got {raw.dtype}"
    out = torch.empty((raw.shape[0], k), dtype=torch.float32)
    lib = library()
    row_bytes = raw.shape[1]
    for i in range(raw.shape[0]):
        rc = lib.lumen_decode_row(int(qtype), raw[i].data_ptr(), row_bytes, k, out[i].data_ptr())
        _check(rc, "lumen_decode_row", lambda: rows_problem(int(qtype), row_bytes, k))
    return out


def paged_attention_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, rows: torch.Tensor, seqs: torch.Tensor,
                         ctx_lens: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    """out[rows[i]] = attention of q[rows[i]] over the first ctx_lens[i] cached positions of
    sequence seqs[i] (its block table: block_tables[seqs[i]]), each row on its own.

    q, out: float32 [num_tokens, nh, hd] with contiguous rows; caches float32 or bfloat16
    [num_blocks, block_size, nkv, hd] contiguous; block_tables int32; rows int64; seqs and
    ctx_lens int32 (one entry per row)."""
    nh, hd = q.shape[1], q.shape[2]
    block_size, nkv = k_cache.shape[1], k_cache.shape[2]
    assert q.dtype == out.dtype == torch.float32 and q.shape == out.shape, "q and out must be float32, same shape"
    assert q.stride()[1:] == (hd, 1) and out.stride()[1:] == (hd, 1), "q and out need contiguous [nh, hd] rows"
    assert k_cache.dtype == v_cache.dtype and k_cache.dtype in (torch.float32, torch.bfloat16), \
        f"caches must both be float32 or bfloat16, got {k_cache.dtype} and {v_cache.dtype}"
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
    assert k_cache.shape[3] == hd and nh % nkv == 0, f"{nh} query heads of {hd} over {tuple(k_cache.shape)}"
    assert block_tables.dtype == torch.int32 and block_tables.stride(1) == 1
    assert rows.dtype == torch.int64 and seqs.dtype == ctx_lens.dtype == torch.int32
    assert rows.is_contiguous() and seqs.is_contiguous() and ctx_lens.is_contiguous()
    assert rows.numel() == seqs.numel() == ctx_lens.numel()
    if rows.numel() == 0:
        return
    rc = library().lumen_paged_attention_rows(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), int(k_cache.dtype == torch.bfloat16),
        block_tables.data_ptr(), block_tables.stride(0), rows.data_ptr(), seqs.data_ptr(), ctx_lens.data_ptr(),
        rows.numel(), nh, nkv, hd, block_size, scale, out.data_ptr(), out.stride(0), torch.get_num_threads(),
        q.shape[0], block_tables.shape[0], block_tables.shape[1], k_cache.shape[0])
    _check(rc, "lumen_paged_attention_rows", lambda: (
        f"a query row, sequence, context length or block id is out of range (q has {q.shape[0]} rows, the block "
        f"table {block_tables.shape[0]} sequences of {block_tables.shape[1]} blocks, the cache "
        f"{k_cache.shape[0]} blocks of {block_size})"))


# The row-wise work between matmuls (rowwise.c). Callers (lumen.engine.model.llama's native
# path) pass float32 tensors whose rows are contiguous; the checks below are the ones that
# keep the C code inside its buffers.

def _rows_ok(t: torch.Tensor, width: int) -> bool:
    return t.dtype == torch.float32 and t.dim() == 2 and t.shape[1] >= width and t.stride(1) == 1


def add_rms_norm(x: torch.Tensor, dx: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 out: torch.Tensor) -> None:
    """out = rms_norm(x (+= dx, in place, when dx is given)) * weight; all float32 [rows, dim]."""
    rows, dim = x.shape
    assert _rows_ok(x, dim) and _rows_ok(out, dim) and out.shape[0] == rows and weight.numel() == dim
    assert dx is None or (_rows_ok(dx, dim) and dx.shape[0] == rows)
    library().lumen_add_rms_norm(x.data_ptr(), x.stride(0), None if dx is None else dx.data_ptr(),
                                 0 if dx is None else dx.stride(0), rows, dim, weight.data_ptr(), eps,
                                 out.data_ptr(), out.stride(0))


def rope_store(qkv: torch.Tensor, nq: int, nkv: int, hd: int, rope_dim: int, positions: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               slots: torch.Tensor) -> None:
    """RoPE on qkv's query and key heads in place, then its keys and values into cache slots
    (positions and slots checked against the tables and caches first, in C)."""
    rows = qkv.shape[0]
    assert _rows_ok(qkv, (nq + 2 * nkv) * hd) and positions.dtype == slots.dtype == torch.int64
    assert positions.numel() == slots.numel() == rows and positions.is_contiguous() and slots.is_contiguous()
    assert k_cache.dtype == v_cache.dtype == torch.float32 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert cos.shape == sin.shape and cos.shape[1] == rope_dim // 2 and cos.is_contiguous() and sin.is_contiguous()
    assert k_cache.shape[-2:] == (nkv, hd) and k_cache.shape == v_cache.shape
    cache_rows = k_cache.numel() // (nkv * hd)
    rc = library().lumen_rope_store(qkv.data_ptr(), qkv.stride(0), rows, nq, nkv, hd, rope_dim, positions.data_ptr(),
                                    cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                    slots.data_ptr(), cos.shape[0], cache_rows)
    _check(rc, "lumen_rope_store", lambda: positions_slots_problem(positions, slots, cos.shape[0], cache_rows))


def positions_slots_problem(positions: torch.Tensor, slots: torch.Tensor, table_rows: int, cache_rows: int) -> str:
    if positions.numel() and not (0 <= int(positions.min()) and int(positions.max()) < table_rows):
        return f"position outside the RoPE table of {table_rows} positions"
    return f"KV slot outside the cache's {cache_rows} slots"


def check_positions_slots(positions: torch.Tensor, slots: torch.Tensor, table_rows: int, cache_rows: int) -> None:
    """Refuse positions beyond the RoPE table or KV slots outside a cache of `cache_rows` rows."""
    assert positions.dtype == slots.dtype == torch.int64 and positions.numel() == slots.numel()
    positions, slots = positions.contiguous(), slots.contiguous()
    rc = library().lumen_check_positions_slots(positions.data_ptr(), slots.data_ptr(), positions.numel(),
                                               table_rows, cache_rows)
    _check(rc, "positions and slots", lambda: positions_slots_problem(positions, slots, table_rows, cache_rows))


def silu_mul(h: torch.Tensor, out: torch.Tensor) -> None:
    """out = silu(h[:, :ffn]) * h[:, ffn:], ffn = out's width."""
    rows, ffn = out.shape
    assert _rows_ok(h, 2 * ffn) and _rows_ok(out, ffn) and h.shape[0] == rows
    library().lumen_silu_mul(h.data_ptr(), h.stride(0), rows, ffn, out.data_ptr(), out.stride(0))


def linear_struct(parts: list[tuple[int, torch.Tensor]], int8: bool = False) -> LinearStruct:
    """[(qtype, raw uint8 rows)] stacked by rows, each checked as qmatmul_into checks it; int8: the
    int8 matmul mode."""
    assert 1 <= len(parts) <= 3
    st = LinearStruct(parts=len(parts), int8=int(int8))
    for i, (qtype, raw) in enumerate(parts):
        assert raw.dtype == torch.uint8 and raw.dim() == 2 and raw.stride() == (raw.shape[1], 1)
        st.qtype[i], st.w[i], st.row_bytes[i], st.n[i] = int(qtype), raw.data_ptr(), raw.shape[1], raw.shape[0]
    return st


def layer_forward(layer: LayerStruct, step: StepStruct, next_norm: torch.Tensor) -> None:
    """Run one decoder layer (layer.h); its sizes and indices are checked in C before any write."""
    rc = library().lumen_layer_forward(ctypes.byref(layer), ctypes.byref(step), next_norm.data_ptr())
    _check(rc, "lumen_layer_forward", lambda: {
        E_TYPE: "cannot decode a weight's GGML type (the C kernels have no decoder for it)",
        E_SHAPE: "a weight's rows do not hold its input's values, or its parts do not add up to the layer's width, "
                 "or a LoRA target's rank or columns do not fit its linear",
        E_INDEX: (f"a position, KV slot, sequence or block id is out of range (RoPE table {step.rope_positions} "
                  f"positions, cache {step.num_blocks} blocks, block table {step.n_seqs} x {step.table_width}), "
                  "or a row names no LoRA adapter of the step"),
    }.get(rc, f"error {rc}"))
