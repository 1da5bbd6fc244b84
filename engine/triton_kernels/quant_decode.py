"""Per-type Triton decoders of the planes in `quant_pack`, shared by the GEMV and GEMM kernels.

Each `_q*` decoder loads one tile: BN weight rows by G groups (a group is 16 bytes of the main
quant plane, `Layout.group` K values) held as [BN, G, H, VEC] (a thread holds one VEC-byte slice
of a group in each row), decodes scales once per (row, slice), and hands each *piece* (16 values
of a group with one scale and min) to `_piece`. For a GEMV that accumulates fp32 dot products
on CUDA cores and applies the scale once per slice; for a GEMM it dequantizes the piece (in fp16
when x is fp16, else fp32) and feeds tl.dot. Pieces cover K in runs of 16 and x is gathered to
match, so no weight is ever moved into K order.

Quants become floats by the exponent trick: an integer below 2^23 ORed into the mantissa of
2^23 is the float 2^23 + q, exact, with no int-to-float conversion; the GEMV strips the 2^23
inside its FFMA (`_piece`), and on CUDA builds those floats four bytes at a time with inline PTX
(`_magic`). Decoded weights follow ggml's float order (`d * sc`, then `* q - dmin * m`), so an
fp32 GEMM sees exactly the weights `lumen.engine.weights.quant` produces. These functions never store.
"""
from __future__ import annotations

import triton
import triton.language as tl

# GGML type ids (gguf.GGMLQuantizationType values), as constexprs so the kernels may read them.
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = (tl.constexpr(t) for t in (2, 3, 6, 7, 8))
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = (tl.constexpr(t) for t in (10, 11, 12, 13, 14))


def _ptx(prep: str) -> tl.constexpr:
    """Inline PTX for `_magic`: `prep` turns 4 packed bytes $4 (and $5) into 4 small ints in the bytes
    of t; prmt then builds each float 2^23 + byte (0x4B0000bb) in one instruction."""
    prmt = " ".join(f"prmt.b32 ${i}, t, m, 0x754{i};" for i in range(4))
    return tl.constexpr("{.reg .b32 t, a, b, m; mov.b32 m, 0x4B000000; " + prep + " " + prmt + "}")


PTX_LO = _ptx("and.b32 t, $4, 0x0F0F0F0F;")                                 # low nibbles
PTX_HI = _ptx("shr.b32 t, $4, 4; and.b32 t, t, 0x0F0F0F0F;")                # high nibbles
PTX_XOR = _ptx("xor.b32 t, $4, 0x80808080;")                                # int8 + 128
# Q6_K piece i: a nibble of $4 (ql) with 2 bits of $5 (qh) above it.
PTX_Q6_0 = _ptx("and.b32 a, $4, 0x0F0F0F0F; shl.b32 b, $5, 4; and.b32 b, b, 0x30303030; or.b32 t, a, b;")
PTX_Q6_1 = _ptx("and.b32 a, $4, 0x0F0F0F0F; shl.b32 b, $5, 2; and.b32 b, b, 0x30303030; or.b32 t, a, b;")
PTX_Q6_2 = _ptx("shr.b32 a, $4, 4; and.b32 a, a, 0x0F0F0F0F; and.b32 b, $5, 0x30303030; or.b32 t, a, b;")
PTX_Q6_3 = _ptx("shr.b32 a, $4, 4; and.b32 a, a, 0x0F0F0F0F; shr.b32 b, $5, 2; and.b32 b, b, 0x30303030; "
                "or.b32 t, a, b;")


@triton.jit
def _load(ptrs, mask, MASK: tl.constexpr):
    if MASK:
        v = tl.load(ptrs, mask=mask, other=0)
    else:
        v = tl.load(ptrs)
    return v


