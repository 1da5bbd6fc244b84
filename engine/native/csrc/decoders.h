/* Decoding GGUF blocks to float32, one function per block layout (ggml-common.h).
 *
 * Each decoder follows ggml's dequantize_row_* float order step for step, and the library is
 * compiled with -ffp-contract=off, so values are bit-identical to ggml's and to lumen.engine.weights.quant's
 * torch units (tests/engine/native/test_kernels.py checks it). Layouts are read as byte offsets from
 * the block start: no packed structs, no alignment assumptions. Included by qmatmul.c only,
 * so that every decoder can be inlined into the matmul loop made for its type.
 */
#ifndef LUMEN_DECODERS_H
#define LUMEN_DECODERS_H
#include <stdint.h>
#include <string.h>

#include "qmatmul.h"

#define DECODER static inline __attribute__((always_inline)) void

#ifdef __AVX2__
#include <immintrin.h>
/* For every build with AVX2 (the AVX-512 ones too): a Q4 block's 16 bytes as its 32 values in
 * order, the low nibbles then the high ones. */
static inline __attribute__((always_inline)) __m256i nibbles32_avx2(const uint8_t *qs) {
    const __m128i q = _mm_loadu_si128((const __m128i *)qs), low = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), low), _mm_and_si128(q, low));
}
/* Bits 2k and 2k + 1 of each of 32 bytes (a Q6_K half's qh) moved to bits 4 and 5, the rest 0:
 * one shift by 4 - 2k (none for k = 2) and a mask (a 16-bit shift moves bits across bytes only
 * into places the mask clears). */
static inline __attribute__((always_inline)) __m256i q6_high_bits(__m256i qh, const int k) {
    const __m256i at = k < 2 ? _mm256_slli_epi16(qh, 4 - 2 * k) : k == 3 ? _mm256_srli_epi16(qh, 2) : qh;
    return _mm256_and_si256(at, _mm256_set1_epi8(0x30));
}
/* Q4_K / Q5_K block b's 8 six-bit scales (bytes 0-7) and 8 mins (bytes 8-15), the fields of
 * scale_min_k4, unpacked from the 12 bytes u0 u1 u2 at b + 4 as ggml's SIMD kernels do: sc_0..7
 * are u0 & k1, (u2 & k2) | (u0 >> 6 & k3) << 4 and m_0..7 are u1 & k1, (u2 >> 4 & k2) | (u1 >> 6 & k3) << 4.
 * Reads 16 bytes (the 12 and 4 of qs). */
static inline __attribute__((always_inline)) __m128i k4_scale_min_bytes(const uint8_t *b) {
    const __m128i u = _mm_loadu_si128((const __m128i *)(b + 4));
    const __m128i low = _mm_srlv_epi32(_mm_shuffle_epi32(u, _MM_SHUFFLE(2, 1, 2, 0)), _mm_setr_epi32(0, 0, 0, 4));
    const __m128i top = _mm_srli_epi32(_mm_shuffle_epi32(u, _MM_SHUFFLE(1, 1, 0, 0)), 2);   /* bits 6-7 at 4-5 */
    return _mm_or_si128(_mm_and_si128(low, _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f)),
                        _mm_and_si128(top, _mm_setr_epi32(0, 0x30303030, 0, 0x30303030)));
}
#endif

/* AVX2 builds (no AVX-512) decode F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K blocks with 8-lane vectors
 * (below each scalar decoder): the same float operations in the same order per value, so the
 * same bits. AVX-512 builds keep the scalar forms (GCC vectorizes them in part); their matmuls decode
 * with the register decoders at the end of this file. */
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__F16C__)
#define AVX2_BLOCK_DECODERS 1
#include <immintrin.h>
/* Bytes 8c .. 8c + 7 of v (c a constant), widened to 8 floats: unsigned or signed. */
static inline __attribute__((always_inline)) __m128i bytes8(__m256i v, int c) {
    const __m128i half = c < 2 ? _mm256_castsi256_si128(v) : _mm256_extracti128_si256(v, 1);
    return (c & 1) ? _mm_srli_si128(half, 8) : half;
}
static inline __attribute__((always_inline)) __m256 u8_ps(__m256i v, int c) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes8(v, c)));
}
static inline __attribute__((always_inline)) __m256 i8_ps(__m256i v, int c) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes8(v, c)));
}
static inline __attribute__((always_inline)) __m256i load_bytes32(const uint8_t *p) {
    return _mm256_loadu_si256((const __m256i *)p);
}
/* 32 values d * q - m from 32 unsigned bytes q (Q4_K, Q5_K): a product then a difference, as the scalar form. */
static inline __attribute__((always_inline)) void affine32(float *y, __m256i q, float d, float m) {
    const __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(m);
    for (int c = 0; c < 4; c++) _mm256_storeu_ps(y + 8 * c, _mm256_sub_ps(_mm256_mul_ps(dv, u8_ps(q, c)), mv));
}
#endif

static inline float fp16_to_fp32(const uint8_t *p) {
    _Float16 h;
    memcpy(&h, p, 2);
    return (float)h;                         /* exact widening, as GGML_FP16_TO_FP32 */
}

static inline float bf16_to_fp32(const uint8_t *p) {
    uint32_t bits = (uint32_t)p[0] << 16 | (uint32_t)p[1] << 24;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint32_t u32le(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Q4_0: d fp16 | qs[16]; value j = d * ((qs[j % 16] >> 4 * (j / 16)) & 15) - 8 */
#ifndef AVX2_BLOCK_DECODERS
DECODER dec_q4_0(const uint8_t *b, float *y) {
    const float d = fp16_to_fp32(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < 16; j++) {
        y[j] = (float)((qs[j] & 0x0F) - 8) * d;
        y[j + 16] = (float)((qs[j] >> 4) - 8) * d;
    }
}
#else
DECODER dec_q4_0(const uint8_t *b, float *y) {
    const __m256 dv = _mm256_set1_ps(fp16_to_fp32(b));
    const __m256i q = _mm256_sub_epi8(nibbles32_avx2(b + 2), _mm256_set1_epi8(8));
    for (int c = 0; c < 4; c++) _mm256_storeu_ps(y + 8 * c, _mm256_mul_ps(i8_ps(q, c), dv));
}
#endif

/* Q4_1: d fp16 | m fp16 | qs[16]; value = d * q + m */
#ifndef AVX2_BLOCK_DECODERS
DECODER dec_q4_1(const uint8_t *b, float *y) {
    const float d = fp16_to_fp32(b), m = fp16_to_fp32(b + 2);
    const uint8_t *qs = b + 4;
    for (int j = 0; j < 16; j++) {
        y[j] = (float)(qs[j] & 0x0F) * d + m;
        y[j + 16] = (float)(qs[j] >> 4) * d + m;
    }
}
#else
DECODER dec_q4_1(const uint8_t *b, float *y) {
    const __m256 dv = _mm256_set1_ps(fp16_to_fp32(b)), mv = _mm256_set1_ps(fp16_to_fp32(b + 2));
    const __m256i q = nibbles32_avx2(b + 4);
    for (int c = 0; c < 4; c++) _mm256_storeu_ps(y + 8 * c, _mm256_add_ps(_mm256_mul_ps(u8_ps(q, c), dv), mv));
}
#endif

/* Q5_0: d fp16 | qh u32 (bit j = value j's bit 4) | qs[16]; value = d * (q - 16) */
DECODER dec_q5_0(const uint8_t *b, float *y) {
    const float d = fp16_to_fp32(b);
    const uint32_t qh = u32le(b + 2);
    const uint8_t *qs = b + 6;
    for (int j = 0; j < 16; j++) {
        const int x0 = (int)((qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10)) - 16;
        const int x1 = (int)((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10)) - 16;
        y[j] = (float)x0 * d;
        y[j + 16] = (float)x1 * d;
    }
}

/* Q5_1: d fp16 | m fp16 | qh u32 | qs[16]; value = d * q + m */
DECODER dec_q5_1(const uint8_t *b, float *y) {
    const float d = fp16_to_fp32(b), m = fp16_to_fp32(b + 2);
    const uint32_t qh = u32le(b + 4);
    const uint8_t *qs = b + 8;
    for (int j = 0; j < 16; j++) {
        const int x0 = (int)((qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10));
        const int x1 = (int)((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10));
        y[j] = (float)x0 * d + m;
        y[j + 16] = (float)x1 * d + m;
    }
}

/* Q8_0: d fp16 | qs[32] int8; value = d * q */
#ifndef AVX2_BLOCK_DECODERS
DECODER dec_q8_0(const uint8_t *b, float *y) {
    const float d = fp16_to_fp32(b);
    const int8_t *qs = (const int8_t *)(b + 2);
    for (int j = 0; j < 32; j++) y[j] = (float)qs[j] * d;
}
#else
DECODER dec_q8_0(const uint8_t *b, float *y) {
    const __m256 dv = _mm256_set1_ps(fp16_to_fp32(b));
    const __m256i q = load_bytes32(b + 2);
    for (int c = 0; c < 4; c++) _mm256_storeu_ps(y + 8 * c, _mm256_mul_ps(i8_ps(q, c), dv));
}
#endif

/* Q2_K: scales[16] (4-bit scale | 4-bit min) | qs[64] (2-bit) | d fp16 | dmin fp16 */
DECODER dec_q2_k(const uint8_t *b, float *y) {
    const uint8_t *scales = b, *q = b + 16;
    const float d = fp16_to_fp32(b + 80), dmin = fp16_to_fp32(b + 82);
    int is = 0;
    for (int n = 0; n < 256; n += 128) {
        for (int shift = 0; shift < 8; shift += 2) {
            for (int half = 0; half < 2; half++) {
                const uint8_t sc = scales[is++];
                const float dl = d * (float)(sc & 0x0F), ml = dmin * (float)(sc >> 4);
                for (int l = 0; l < 16; l++) *y++ = dl * (float)((q[l + 16 * half] >> shift) & 3) - ml;
            }
        }
        q += 32;
    }
}

/* Q3_K's 16 six-bit scales (unbiased: scale - 32 is the factor), unpacked from 12 bytes at 96 */
static inline void q3_k_scales(const uint8_t *b, int8_t *scales) {
    const uint32_t kmask1 = 0x03030303, kmask2 = 0x0f0f0f0f;
    uint32_t aux[4];
    memcpy(aux, b + 96, 12);
    const uint32_t tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
    aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
    aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4);
    aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
    memcpy(scales, aux, 16);
}

/* Q3_K: hmask[32] | qs[64] (low 2 bits) | scales[12] (16 six-bit scales) | d fp16 */
DECODER dec_q3_k(const uint8_t *b, float *y) {
    const uint8_t *hm = b, *q = b + 32;
    const float d_all = fp16_to_fp32(b + 108);
    int8_t scales[16];
    q3_k_scales(b, scales);
    int is = 0;
    uint8_t m = 1;
    for (int n = 0; n < 256; n += 128) {
        for (int shift = 0; shift < 8; shift += 2) {
            for (int half = 0; half < 2; half++) {
                const float dl = d_all * (float)(scales[is++] - 32);
                for (int l = 0; l < 16; l++) {
                    const int v = ((q[l + 16 * half] >> shift) & 3) - ((hm[l + 16 * half] & m) ? 0 : 4);
                    *y++ = dl * (float)v;
                }
            }
            m <<= 1;
        }
        q += 32;
    }
}

/* get_scale_min_k4: the j-th six-bit scale and min of Q4_K / Q5_K's 12 packed bytes */
static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *mn) {
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* Q4_K: d fp16 | dmin fp16 | scales[12] | qs[128]; value = d * sc * q - dmin * m */
#ifndef AVX2_BLOCK_DECODERS
DECODER dec_q4_k(const uint8_t *b, float *y) {
    const float d = fp16_to_fp32(b), dmin = fp16_to_fp32(b + 2);
    const uint8_t *scales = b + 4, *q = b + 16;
    for (int is = 0; is < 8; is += 2) {
        uint8_t sc, mn;
        scale_min_k4(is, scales, &sc, &mn);
        const float d1 = d * (float)sc, m1 = dmin * (float)mn;
        scale_min_k4(is + 1, scales, &sc, &mn);
        const float d2 = d * (float)sc, m2 = dmin * (float)mn;
        for (int l = 0; l < 32; l++) *y++ = d1 * (float)(q[l] & 0x0F) - m1;
        for (int l = 0; l < 32; l++) *y++ = d2 * (float)(q[l] >> 4) - m2;
        q += 32;
    }
}
#else
DECODER dec_q4_k(const uint8_t *b, float *y) {
    const float d = fp16_to_fp32(b), dmin = fp16_to_fp32(b + 2);
    const uint8_t *scales = b + 4, *q = b + 16;
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int is = 0; is < 8; is += 2) {
        uint8_t sc1, mn1, sc2, mn2;
        scale_min_k4(is, scales, &sc1, &mn1);
        scale_min_k4(is + 1, scales, &sc2, &mn2);
        const __m256i qv = load_bytes32(q);
        affine32(y, _mm256_and_si256(qv, low), d * (float)sc1, dmin * (float)mn1);
        affine32(y + 32, _mm256_and_si256(_mm256_srli_epi16(qv, 4), low), d * (float)sc2, dmin * (float)mn2);
        y += 64;
        q += 32;
    }
}
#endif