@triton.jit
def _lanes(VEC: tl.constexpr):
    """Offsets 0..15 of a piece as [16 // VEC, VEC]: VEC consecutive values per thread."""
    return tl.arange(0, 16 // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]


@triton.jit
def _koff(base, VEC: tl.constexpr):
    """K indices [G, 16 // VEC, VEC] of pieces that start at base [G]."""
    return base[:, None, None] + _lanes(VEC)[None, :, :]


@triton.jit
def _load16(p, stride, rows, start, g_mask, MASK: tl.constexpr, VEC: tl.constexpr):
    """16 bytes from byte `start` [G] of each row [BN] (int64): uint8 [BN, G, 16 // VEC, VEC]."""
    ptrs = p + (rows * stride)[:, None, None, None] + start[None, :, None, None] + _lanes(VEC)[None, None, :, :]
    return _load(ptrs, g_mask[None, :, None, None], MASK)


@triton.jit
def _load_g(p, stride, rows, idx, g_mask, MASK: tl.constexpr, VEC: tl.constexpr):
    """Element idx [G] of each row [BN] (a scale), for each of a group's H = 16 // VEC lanes: [BN, G, H].

    Every thread loads the scale of its own 16-byte slice, so the result already has the quant
    tile's layout. The `where` hides idx's contiguity from Triton: a load it could vectorise
    along G would get another layout and a shared-memory round trip per tile to fix it.
    """
    h = tl.arange(0, 16 // VEC)[None, None, :] * 0
    idx = tl.where(idx >= 0, idx, 0)
    return _load(p + (rows * stride)[:, None, None] + idx[None, :, None] + h, g_mask[None, :, None], MASK)


@triton.jit
def _as_float(q, BIAS: tl.constexpr):
    """int32 q in [0, 2^23) -> float32(q - BIAS), exactly."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + BIAS)


@triton.jit
def _as_half(q, BIAS: tl.constexpr):
    """int32 q in [0, 1024) -> float16(q - BIAS), exactly."""
    return (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - (1024.0 + BIAS)


@triton.jit
def _magic(a, b, OP: tl.constexpr):
    """float32 2^23 + v per byte of uint8 a (and b, the same shape), v computed by the PTX `OP`.

    Four bytes a register: about 1.4 integer instructions a value instead of ~2.5 when Triton
    unpacks bytes one by one. Compiled (CUDA) GEMV only; `_piece` also takes plain int32 quants.
    """
    return tl.inline_asm_elementwise(OP, "=r,=r,=r,=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _half_lo(w):
    """The fp16 in the low 16 bits of int32 w, widened to fp32."""
    return w.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _half_hi(w):
    return (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _piece(acc, q, BIAS: tl.constexpr, scale, mn, koff, x_rows, K, HAS_MIN: tl.constexpr, GEMM: tl.constexpr,
           MASK: tl.constexpr, DOT_FP32: tl.constexpr):
    """Weights scale * (q - BIAS) - mn for quants q [BN, G, H, VEC] (H * VEC = 16; int32, or for the
    GEMV also float32 2^23 + q from `_magic`) with scale/mn [BN, G, H], at K index koff [G, H, VEC].

    GEMV: x_rows is x's row pointer, acc [BN, G, H]. GEMM: x_rows [BM] row pointers, acc [BN, BM]
    (y transposed: the dequantized weights are tl.dot's first operand).
    """
    if GEMM:
        tl.static_assert(q.dtype == tl.int32, "the GEMM decodes int32 quants")
        k = tl.reshape(koff, (q.shape[1] * 16,))                               # [16G]
        xt = _load(x_rows[:, None] + k[None, :], k[None, :] < K, MASK)         # [BM, 16G]
        if DOT_FP32:
            w = _as_float(q, BIAS) * scale[:, :, :, None]
            if HAS_MIN:
                w = w - mn[:, :, :, None]
            w = tl.reshape(w, (q.shape[0], q.shape[1] * 16))                   # [BN, 16G]
            acc = tl.dot(w, tl.trans(xt.to(tl.float32)), acc, input_precision="ieee")
        else:
            if xt.dtype == tl.float16:   # decode in fp16 (packed half2 math): q - BIAS is exact there
                w = _as_half(q, BIAS) * scale.to(tl.float16)[:, :, :, None]
                if HAS_MIN:
                    w = w - mn.to(tl.float16)[:, :, :, None]
            else:
                w = _as_float(q, BIAS) * scale[:, :, :, None]
                if HAS_MIN:
                    w = w - mn[:, :, :, None]
            w = tl.reshape(w.to(xt.dtype), (q.shape[0], q.shape[1] * 16))
            acc = tl.dot(w, tl.trans(xt), acc)   # W is the A operand: from registers, no smem
    else:
        # x is loaded VEC values (16 bytes) a thread, like q: no layout conversion between them.
        xv = _load(x_rows + koff, koff < K, MASK).to(tl.float32)               # [G, H, VEC]
        if q.dtype == tl.float32:
            f = q                                                              # already 2^23 + q (_magic)
        else:
            f = (q | 0x4B000000).to(tl.float32, bitcast=True)
        # (2^23 + q) * x - 2^23 * x is one FFMA per value, exact up to its single rounding (2^23 * x
        # is exact): it strips the exponent trick's offset without an FADD. BIAS comes off per slice.
        p = tl.sum(tl.fma(f, xv[None, :, :, :], (xv * -8388608.0)[None, :, :, :]), 3)   # [BN, G, H]
        if BIAS != 0:
            p -= BIAS * tl.sum(xv, 2)[None, :, :]
        acc += p * scale
        if HAS_MIN:
            acc -= tl.sum(xv, 2)[None, :, :] * mn
    return acc


@triton.jit
def _nibbles(raw, PTX: tl.constexpr):
    """(low, high) nibbles of uint8 raw: int32, or with PTX floats 2^23 + v from `_magic`."""
    if PTX:
        lo = _magic(raw, raw, PTX_LO)
        hi = _magic(raw, raw, PTX_HI)
    else:
        q = raw.to(tl.int32)
        lo = q & 15
        hi = q >> 4
    return lo, hi


@triton.jit
def _q4_0(acc, d_ptr, qs_ptr, d_stride, qs_stride, rows, g, g_mask, x_rows, K,
          GEMM: tl.constexpr, MASK: tl.constexpr, DOT_FP32: tl.constexpr, VEC: tl.constexpr, PTX: tl.constexpr):
    d = _load_g(d_ptr, d_stride, rows, g, g_mask, MASK, VEC).to(tl.float32)   # [BN, G, H]
    lo, hi = _nibbles(_load16(qs_ptr, qs_stride, rows, g * 16, g_mask, MASK, VEC), PTX)   # [BN, G, H, VEC]
    koff = _koff(g * 32, VEC)
    acc = _piece(acc, lo, 8, d, d, koff, x_rows, K, False, GEMM, MASK, DOT_FP32)
    return _piece(acc, hi, 8, d, d, koff + 16, x_rows, K, False, GEMM, MASK, DOT_FP32)


@triton.jit
def _q4_1(acc, dm_ptr, qs_ptr, dm_stride, qs_stride, rows, g, g_mask, x_rows, K,
          GEMM: tl.constexpr, MASK: tl.constexpr, DOT_FP32: tl.constexpr, VEC: tl.constexpr, PTX: tl.constexpr):
    dm = _load_g(dm_ptr, dm_stride, rows, g, g_mask, MASK, VEC)
    d = _half_lo(dm)
    neg_m = -_half_hi(dm)                        # ggml adds m; _piece subtracts its min
    lo, hi = _nibbles(_load16(qs_ptr, qs_stride, rows, g * 16, g_mask, MASK, VEC), PTX)
    koff = _koff(g * 32, VEC)
    acc = _piece(acc, lo, 0, d, neg_m, koff, x_rows, K, True, GEMM, MASK, DOT_FP32)
    return _piece(acc, hi, 0, d, neg_m, koff + 16, x_rows, K, True, GEMM, MASK, DOT_FP32)


@triton.jit
def _q5(acc, d_ptr, qh_ptr, qs_ptr, d_stride, qh_stride, qs_stride, rows, g, g_mask, x_rows, K,
        HAS_MIN: tl.constexpr, GEMM: tl.constexpr, MASK: tl.constexpr, DOT_FP32: tl.constexpr, VEC: tl.constexpr):
    """Q5_0 (d fp16 plane, q - 16) and Q5_1 (d | m << 16 int32 plane, d * q + m)."""
    j = _lanes(VEC)[None, None, :, :]
    qh = _load_g(qh_ptr, qh_stride, rows, g, g_mask, MASK, VEC)[:, :, :, None]   # [BN, G, H, 1]
    qs = _load16(qs_ptr, qs_stride, rows, g * 16, g_mask, MASK, VEC).to(tl.int32)
    lo = (qs & 15) | (((qh >> j) & 1) << 4)
    hi = (qs >> 4) | (((qh >> (j + 16)) & 1) << 4)
    koff = _koff(g * 32, VEC)
    if HAS_MIN:
        dm = _load_g(d_ptr, d_stride, rows, g, g_mask, MASK, VEC)
        d = _half_lo(dm)
        neg_m = -_half_hi(dm)
        acc = _piece(acc, lo, 0, d, neg_m, koff, x_rows, K, True, GEMM, MASK, DOT_FP32)
        acc = _piece(acc, hi, 0, d, neg_m, koff + 16, x_rows, K, True, GEMM, MASK, DOT_FP32)
    else:
        d = _load_g(d_ptr, d_stride, rows, g, g_mask, MASK, VEC).to(tl.float32)
        acc = _piece(acc, lo, 16, d, d, koff, x_rows, K, False, GEMM, MASK, DOT_FP32)
        acc = _piece(acc, hi, 16, d, d, koff + 16, x_rows, K, False, GEMM, MASK, DOT_FP32)
    return acc


@triton.jit
def _q8_0(acc, d_ptr, qs_ptr, d_stride, qs_stride, rows, g, g_mask, x_rows, K,
          GEMM: tl.constexpr, MASK: tl.constexpr, DOT_FP32: tl.constexpr, VEC: tl.constexpr, PTX: tl.constexpr):
    d = _load_g(d_ptr, d_stride, rows, g // 2, g_mask, MASK, VEC).to(tl.float32)     # a group is half a block
    qs = _load16(qs_ptr, qs_stride, rows, g * 16, g_mask, MASK, VEC)
    if PTX:
        q = _magic(qs, qs, PTX_XOR)
    else:
        q = qs.to(tl.int32) ^ 0x80                                             # int8 + 128
    return _piece(acc, q, 128, d, d, _koff(g * 16, VEC), x_rows, K, False, GEMM, MASK, DOT_FP32)


@triton.jit
def _k_koff(g, VEC: tl.constexpr):
    """K index [G, H, VEC] of piece 0 of a 64-value group g = 4 * super_block + 2h + r; piece i adds 32i."""
    return _koff((g // 4) * 256 + ((g // 2) % 2) * 128 + (g % 2) * 16, VEC)


@triton.jit
def _q2_k(acc, sc_ptr, qs_ptr, dm_ptr, sc_stride, qs_stride, dm_stride, rows, g, g_mask, x_rows, K,
          GEMM: tl.constexpr, MASK: tl.constexpr, DOT_FP32: tl.constexpr, VEC: tl.constexpr):
    dm = _load_g(dm_ptr, dm_stride, rows, g // 4, g_mask, MASK, VEC)
    d = _half_lo(dm)
    dmin = _half_hi(dm)
    scales = _load_g(sc_ptr, sc_stride, rows, g, g_mask, MASK, VEC)                 # byte i: piece i's scale
    qs = _load16(qs_ptr, qs_stride, rows, g * 16, g_mask, MASK, VEC).to(tl.int32)
    koff = _k_koff(g, VEC)
    for i in tl.static_range(4):
        sc = (scales >> (8 * i)) & 255
        acc = _piece(acc, (qs >> (2 * i)) & 3, 0, d * (sc & 15).to(tl.float32),
                     dmin * (sc >> 4).to(tl.float32), koff + 32 * i, x_rows, K, True, GEMM, MASK, DOT_FP32)
    return acc


@triton.jit
def _q3_k(acc, hm_ptr, qs_ptr, sc_ptr, d_ptr, hm_stride, qs_stride, sc_stride, d_stride, rows, g, g_mask,
          x_rows, K, GEMM: tl.constexpr, MASK: tl.constexpr, DOT_FP32: tl.constexpr, VEC: tl.constexpr):
    sb = g // 4
    h = (g // 2) % 2
    r = g % 2
    d = _load_g(d_ptr, d_stride, rows, sb, g_mask, MASK, VEC).to(tl.float32)
    # Scale 8h + 2i + r: low nibble in byte 2i + r at bit 4h, top 2 bits in byte 8 + (2i + r) % 4
    # at bit 4h + 2 * (i // 2): with the words shifted by 8r + 4h, piece i reads fixed offsets.
    sh = (r * 8 + h * 4)[None, :, None]
    w0 = _load_g(sc_ptr, sc_stride, rows, sb * 3, g_mask, MASK, VEC) >> sh
    w1 = _load_g(sc_ptr, sc_stride, rows, sb * 3 + 1, g_mask, MASK, VEC) >> sh
    w2 = _load_g(sc_ptr, sc_stride, rows, sb * 3 + 2, g_mask, MASK, VEC) >> sh
    qs = _load16(qs_ptr, qs_stride, rows, g * 16, g_mask, MASK, VEC).to(tl.int32)
    hm = _load16(hm_ptr, hm_stride, rows, sb * 32 + r * 16, g_mask, MASK, VEC).to(tl.int32)  # bit 4h + i: piece i
    hm = hm >> (h * 4)[None, :, None, None]
    koff = _k_koff(g, VEC)
    for i in tl.static_range(4):
        if i < 2:
            low = (w0 >> (16 * (i % 2))) & 15
        else:
            low = (w1 >> (16 * (i % 2))) & 15
        high = (w2 >> (16 * (i % 2) + 2 * (i // 2))) & 3
        sc = ((low | (high << 4)) - 32).to(tl.float32)
        q = ((qs >> (2 * i)) & 3) | (((hm >> i) & 1) << 2)                  # ggml: low bits - 4 unless hmask
        acc = _piece(acc, q, 4, d * sc, d, koff + 32 * i, x_rows, K, False, GEMM, MASK, DOT_FP32)
    return acc


@triton.jit
def _k4_scales(meta_ptr, meta_stride, rows, g, g_mask, MASK: tl.constexpr, VEC: tl.constexpr):
    """(d * sc, dmin * m) [BN, G, H] of sub-block s = g % 8, from the meta plane of `_k4_meta`."""
    sb = g // 8
    s = g % 8
    dd = _load_g(meta_ptr, meta_stride, rows, sb * 4, g_mask, MASK, VEC)               # d | dmin << 16
    b = _load_g(meta_ptr, meta_stride, rows, sb * 4 + 1 + s // 4, g_mask, MASK, VEC) >> ((s % 4) * 8)[None, :, None]
    mins_lo = _load_g(meta_ptr, meta_stride, rows, sb * 4 + 3, g_mask, MASK, VEC) >> (s * 4)[None, :, None]
    sc = b & 63
    mn = (mins_lo & 15) | ((b >> 2) & 48)
    return _half_lo(dd) * sc.to(tl.float32), _half_hi(dd) * mn.to(tl.float32)


@triton.jit
def _q4_k(acc, meta_ptr, qs_ptr, meta_stride, qs_stride, rows, g, g_mask, x_rows, K,
          GEMM: tl.constexpr, MASK: tl.constexpr, DOT_FP32: tl.constexpr, VEC: tl.constexpr, PTX: tl.constexpr):
    scale, mn = _k4_scales(meta_ptr, meta_stride, rows, g, g_mask, MASK, VEC)
    lo, hi = _nibbles(_load16(qs_ptr, qs_stride, rows, g * 16, g_mask, MASK, VEC), PTX)
    koff = _koff(g * 32, VEC)
    acc = _piece(acc, lo, 0, scale, mn, koff, x_rows, K, True, GEMM, MASK, DOT_FP32)
    return _piece(acc, hi, 0, scale, mn, koff + 16, x_rows, K, True, GEMM, MASK, DOT_FP32)


@triton.jit
def _q5_k(acc, meta_ptr, qh_ptr, qs_ptr, meta_stride, qh_stride, qs_stride, rows, g, g_mask, x_rows, K,
          GEMM: tl.constexpr, MASK: tl.constexpr, DOT_FP32: tl.constexpr, VEC: tl.constexpr):
    scale, mn = _k4_scales(meta_ptr, meta_stride, rows, g, g_mask, MASK, VEC)
    j = _lanes(VEC)[None, None, :, :]
    qh = _load_g(qh_ptr, qh_stride, rows, g, g_mask, MASK, VEC)[:, :, :, None]
    qs = _load16(qs_ptr, qs_stride, rows, g * 16, g_mask, MASK, VEC).to(tl.int32)
    lo = (qs & 15) | (((qh >> j) & 1) << 4)
    hi = (qs >> 4) | (((qh >> (j + 16)) & 1) << 4)
    koff = _koff(g * 32, VEC)
    acc = _piece(acc, lo, 0, scale, mn, koff, x_rows, K, True, GEMM, MASK, DOT_FP32)
    return _piece(acc, hi, 0, scale, mn, koff + 16, x_rows, K, True, GEMM, MASK, DOT_FP32)


@triton.jit
def _q6_k(acc, qla_ptr, qlb_ptr, qh_ptr, sc_ptr, d_ptr, qla_stride, qlb_stride, qh_stride, sc_stride,
          d_stride, rows, g, g_mask, x_rows, K, GEMM: tl.constexpr, MASK: tl.constexpr,
          DOT_FP32: tl.constexpr, VEC: tl.constexpr, PTX: tl.constexpr):
    d = _load_g(d_ptr, d_stride, rows, g // 4, g_mask, MASK, VEC).to(tl.float32)
    scales = _load_g(sc_ptr, sc_stride, rows, g, g_mask, MASK, VEC)                 # int8 i: piece i's scale
    qa = _load16(qla_ptr, qla_stride, rows, g * 16, g_mask, MASK, VEC)
    qb = _load16(qlb_ptr, qlb_stride, rows, g * 16, g_mask, MASK, VEC)
    qh = _load16(qh_ptr, qh_stride, rows, g * 16, g_mask, MASK, VEC)
    koff = _k_koff(g, VEC)
    for i in tl.static_range(4):
        if PTX:
            if i == 0:
                q = _magic(qa, qh, PTX_Q6_0)
            elif i == 1:
                q = _magic(qb, qh, PTX_Q6_1)
            elif i == 2:
                q = _magic(qa, qh, PTX_Q6_2)
            else:
                q = _magic(qb, qh, PTX_Q6_3)
        else:
            if i % 2 == 0:
                ql = qa.to(tl.int32)
            else:
                ql = qb.to(tl.int32)
            if i < 2:
                ql = ql & 15
            else:
                ql = ql >> 4
            q = ql | (((qh.to(tl.int32) >> (2 * i)) & 3) << 4)
        sc = ((scales << (24 - 8 * i)) >> 24).to(tl.float32)                   # sign-extended byte i
        acc = _piece(acc, q, 32, d * sc, d, koff + 32 * i, x_rows, K, False, GEMM, MASK, DOT_FP32)
    return acc


@triton.jit
def accumulate(QTYPE: tl.constexpr, acc, p0, p1, p2, p3, p4, s0, s1, s2, s3, s4, rows, g, g_mask, x_rows, K,
               GEMM: tl.constexpr, MASK: tl.constexpr, DOT_FP32: tl.constexpr, VEC: tl.constexpr, PTX: tl.constexpr):
    """Add one tile of groups g [G] (g_mask: g < groups per row) of rows [BN] to acc.

    p0..p4 are the planes of `quant_pack` in order (unused ones repeat p0), s0..s4 their row strides.
    PTX (GEMV on CUDA only) decodes Q4_0, Q4_1, Q4_K, Q8_0 and Q6_K quants with inline PTX.
    """
    if QTYPE == Q4_0:
        acc = _q4_0(acc, p0, p1, s0, s1, rows, g, g_mask, x_rows, K, GEMM, MASK, DOT_FP32, VEC, PTX)
    elif QTYPE == Q4_1:
        acc = _q4_1(acc, p0, p1, s0, s1, rows, g, g_mask, x_rows, K, GEMM, MASK, DOT_FP32, VEC, PTX)
    elif QTYPE == Q5_0:
        acc = _q5(acc, p0, p1, p2, s0, s1, s2, rows, g, g_mask, x_rows, K, False, GEMM, MASK, DOT_FP32, VEC)
    elif QTYPE == Q5_1:
        acc = _q5(acc, p0, p1, p2, s0, s1, s2, rows, g, g_mask, x_rows, K, True, GEMM, MASK, DOT_FP32, VEC)
    elif QTYPE == Q8_0:
        acc = _q8_0(acc, p0, p1, s0, s1, rows, g, g_mask, x_rows, K, GEMM, MASK, DOT_FP32, VEC, PTX)
    elif QTYPE == Q2_K:
        acc = _q2_k(acc, p0, p1, p2, s0, s1, s2, rows, g, g_mask, x_rows, K, GEMM, MASK, DOT_FP32, VEC)
    elif QTYPE == Q3_K:
        acc = _q3_k(acc, p0, p1, p2, p3, s0, s1, s2, s3, rows, g, g_mask, x_rows, K, GEMM, MASK, DOT_FP32, VEC)
    elif QTYPE == Q4_K:
        acc = _q4_k(acc, p0, p1, s0, s1, rows, g, g_mask, x_rows, K, GEMM, MASK, DOT_FP32, VEC, PTX)
    elif QTYPE == Q5_K:
        acc = _q5_k(acc, p0, p1, p2, s0, s1, s2, rows, g, g_mask, x_rows, K, GEMM, MASK, DOT_FP32, VEC)
    else:
        tl.static_assert(QTYPE == Q6_K, "no decoder for this GGML type")
        acc = _q6_k(acc, p0, p1, p2, p3, p4, s0, s1, s2, s3, s4, rows, g, g_mask, x_rows, K, GEMM, MASK,
                    DOT_FP32, VEC, PTX)
    return acc