/* Q5_K: d fp16 | dmin fp16 | scales[12] | qh[32] | qs[128] */
#ifndef AVX2_BLOCK_DECODERS
DECODER dec_q5_k(const uint8_t *b, float *y) {
    const float d = fp16_to_fp32(b), dmin = fp16_to_fp32(b + 2);
    const uint8_t *scales = b + 4, *qh = b + 16, *ql = b + 48;
    uint8_t u1 = 1, u2 = 2;
    for (int is = 0; is < 8; is += 2) {
        uint8_t sc, mn;
        scale_min_k4(is, scales, &sc, &mn);
        const float d1 = d * (float)sc, m1 = dmin * (float)mn;
        scale_min_k4(is + 1, scales, &sc, &mn);
        const float d2 = d * (float)sc, m2 = dmin * (float)mn;
        for (int l = 0; l < 32; l++) *y++ = d1 * (float)((ql[l] & 0x0F) + ((qh[l] & u1) ? 16 : 0)) - m1;
        for (int l = 0; l < 32; l++) *y++ = d2 * (float)((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
        ql += 32;
        u1 <<= 2;
        u2 <<= 2;
    }
}
#else
DECODER dec_q5_k(const uint8_t *b, float *y) {
    const float d = fp16_to_fp32(b), dmin = fp16_to_fp32(b + 2);
    const uint8_t *scales = b + 4, *ql = b + 48;
    const __m256i qh = load_bytes32(b + 16), low = _mm256_set1_epi8(0x0F), sixteen = _mm256_set1_epi8(16);
    for (int is = 0; is < 8; is += 2) {
        uint8_t sc1, mn1, sc2, mn2;
        scale_min_k4(is, scales, &sc1, &mn1);
        scale_min_k4(is + 1, scales, &sc2, &mn2);
        const __m256i u1 = _mm256_set1_epi8((char)(1 << is)), u2 = _mm256_set1_epi8((char)(2 << is));
        const __m256i h1 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, u1), u1), sixteen);
        const __m256i h2 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, u2), u2), sixteen);
        const __m256i qv = load_bytes32(ql);
        affine32(y, _mm256_add_epi8(_mm256_and_si256(qv, low), h1), d * (float)sc1, dmin * (float)mn1);
        affine32(y + 32, _mm256_add_epi8(_mm256_and_si256(_mm256_srli_epi16(qv, 4), low), h2), d * (float)sc2,
                 dmin * (float)mn2);
        y += 64;
        ql += 32;
    }
}
#endif

/* Q6_K: ql[128] (low 4 bits) | qh[64] (high 2 bits) | scales[16] int8 | d fp16.
 * ggml computes d * sc * q left to right; the scale products are hoisted, same values. */
#ifndef AVX2_BLOCK_DECODERS
DECODER dec_q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = fp16_to_fp32(b + 208);
    for (int n = 0; n < 256; n += 128) {
        for (int h = 0; h < 2; h++) {          /* l in [16h, 16h + 16) uses scales sc[h + 2i] */
            const float s1 = d * (float)sc[h], s2 = d * (float)sc[h + 2];
            const float s3 = d * (float)sc[h + 4], s4 = d * (float)sc[h + 6];
            for (int l = 16 * h; l < 16 * h + 16; l++) {
                const int q1 = (int)((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = (int)((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = s1 * (float)q1;
                y[l + 32] = s2 * (float)q2;
                y[l + 64] = s3 * (float)q3;
                y[l + 96] = s4 * (float)q4;
            }
        }
        y += 128;
        ql += 64;
        qh += 32;
        sc += 8;
    }
}
#else
/* 32 values s * q from 32 signed bytes q, s_lo for the first 16 and s_hi for the rest. */
static inline __attribute__((always_inline)) void scaled32(float *y, __m256i q, float s_lo, float s_hi) {
    for (int c = 0; c < 4; c++) _mm256_storeu_ps(y + 8 * c, _mm256_mul_ps(_mm256_set1_ps(c < 2 ? s_lo : s_hi), i8_ps(q, c)));
}

DECODER dec_q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = fp16_to_fp32(b + 208);
    const __m256i low = _mm256_set1_epi8(0x0F), bias = _mm256_set1_epi8(32);
    for (int n = 0; n < 256; n += 128) {
        const __m256i l0 = load_bytes32(ql), l1 = load_bytes32(ql + 32), h = load_bytes32(qh);
        const __m256i q1 = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(l0, low), q6_high_bits(h, 0)), bias);
        const __m256i q2 = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(l1, low), q6_high_bits(h, 1)), bias);
        const __m256i q3 = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low),
                                                           q6_high_bits(h, 2)), bias);
        const __m256i q4 = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low),
                                                           q6_high_bits(h, 3)), bias);
        scaled32(y, q1, d * (float)sc[0], d * (float)sc[1]);
        scaled32(y + 32, q2, d * (float)sc[2], d * (float)sc[3]);
        scaled32(y + 64, q3, d * (float)sc[4], d * (float)sc[5]);
        scaled32(y + 96, q4, d * (float)sc[6], d * (float)sc[7]);
        y += 128;
        ql += 64;
        qh += 32;
        sc += 8;
    }
}
#endif

DECODER dec_f32(const uint8_t *b, float *y) { memcpy(y, b, 32 * sizeof(float)); }

/* F16 and BF16 widen exactly; with AVX-512 16 values an instruction (GCC turned the scalar
 * loops into one conversion per value; BENCHMARKS.md has the speeds). */
#ifdef __AVX512F__
#include <immintrin.h>
static inline __m512 f16x16(const uint8_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline __m512 bf16x16(const uint8_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

DECODER dec_f16(const uint8_t *b, float *y) {
    _mm512_storeu_ps(y, f16x16(b));
    _mm512_storeu_ps(y + 16, f16x16(b + 32));
}

DECODER dec_bf16(const uint8_t *b, float *y) {
    _mm512_storeu_ps(y, bf16x16(b));
    _mm512_storeu_ps(y + 16, bf16x16(b + 32));
}
#elif defined(AVX2_BLOCK_DECODERS)
DECODER dec_f16(const uint8_t *b, float *y) {
    for (int c = 0; c < 4; c++) _mm256_storeu_ps(y + 8 * c, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 16 * c))));
}

DECODER dec_bf16(const uint8_t *b, float *y) {
    for (int c = 0; c < 4; c++)
        _mm256_storeu_ps(y + 8 * c, _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(b + 16 * c))), 16)));
}
#else
DECODER dec_f16(const uint8_t *b, float *y) {
    for (int j = 0; j < 32; j++) y[j] = fp16_to_fp32(b + 2 * j);
}

DECODER dec_bf16(const uint8_t *b, float *y) {
    for (int j = 0; j < 32; j++) y[j] = bf16_to_fp32(b + 2 * j);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define REGISTER_DECODERS 1
/* Register decoders for the matmul's register paths: the values of the block decoders above,
 * bit for bit, 16 at a time straight into a __m512. For each type T:
 *   T_BS, T_TS          values and bytes per block;
 *   T_prep              what one block needs across its groups (level tables, staged values);
 *   T_prepare(blk, &p)  once per block;
 *   T_group(blk, &p, g) values 16g .. 16g + 15 of the block.
 * They compute the decoders' float products in the decoders' order, either per value or once
 * into a table of a (sub-)block's 16 possible values that vpermps then indexes (it reads the
 * low 4 bits of each lane), so each value is the very float the decoder writes. */
#define REGDEC static inline __attribute__((always_inline))
/* Keep x in memory for the broadcasts that follow: a broadcast from memory costs only a load,
 * where GCC would otherwise shuffle the lane out of a register on port 5, the port that the
 * lookups and widening conversions are already queued on. */
#define IN_MEMORY(x) __asm__("" : "+m"(x))

static inline __m128i load16(const void *p) { return _mm_loadu_si128((const __m128i *)p); }
static inline __m256i load32(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

enum { q8_0_BS = 32, q8_0_TS = 34, q4_0_BS = 32, q4_0_TS = 18 };
typedef struct { __m512 d; } q8_0_prep;
typedef struct { __m512 levels; } q4_0_prep;      /* levels[i] = (float)(i - 8) * d */

REGDEC void q8_0_prepare(const uint8_t *b, q8_0_prep *p) { p->d = _mm512_set1_ps(fp16_to_fp32(b)); }

REGDEC __m512 q8_0_group(const uint8_t *b, const q8_0_prep *p, int g) {
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load16(b + 2 + 16 * g))), p->d);
}

/* F16, BF16: rows of plain 16-bit floats, widened 16 at a time (blocks of 32 as in TYPES) */
enum { f16_BS = 32, f16_TS = 64, bf16_BS = 32, bf16_TS = 64 };
typedef struct { char none; } f16_prep, bf16_prep;       /* nothing per block */

REGDEC void f16_prepare(const uint8_t *b, f16_prep *p) { (void)b; (void)p; }
REGDEC void bf16_prepare(const uint8_t *b, bf16_prep *p) { (void)b; (void)p; }
REGDEC __m512 f16_group(const uint8_t *b, const f16_prep *p, int g) { (void)p; return f16x16(b + 32 * g); }
REGDEC __m512 bf16_group(const uint8_t *b, const bf16_prep *p, int g) { (void)p; return bf16x16(b + 32 * g); }

REGDEC void q4_0_prepare(const uint8_t *b, q4_0_prep *p) {
    const __m512 q = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    p->levels = _mm512_mul_ps(q, _mm512_set1_ps(fp16_to_fp32(b)));
}

REGDEC __m512 q4_0_group(const uint8_t *b, const q4_0_prep *p, int g) {
    const __m512i q = _mm512_cvtepu8_epi32(load16(b + 2));
    return _mm512_permutexvar_ps(g == 0 ? q : _mm512_srli_epi32(q, 4), p->levels);
}

/* Q4_1: the same lookup in a table of the block's 16 values, levels[i] = (float)i * d + m */
enum { q4_1_BS = 32, q4_1_TS = 20 };
typedef struct { __m512 levels; } q4_1_prep;

REGDEC __m512 q4_1_levels(float d, float m) {
    const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_add_ps(_mm512_mul_ps(q, _mm512_set1_ps(d)), _mm512_set1_ps(m));
}

REGDEC void q4_1_prepare(const uint8_t *b, q4_1_prep *p) {
    p->levels = q4_1_levels(fp16_to_fp32(b), fp16_to_fp32(b + 2));
}

/* The same table for 1-4 rows: d and m widened by one vcvtph2ps (exact, as fp16_to_fp32) and
 * broadcast from memory, two fewer shuffles on port 5 a block (one row: 1.3x; with the 8 x 3
 * accumulators of 5-8 rows it was 0.65x, so those keep q4_1_prepare). */
REGDEC void q4_1_prepare_stream(const uint8_t *b, q4_1_prep *p) {
    float dm[4];
    _mm_storeu_ps(dm, _mm_cvtph_ps(_mm_loadu_si32(b)));
    IN_MEMORY(dm);
    p->levels = q4_1_levels(dm[0], dm[1]);
}

REGDEC __m512 q4_1_group(const uint8_t *b, const q4_1_prep *p, int g) {
    const __m512i q = _mm512_cvtepu8_epi32(load16(b + 4));
    return _mm512_permutexvar_ps(g == 0 ? q : _mm512_srli_epi32(q, 4), p->levels);
}

/* Q2_K, Q3_K, Q5_K, Q6_K: the block's integers staged in value order as int8, and the scales
 * (and mins) of its sub-blocks; value = scale * (float)q (- min), as the decoders compute it. */
typedef struct { int8_t q[256]; float s[16], m[16]; } staged_prep;
typedef staged_prep q2_k_prep, q3_k_prep, q5_k_prep, q6_k_prep;
enum { q2_k_BS = 256, q2_k_TS = 84, q3_k_BS = 256, q3_k_TS = 110, q5_k_BS = 256, q5_k_TS = 176,
       q6_k_BS = 256, q6_k_TS = 210 };

REGDEC __m512 staged_values(const staged_prep *p, int g) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load16(p->q + 16 * g)));
}

/* Q3_K, Q6_K: one scale per 16 values */
REGDEC __m512 scaled_group(const uint8_t *b, const staged_prep *p, int g) {
    (void)b;
    return _mm512_mul_ps(_mm512_set1_ps(p->s[g]), staged_values(p, g));
}

/* Q2_K: a scale and a min per 16 values */
REGDEC __m512 affine_group(const uint8_t *b, const staged_prep *p, int g) {
    (void)b;
    return _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(p->s[g]), staged_values(p, g)), _mm512_set1_ps(p->m[g]));
}

/* Q5_K: a scale and a min per 32 values, s[0..7] and s[8..15] */
REGDEC __m512 q5_k_group(const uint8_t *b, const staged_prep *p, int g) {
    (void)b;
    return _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(p->s[g / 2]), staged_values(p, g)), _mm512_set1_ps(p->s[8 + g / 2]));
}
#define q2_k_group affine_group
#define q3_k_group scaled_group
#define q6_k_group scaled_group

/* Q4_K / Q5_K: s[0..7] = d * sc_j and s[8..15] = dmin * m_j, from k4_scale_min_bytes. */
REGDEC void k4_scales_mins(const uint8_t *b, float *s) {
    const __m128i f = k4_scale_min_bytes(b);
    const __m128 d_dmin = _mm_cvtph_ps(_mm_cvtsi32_si128((int)u32le(b)));         /* exact widening */
    const __m512 dd = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                            _mm512_zextps128_ps512(d_dmin));
    _mm512_storeu_ps(s, _mm512_mul_ps(dd, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(f))));
}

/* Q4_K: a sub-block's 16 possible values d * sc * q - dmin * m as a level table, looked up by
 * the 4-bit q. Group g is half of sub-block j = g / 2: the low (j even) or high nibbles of
 * qs[32 (j / 2) + 16 (g % 2) ..]. */
typedef struct { float s[16]; __m512 levels[8]; } q4_k_prep;
enum { q4_k_BS = 256, q4_k_TS = 144 };

REGDEC void q4_k_prepare(const uint8_t *b, q4_k_prep *p) {
    const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    k4_scales_mins(b, p->s);
    IN_MEMORY(p->s);
    for (int j = 0; j < 8; j++)
        p->levels[j] = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(p->s[j]), q), _mm512_set1_ps(p->s[8 + j]));
}

REGDEC __m512 q4_k_group(const uint8_t *b, const q4_k_prep *p, int g) {
    const int j = g / 2;
    const __m512i q = _mm512_cvtepu8_epi32(load16(b + 16 + 32 * (j / 2) + 16 * (g % 2)));
    return _mm512_permutexvar_ps(j % 2 == 0 ? q : _mm512_srli_epi32(q, 4), p->levels[j]);
}

/* The 2-bit fields at bit 2j of 32 bytes of qs: values 32j .. 32j + 31 of a Q2_K / Q3_K half */
REGDEC __m256i crumbs(__m256i q, int j) { return _mm256_and_si256(_mm256_srli_epi16(q, 2 * j), _mm256_set1_epi8(3)); }

REGDEC void q2_k_prepare(const uint8_t *b, q2_k_prep *p) {
    const __m512i sc = _mm512_cvtepu8_epi32(load16(b));      /* scale | min << 4 */
    _mm512_storeu_ps(p->s, _mm512_mul_ps(_mm512_set1_ps(fp16_to_fp32(b + 80)),
                                         _mm512_cvtepi32_ps(_mm512_and_si512(sc, _mm512_set1_epi32(15)))));
    _mm512_storeu_ps(p->m, _mm512_mul_ps(_mm512_set1_ps(fp16_to_fp32(b + 82)), _mm512_cvtepi32_ps(_mm512_srli_epi32(sc, 4))));
    for (int n = 0; n < 2; n++)
        for (int j = 0; j < 4; j++)
            _mm256_storeu_si256((__m256i *)(p->q + 128 * n + 32 * j), crumbs(load32(b + 16 + 32 * n), j));
    IN_MEMORY(*p);
}

REGDEC void q3_k_prepare(const uint8_t *b, q3_k_prep *p) {
    int8_t sc[16];
    q3_k_scales(b, sc);
    const __m512i s = _mm512_sub_epi32(_mm512_cvtepi8_epi32(load16(sc)), _mm512_set1_epi32(32));
    _mm512_storeu_ps(p->s, _mm512_mul_ps(_mm512_set1_ps(fp16_to_fp32(b + 108)), _mm512_cvtepi32_ps(s)));
    const __m256i hm = load32(b);
    for (int n = 0; n < 2; n++)
        for (int j = 0; j < 4; j++) {       /* minus 4 where the hmask bit is clear */
            const __m256i q = crumbs(load32(b + 32 + 32 * n), j);
            const __mmask32 clear = _mm256_testn_epi8_mask(hm, _mm256_set1_epi8((char)(1 << (4 * n + j))));
            _mm256_storeu_si256((__m256i *)(p->q + 128 * n + 32 * j), _mm256_mask_sub_epi8(q, clear, q, _mm256_set1_epi8(4)));
        }
    IN_MEMORY(*p);
}

REGDEC void q5_k_prepare(const uint8_t *b, q5_k_prep *p) {
    k4_scales_mins(b, p->s);
    const __m256i qh = load32(b + 16), low = _mm256_set1_epi8(15), bit4 = _mm256_set1_epi8(16);
    for (int i = 0; i < 4; i++) {           /* plus 16 where the qh bit is set */
        const __m256i ql = load32(b + 48 + 32 * i);
        const __m256i lo = _mm256_and_si256(ql, low), hi = _mm256_and_si256(_mm256_srli_epi16(ql, 4), low);
        const __mmask32 set_lo = _mm256_test_epi8_mask(qh, _mm256_set1_epi8((char)(1 << 2 * i)));
        const __mmask32 set_hi = _mm256_test_epi8_mask(qh, _mm256_set1_epi8((char)(2 << 2 * i)));
        _mm256_storeu_si256((__m256i *)(p->q + 64 * i), _mm256_mask_add_epi8(lo, set_lo, lo, bit4));
        _mm256_storeu_si256((__m256i *)(p->q + 64 * i + 32), _mm256_mask_add_epi8(hi, set_hi, hi, bit4));
    }
    IN_MEMORY(*p);
}

/* Q6_K's 2-bit high part p of a value, as int8 16 p - 32 (so low | high = q - 32), looked up by
 * vpshufb from 4 bits of qh: 16-byte lanes 0-1 read the pair at bits 0-1, lanes 2-3 bits 2-3. */
#define Q6_K_PAIR_LO -32, -16, 0, 16, -32, -16, 0, 16, -32, -16, 0, 16, -32, -16, 0, 16
#define Q6_K_PAIR_HI -32, -32, -32, -32, -16, -16, -16, -16, 0, 0, 0, 0, 16, 16, 16, 16
static const int8_t q6_k_high[64] __attribute__((aligned(64))) = {Q6_K_PAIR_LO, Q6_K_PAIR_LO, Q6_K_PAIR_HI, Q6_K_PAIR_HI};

REGDEC void q6_k_prepare(const uint8_t *b, q6_k_prep *p) {
    _mm512_storeu_ps(p->s, _mm512_mul_ps(_mm512_set1_ps(fp16_to_fp32(b + 208)),
                                         _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load16(b + 192)))));
    const __m512i high = _mm512_load_si512(q6_k_high), low = _mm512_set1_epi8(15);
    for (int n = 0; n < 2; n++) {
        /* bytes 0-31 are values l of q1 (q3), bytes 32-63 values l of q2 (q4): ql[l], ql[l + 32] */
        const __m512i ql = _mm512_loadu_si512(b + 64 * n);
        const __m512i qh = _mm512_broadcast_i64x4(load32(b + 128 + 32 * n));
        const __m512i h12 = _mm512_shuffle_epi8(high, _mm512_and_si512(qh, low));
        const __m512i h34 = _mm512_shuffle_epi8(high, _mm512_and_si512(_mm512_srli_epi16(qh, 4), low));
        _mm512_storeu_si512(p->q + 128 * n, _mm512_or_si512(_mm512_and_si512(ql, low), h12));
        _mm512_storeu_si512(p->q + 128 * n + 64, _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), low), h34));
    }
    IN_MEMORY(*p);
}
#endif
#endif
