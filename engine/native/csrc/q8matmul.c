/* x @ W^T with quantized activations and integer dot products: the int8 matmul mode.
 *
 * The exact mode (qmatmul.c) widens every weight to float32 and multiplies in float32. This mode
 * does what llama.cpp does on CPUs, quantizing each activation row and multiplying integers, with
 * finer activations than llama.cpp's (32-value Q8_0 and Q8_1 with fp16 scales, 256-value Q8_K):
 *   - Q8_0 (below): 8 bits, one float32 scale per 8 values; each 32-value weight group
 *     multiplied 32 products at a time (AVX2's maddubs and madd), one float multiply-add per 8
 *     partial sums;
 *   - Q4_0, Q4_1 (the group form, further down): 8 bits per 8 values, as integer multiples of one
 *     scale per 32-value group; a group's products summed as integers, one float multiply-add per
 *     group;
 *   - Q4_K, Q5_K, Q6_K (the K-quant section further down): 8 bits per 16 values, as integer
 *     multiples of one scale per 256 values; a block's products summed as integers with its
 *     integer sub-block scales, one float multiply-add per block.
 *
 * What each Q8_0 output is, exactly (every build computes this, so the scalar, AVX2 and AVX-512
 * builds agree bit for bit):
 *   - activations in parts of 8 values: dx = amax / 127 (amax = the largest |x| of the 8),
 *     qx = x * (1 / dx) clamped to +-127 and rounded to nearest even;
 *   - weight group g of row n: signed quants q and a scale a (value = a * q);
 *   - lane l (0..7) of group g: L = sum of q * qx over values 4l .. 4l + 3 (an exact integer);
 *     A[l] = fma(a * dx_l, (float)L, A[l]) over the groups in order (dx_l: the dx of part l / 2);
 *   - y = hsum8(A), hsum8(v) = ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)).
 * Each output depends on its own activation row and weight row only: a row's result is the same
 * alone or in any batch, on any number of threads. The other forms below say the same of theirs.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "decoders.h"
#include "layer.h"
#include "qmatmul.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define Q8_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define Q8_AVX512 1   /* batches of more than MR rows in 512-bit registers: two weight rows a register */
#endif
#endif

enum { G = 32, H = 8 };   /* values per weight group, per activation scale (2 lanes) */
enum { QB = 256, QM = 128, QR = 127 * QM };   /* the K-quants: values per activation scale d, largest
                                                 multiplier r, largest |qx| = |r q8| */

/* One quantized activation matrix, in the forms its weights' kernels read: rows of K int8 values
 * with each 8 values' dx (Q8_0); rows of K int8 values with each 8 values'
 * multiplier and each group's d and t (Q4_0, Q4_1); rows of K int16 values, or int8 values with
 * multipliers, with each block's dx and each group's t (the K-quants). */
struct xq {
    int8_t *q;
    float *d;
    int64_t K, groups;
    int16_t *q16;           /* batches (AVX2): each group's value pairs 0, 2, .., 14 then 1, 3, .., 15 */
    int8_t *q8k;            /* 1-4 rows (AVX2): q8 in order, each 16 values' r, the pair sums */
    int16_t *rk, *pairs;
    float *d16;
    float *t16;
    int8_t *qg;             /* the group form (Q4_0, Q4_1): q8 in order, each 8 values' r (in both 16-bit halves), */
    int32_t *rg;            /* each group's d and t */
    float *dg, *tg;
};

#ifdef Q8_AVX2
/* The largest of 8 lanes, none of them NaN. */
static inline __attribute__((always_inline)) float hmax8_ps(__m256 m) {
    m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
    m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0x4E));
    m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0xB1));
    return _mm256_cvtss_f32(m);
}
/* The sum of 8 int32 lanes. */
static inline __attribute__((always_inline)) int hsum8_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}
/* The largest |x| of 8 lanes (a NaN is passed over, as fmaxf does). */
static inline __attribute__((always_inline)) float amax8_ps(__m256 xv) {
    return hmax8_ps(_mm256_max_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), xv), _mm256_setzero_ps()));
}
/* quantize1 on 8 lanes (a NaN is clamped to -127, as fmaxf gives; cvtps rounds to nearest even, as
 * nearbyintf): the same values, as int32 lanes. */
static inline __attribute__((always_inline)) __m256i quantize8(__m256 xv, float inv) {
    return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(xv, _mm256_set1_ps(inv)), _mm256_set1_ps(-127.0f)),
                                            _mm256_set1_ps(127.0f)));
}
/* 8 int32 lanes of at most 127 in magnitude, stored as 8 bytes. */
static inline __attribute__((always_inline)) void store8_epi8(__m256i v, int8_t *q) {
    const __m128i v16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64((__m128i *)q, _mm_packs_epi16(v16, v16));
}
#endif

/* x * inv clamped to +-127 and rounded to nearest even: an 8-bit quant. */
static inline int quantize1(float x, float inv) { return (int)nearbyintf(fminf(fmaxf(x * inv, -127.0f), 127.0f)); }

/* Q8_0's form: d, one scale per H values. */
static void quantize_row(const float *x, int64_t K, int8_t *q, float *d) {
    for (int64_t h = 0; h < K / H; h++) {
        const float *xh = x + h * H;
#ifdef Q8_AVX2
        /* The same operations on 8 lanes: the same bits. nearbyintf was a libm call a value, most of
         * a small matmul's fixed cost. */
        const __m256 xv = _mm256_loadu_ps(xh);
        const float dx = amax8_ps(xv) / 127.0f, inv = dx != 0.0f ? 1.0f / dx : 0.0f;
        store8_epi8(quantize8(xv, inv), q + h * H);
#else
        float amax = 0.0f;
        for (int j = 0; j < H; j++) amax = fmaxf(amax, fabsf(xh[j]));
        const float dx = amax / 127.0f, inv = dx != 0.0f ? 1.0f / dx : 0.0f;
        for (int j = 0; j < H; j++) q[h * H + j] = (int8_t)quantize1(xh[j], inv);
#endif
        d[h] = dx;
    }
}

/* The K-quants' form, per block b of 256 values: d[b] = amax / QR (QR = 127 QM), and per half h
 * (16 values) of each group an integer multiplier r_h = min(QM, ceil((amax_h * (1 / d)) / 127)) (0
 * for zeros; amax_h the half's largest |x|) and 8-bit quants q8 = x * (1 / (d * r_h)) clamped to
 * +-127 and rounded to nearest even: qx = r_h q8; t[g] = d[b] * (float)(the sum of group g's qx).
 * Stored as the kernels read it: qx in order (plain C builds); AVX2 builds, qx with each group's
 * 16 pairs of values as pairs 0, 2, .., 14 then 1, 3, .., 15 (batches: lane l of two 16-bit
 * multiply-adds sums values 4l .. 4l + 3), or, for 1-4 rows, q8 in order, r (rk: a block's 8
 * groups' first halves, then their second halves) and 32 times each pair's q8_0 + q8_1 (for
 * Q6_K's unsigned quants). */
static inline int half_multiplier(float amax, float inv, float *inv_h, float d) {
    const float rf = ceilf(amax * inv / 127.0f);
    const int r = rf >= 1.0f ? (rf < (float)QM ? (int)rf : QM) : 0;      /* a NaN: 0 */
    *inv_h = r != 0 ? 1.0f / (d * (float)r) : 0.0f;
    return r;
}

enum { QH = 16 };   /* values per activation multiplier */

static void quantize_row16(const float *x, int64_t K, int16_t *q16, int8_t *q8, int16_t *rk, int16_t *pairs,
                           float *d, float *t) {
    for (int64_t b = 0; b < K / QB; b++) {
        const float *xb = x + b * QB;
        float amax_h[QB / QH];
#ifdef Q8_AVX2
        for (int h = 0; h < QB / QH; h++) {      /* a NaN is passed over, as fmaxf does */
            const __m256 m = _mm256_max_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_loadu_ps(xb + h * QH)),
                                           _mm256_setzero_ps());
            amax_h[h] = hmax8_ps(_mm256_max_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_loadu_ps(xb + h * QH + 8)), m));
        }
#else
        for (int h = 0; h < QB / QH; h++) {
            amax_h[h] = 0.0f;
            for (int v = 0; v < QH; v++) amax_h[h] = fmaxf(amax_h[h], fabsf(xb[h * QH + v]));
        }
#endif
        float amax = 0.0f;
        for (int h = 0; h < QB / QH; h++) amax = fmaxf(amax, amax_h[h]);
        const float dx = amax / (float)QR, inv = dx != 0.0f ? 1.0f / dx : 0.0f;
        d[b] = dx;
        for (int g = 0; g < QB / G; g++) {
            const float *xg = xb + g * G;
            const int64_t at = b * QB + g * G;
            float inv0, inv1;
            const int r0 = half_multiplier(amax_h[2 * g], inv, &inv0, dx);
            const int r1 = half_multiplier(amax_h[2 * g + 1], inv, &inv1, dx);
#ifdef Q8_AVX2
            __m256i v[4];
            for (int c = 0; c < 4; c++) v[c] = quantize8(_mm256_loadu_ps(xg + 8 * c), c < 2 ? inv0 : inv1);
            const __m256i a = _mm256_permute4x64_epi64(_mm256_packs_epi32(v[0], v[1]), 0xD8);   /* values 0-15 */
            const __m256i c = _mm256_permute4x64_epi64(_mm256_packs_epi32(v[2], v[3]), 0xD8);   /* 16-31 */
            const __m256i qa = _mm256_mullo_epi16(a, _mm256_set1_epi16((short)r0));
            const __m256i qc = _mm256_mullo_epi16(c, _mm256_set1_epi16((short)r1));
            if (q16 != NULL) {
                const __m256 ap = _mm256_castsi256_ps(qa), cp = _mm256_castsi256_ps(qc);
                _mm256_storeu_si256((__m256i *)(q16 + at), _mm256_permute4x64_epi64(
                    _mm256_castps_si256(_mm256_shuffle_ps(ap, cp, 0x88)), 0xD8));
                _mm256_storeu_si256((__m256i *)(q16 + at + 16), _mm256_permute4x64_epi64(
                    _mm256_castps_si256(_mm256_shuffle_ps(ap, cp, 0xDD)), 0xD8));
            } else {
                const __m256i bytes = _mm256_permute4x64_epi64(_mm256_packs_epi16(a, c), 0xD8);
                _mm256_storeu_si256((__m256i *)(q8 + at), bytes);
                rk[b * (QB / QH) + g] = (int16_t)r0;
                rk[b * (QB / QH) + QB / G + g] = (int16_t)r1;
                _mm256_storeu_si256((__m256i *)(pairs + at / 2),
                                    _mm256_slli_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), bytes), 5));
            }
            const __m256i sum = _mm256_add_epi16(qa, qc);     /* |r q8| <= 16256: pairs of them fit */
            const __m256i s32 = _mm256_madd_epi16(sum, _mm256_set1_epi16(1));
            t[b * (QB / G) + g] = dx * (float)hsum8_epi32(s32);
#else
            (void)q8, (void)rk, (void)pairs;
            int32_t sum = 0;
            for (int v = 0; v < G; v++) {
                const int qv = quantize1(xg[v], v < QH ? inv0 : inv1);
                q16[at + v] = (int16_t)((v < QH ? r0 : r1) * qv);
                sum += q16[at + v];
            }
            t[b * (QB / G) + g] = dx * (float)sum;
#endif
        }
    }
}

/* The group form (Q4_0, Q4_1), per group g of 32 values: d[g] = amax / QR, and per part p (8 values)
 * an integer multiplier r_p = min(QM, ceil((amax_p * (1 / d)) / 127)) (0 for zeros) and 8-bit
 * quants q8 = x * (1 / (d * r_p)) clamped to +-127 and rounded to nearest even (half_multiplier,
 * as the K-quants' halves): qx = r_p q8; t[g] = d[g] * (float)(the sum of the group's qx). Stored
 * as the kernels read it: q8 in order, r (GP of them a group, as 32-bit words holding r in both
 * 16-bit halves, which AVX2 broadcasts with a load alone), d and t. A part's step d r_p is at most
 * an 8-bit scale of its own (amax_p / 127) plus d = amax / 16256: never coarser than one 8-bit
 * scale per group, and close to one per 8 values (Q8_0's form) wherever r_p is large. */
enum { GP = 4, GV = G / GP };   /* multipliers a group, values a multiplier */

static void quantize_rowg(const float *x, int64_t K, int8_t *q, int32_t *r, float *d, float *t) {
    for (int64_t g = 0; g < K / G; g++) {
        const float *xg = x + g * G;
        float amax_p[GP];
#ifdef Q8_AVX2
        __m256 xv[GP];
        for (int p = 0; p < GP; p++) {
            xv[p] = _mm256_loadu_ps(xg + GV * p);
            amax_p[p] = amax8_ps(xv[p]);
        }
#else
        for (int p = 0; p < GP; p++) {
            amax_p[p] = 0.0f;
            for (int v = 0; v < GV; v++) amax_p[p] = fmaxf(amax_p[p], fabsf(xg[GV * p + v]));
        }
#endif
        float amax = 0.0f;
        for (int p = 0; p < GP; p++) amax = fmaxf(amax, amax_p[p]);
        const float dx = amax / (float)QR, inv = dx != 0.0f ? 1.0f / dx : 0.0f;
        int32_t sum = 0;                          /* |sum| <= 32 * 16256: exact in float */
        for (int p = 0; p < GP; p++) {
            float inv_p;
            const int rp = half_multiplier(amax_p[p], inv, &inv_p, dx);
            r[g * GP + p] = rp * 0x10001;
#ifdef Q8_AVX2
            const __m256i v = quantize8(xv[p], inv_p);
            store8_epi8(v, q + g * G + GV * p);
            sum += rp * hsum8_epi32(v);
#else
            int s = 0;
            for (int v = 0; v < GV; v++) {
                const int qv = quantize1(xg[GV * p + v], inv_p);
                q[g * G + GV * p + v] = (int8_t)qv;
                s += qv;
            }
            sum += rp * s;
#endif
        }
        d[g] = dx;
        t[g] = dx * (float)sum;
    }
}

static inline float hsum8(const float *a) {
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

/* ---- Weight groups, per type: scales (shared by every build) and quants (scalar and AVX2). ----
 * Q8_0 (a group a block): T_scale(block) and T_quants(block, q[32]); Q4_0, Q4_1: T_scales(block, &a, &c)
 * and T_quants; the K-quants:
 * T_quants(block, s, q[32]) for group s of the block. */

/* Q8_0: d fp16 | qs[32]: signed, a = d. */
static inline __attribute__((always_inline)) float q8_0_scale(const uint8_t *b) { return fp16_to_fp32(b); }
static inline void q8_0_quants(const uint8_t *b, int8_t *q) { memcpy(q, b + 2, 32); }

/* Q4_0: d fp16 | qs[16]: unsigned q, a = d, c = -8 d (value d q - 8 d = d (q - 8), exactly). */
static inline __attribute__((always_inline)) void q4_0_scales(const uint8_t *b, float *a, float *c) {
    *a = fp16_to_fp32(b);
    *c = -8.0f * *a;
}
/* 16 bytes' low nibbles (values 0-15), then their high nibbles (16-31). */
static inline void nibbles32(const uint8_t *qs, int8_t *q) {
    for (int j = 0; j < 16; j++) {
        q[j] = (int8_t)(qs[j] & 0x0F);
        q[j + 16] = (int8_t)(qs[j] >> 4);
    }
}
static inline void q4_0_quants(const uint8_t *b, int8_t *q) { nibbles32(b + 2, q); }

/* Q4_1: d fp16 | m fp16 | qs[16]: unsigned q, a = d, c = m. */
static inline __attribute__((always_inline)) void q4_1_scales(const uint8_t *b, float *a, float *c) {
    *a = fp16_to_fp32(b);
    *c = fp16_to_fp32(b + 2);
}
static inline void q4_1_quants(const uint8_t *b, int8_t *q) { nibbles32(b + 4, q); }

/* Q4_K: d | dmin | scales[12] | qs[128]; group s: unsigned nibbles of qs[32 (s / 2) ..], low for
 * even s. Its scales: kscales below. */
static inline void q4_k_quants(const uint8_t *b, int s, int8_t *q) {
    const uint8_t *qs = b + 16 + 32 * (s / 2);
    for (int j = 0; j < 32; j++) q[j] = (int8_t)((s & 1) ? qs[j] >> 4 : qs[j] & 0x0F);
}

/* Q5_K: d | dmin | scales[12] | qh[32] | qs[128]: Q4_K's nibbles plus bit s of qh[j] as 16. */
static inline void q5_k_quants(const uint8_t *b, int s, int8_t *q) {
    const uint8_t *qh = b + 16, *qs = b + 48 + 32 * (s / 2);
    for (int j = 0; j < 32; j++)
        q[j] = (int8_t)(((s & 1) ? qs[j] >> 4 : qs[j] & 0x0F) + (((qh[j] >> s) & 1) << 4));
}

/* Q6_K: ql[128] | qh[64] | scales[16] int8 | d fp16; group s = 4 h + k (h the 128-value half):
 * ql[64 h + 32 (k & 1) ..], high nibbles for k >= 2, bits 2k of qh[32 h ..]; signed q - 32. */
static inline void q6_k_quants(const uint8_t *b, int s, int8_t *q) {
    const int h = s / 4, k = s % 4;
    const uint8_t *ql = b + 64 * h + 32 * (k & 1), *qh = b + 128 + 32 * h;
    for (int j = 0; j < 32; j++)
        q[j] = (int8_t)((((k >= 2) ? ql[j] >> 4 : ql[j] & 0x0F) | (((qh[j] >> (2 * k)) & 3) << 4)) - 32);
}

#ifdef Q8_AVX2
static inline __attribute__((always_inline)) __m256i q8_0_quants8(const uint8_t *b) {
    return _mm256_loadu_si256((const __m256i *)(b + 2));
}
static inline __attribute__((always_inline)) __m256i q4_k_quants8(const uint8_t *b, int s) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)(b + 16 + 32 * (s / 2)));
    return _mm256_and_si256((s & 1) ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0x0F));
}
static inline __attribute__((always_inline)) __m256i q5_k_quants8(const uint8_t *b, int s) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)(b + 48 + 32 * (s / 2)));
    const __m256i lo = _mm256_and_si256((s & 1) ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0x0F));
    const __m256i bit = _mm256_set1_epi8((char)(1 << s)), qh = _mm256_loadu_si256((const __m256i *)(b + 16));
    return _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit),
                                                _mm256_set1_epi8(16)));
}
/* Q6_K's unsigned q (0-63); q6_k_quants8 the signed q - 32. */
static inline __attribute__((always_inline)) __m256i q6_k_uquants8(const uint8_t *b, int s) {
    const int h = s / 4, k = s % 4;
    const __m256i l = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32 * (k & 1)));
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
    const __m256i low = _mm256_and_si256(k >= 2 ? _mm256_srli_epi16(l, 4) : l, _mm256_set1_epi8(0x0F));
    return _mm256_or_si256(low, q6_high_bits(qh, k));
}
static inline __attribute__((always_inline)) __m256i q6_k_quants8(const uint8_t *b, int s) {
    return _mm256_sub_epi8(q6_k_uquants8(b, s), _mm256_set1_epi8(32));
}
#endif

enum { MR = 4, NR = 4 };

/* B: lane g mod 8 sums c[g] * t[g] over the groups g in order (fma); additive is hsum8(B). */
static inline __attribute__((always_inline)) void additive_lanes(const float *c, const float *t, int64_t groups,
                                                                  float *b) {
    int64_t g = 0;
    for (int l = 0; l < 8; l++) b[l] = 0.0f;
#ifdef Q8_AVX2
    __m256 v = _mm256_setzero_ps();
    for (; g + 8 <= groups; g += 8) v = _mm256_fmadd_ps(_mm256_loadu_ps(c + g), _mm256_loadu_ps(t + g), v);
    _mm256_storeu_ps(b, v);
#endif
    for (; g < groups; g++) b[g % 8] = fmaf(c[g], t[g], b[g % 8]);
}
static inline __attribute__((always_inline)) float additive(const float *c, const float *t, int64_t groups) {
    float b[8];
    additive_lanes(c, t, groups, b);
    return hsum8(b);
}

#ifdef Q8_AVX2
/* One group g for mr x nr outputs: nr weight groups' signed quants wq and scales sc, times
 * activation rows m0 .. m0 + mr of xq. */
static inline __attribute__((always_inline)) void group_products(
        __m256 (*acc)[NR], const __m256i *wq, const __m256 *sc, const struct xq *xq, int64_t m0, int64_t g,
        const int mr, const int nr) {
    const __m256i ones = _mm256_set1_epi16(1), pairs = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    __m256i wa[NR];
    for (int j = 0; j < nr; j++) wa[j] = _mm256_sign_epi8(wq[j], wq[j]);
    for (int i = 0; i < mr; i++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq->q + (m0 + i) * xq->K + g * G));
        const __m256 dx = _mm256_permutevar8x32_ps(
            _mm256_castps128_ps256(_mm_loadu_ps(xq->d + ((m0 + i) * xq->groups + g) * (G / H))), pairs);
        for (int j = 0; j < nr; j++) {
            /* |q| (-128 as 128) times qx with q's sign, the same products */
            const __m256i p = _mm256_maddubs_epi16(wa[j], _mm256_sign_epi8(xv, wq[j]));
            const __m256 l = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
            acc[i][j] = _mm256_fmadd_ps(_mm256_mul_ps(sc[j], dx), l, acc[i][j]);
        }
    }
}

/* y = hsum8(A) for mr x nr outputs. */
static inline __attribute__((always_inline)) void finish(__m256 (*acc)[NR], int64_t m0, float *y, int64_t ldy,
                                                         const int mr, const int nr) {
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            float a[8];
            _mm256_storeu_ps(a, acc[i][j]);
            y[(m0 + i) * ldy + j] = hsum8(a);
        }
}
#endif

/* mr x nr outputs: activation rows m0 .. m0 + mr of xq, weight rows w .. w + nr rows. T's blocks
 * are one group of 32 signed values in TS bytes. */
#ifdef Q8_AVX2
#define Q8_TILE(T, TS)                                                                               \
static inline __attribute__((always_inline)) void T##_tile(                                          \
        const uint8_t *w, int64_t row_bytes, const struct xq *xq, int64_t m0, float *y, int64_t ldy, \
        const int mr, const int nr) {                                                                \
    __m256 acc[MR][NR];                                                                              \
    for (int i = 0; i < mr; i++)                                                                     \
        for (int j = 0; j < nr; j++) acc[i][j] = _mm256_setzero_ps();                                \
    for (int64_t g = 0; g < xq->groups; g++) {                                                       \
        /* into L2 ahead of use: the same block of the next rows (batches of 1-4 rows come here) */  \
        for (int j = 0; j < nr; j++)                                                                 \
            for (int o = 0; o < TS; o += 64)                                                         \
                _mm_prefetch((const char *)(w + (nr + j) * row_bytes + g * TS + o), _MM_HINT_T1);    \
        __m256i wq[NR];                                                                              \
        __m256 sc[NR];                                                                               \
        for (int j = 0; j < nr; j++) {                                                               \
            const uint8_t *blk = w + j * row_bytes + g * TS;                                         \
            sc[j] = _mm256_set1_ps(T##_scale(blk));                                                  \
            wq[j] = T##_quants8(blk);                                                                \
        }                                                                                            \
        group_products(acc, wq, sc, xq, m0, g, mr, nr);                                              \
    }                                                                                                \
    finish(acc, m0, y, ldy, mr, nr);                                                                 \
}
#else
/* One group's products into an output's 8 lanes, as defined at the top (plain C). */
static inline void group_lanes(float acc[8], float a, const int8_t *q, const int8_t *x, const float *dh) {
    for (int l = 0; l < 8; l++) {
        int sum = 0;
        for (int p = 4 * l; p < 4 * l + 4; p++) sum += q[p] * x[p];
        acc[l] = fmaf(a * dh[l / 2], (float)sum, acc[l]);
    }
}

/* The same arithmetic in plain C (the x86-64-v2 and aarch64 builds). */
#define Q8_TILE(T, TS)                                                                               \
static inline __attribute__((always_inline)) void T##_tile(                                          \
        const uint8_t *w, int64_t row_bytes, const struct xq *xq, int64_t m0, float *y, int64_t ldy,     \
        const int mr, const int nr) {                                                                \
    for (int j = 0; j < nr; j++)                                                                     \
        for (int i = 0; i < mr; i++) {                                                               \
            float acc[8] = {0};                                                                      \
            const int8_t *xr = xq->q + (m0 + i) * xq->K;                                             \
            for (int64_t g = 0; g < xq->groups; g++) {                                               \
                const uint8_t *blk = w + j * row_bytes + g * TS;                                     \
                int8_t q[G];                                                                         \
                T##_quants(blk, q);                                                                  \
                group_lanes(acc, T##_scale(blk), q, xr + g * G, xq->d + ((m0 + i) * xq->groups + g) * (G / H)); \
            }                                                                                        \
            y[(m0 + i) * ldy + j] = hsum8(acc);                                                      \
        }                                                                                            \
}
#endif

struct q8job {
    const uint8_t *w;
    int64_t row_bytes, N;
    const struct xq *xq;
    float *y;
    int64_t ldy;
};

/* Output rows [lo, hi) for all M activation rows, in tiles of up to MR activation rows by 4 weight
 * rows (up to WIDE_M activation rows) or 2 (more: at most 8 ymm accumulators). */
#define TILE_RANGE(NAME, TILE, WIDE_M)                                                               \
static void NAME(const struct q8job *jb, int64_t M, int64_t lo, int64_t hi) {                        \
    const int full = M <= WIDE_M ? 4 : 2;                                                            \
    for (int64_t n = lo; n < hi;) {                                                                  \
        const int nr = hi - n >= full ? full : 1;                                                    \
        const uint8_t *wn = jb->w + n * jb->row_bytes;                                               \
        for (int64_t m0 = 0; m0 < M; m0 += MR) {                                                     \
            const int mr = M - m0 < MR ? (int)(M - m0) : MR;                                         \
            switch (mr * 8 + nr) {                                                                   \
                case 1 * 8 + 4: TILE(wn, jb->row_bytes, jb->xq, m0, jb->y + n, jb->ldy, 1, 4); break; \
                case 4 * 8 + 2: TILE(wn, jb->row_bytes, jb->xq, m0, jb->y + n, jb->ldy, 4, 2); break; \
                case 2 * 8 + 4: TILE(wn, jb->row_bytes, jb->xq, m0, jb->y + n, jb->ldy, 2, 4); break; \
                case 4 * 8 + 1: TILE(wn, jb->row_bytes, jb->xq, m0, jb->y + n, jb->ldy, 4, 1); break; \
                case 3 * 8 + 2: TILE(wn, jb->row_bytes, jb->xq, m0, jb->y + n, jb->ldy, 3, 2); break; \
                case 3 * 8 + 1: TILE(wn, jb->row_bytes, jb->xq, m0, jb->y + n, jb->ldy, 3, 1); break; \
                case 2 * 8 + 2: TILE(wn, jb->row_bytes, jb->xq, m0, jb->y + n, jb->ldy, 2, 2); break; \
                case 2 * 8 + 1: TILE(wn, jb->row_bytes, jb->xq, m0, jb->y + n, jb->ldy, 2, 1); break; \
                case 1 * 8 + 2: TILE(wn, jb->row_bytes, jb->xq, m0, jb->y + n, jb->ldy, 1, 2); break; \
                default: TILE(wn, jb->row_bytes, jb->xq, m0, jb->y + n, jb->ldy, 1, 1); break;    \
            }                                                                                        \
        }                                                                                            \
        n += nr;                                                                                     \
    }                                                                                                \
}

#define Q8_TYPE(T, TS)                                                                               \
Q8_TILE(T, TS)                                                                                       \
Q8_UNPACKED(T, TS)                                                                                   \
TILE_RANGE(T##_range, T##_tile, 2)

#ifdef Q8_AVX2
/* Batches of more than MR rows: TR weight rows are unpacked once (their quants and scales) into a
 * per-thread buffer, which every group of MR activation rows then reads,
 * instead of unpacking each weight group again for every group of activation rows. The same
 * values enter the same operations as in T##_tile, so the same bits. */
enum { TR = 16 };
#endif

#ifdef Q8_AVX512
/* AVX-512 builds: the same products for two weight rows in one 512-bit register (lanes 0-7 the
 * first row's 8 lanes, 8-15 the second's), so each instruction does the work of two AVX2 ones.
 * Unpacked weights are stored by pairs of rows: group g of rows 2p and 2p + 1 as 64 quant bytes
 * and 2 scales (a of each row, spread over its lanes when used); an odd last row is
 * paired with zeros and its outputs are not written. Per lane, the integer sum, the scale product and the fma are the
 * ones of the 256-bit code, in the same order, so the same bits. Signed quants: |q| times qx
 * negated where q < 0 (AVX-512 has no vpsignb), the products of the AVX2 code's sign trick. */
enum { NP = 4 };         /* pairs of weight rows per tile: MR x NP accumulators of the 32 zmm */

struct wpairs {
    int8_t *q;           /* [TR / 2][groups][64] */
    float *s;            /* [TR / 2][groups][2]: a of each row */
};

static inline __attribute__((always_inline)) void pair_tile(
        const struct wpairs *wp, int64_t p0, int64_t rows, const struct xq *xq, int64_t m0, float *y, int64_t ldy,
        const int mr, const int np) {
    const int64_t groups = xq->groups;
    const __m512i ones = _mm512_set1_epi16(1);
    /* lanes: the row's dx_0 dx_0 dx_1 dx_1 dx_2 dx_2 dx_3 dx_3, twice; a x 8 of each row */
    const __m512i spread_d = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 1, 1, 2, 2, 3, 3);
    const __m512i spread_s = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    __m512 acc[MR][NP];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < np; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512i wq[NP];
        __m512 sc[NP];
        __mmask64 neg[NP];
        for (int j = 0; j < np; j++) {
            const int64_t at = (p0 + j) * groups + g;
            wq[j] = _mm512_loadu_si512((const void *)(wp->q + at * 64));
            sc[j] = _mm512_permutexvar_ps(spread_s, _mm512_castps128_ps512(
                _mm_castpd_ps(_mm_load_sd((const double *)(wp->s + at * 2)))));
            neg[j] = _mm512_movepi8_mask(wq[j]);
            wq[j] = _mm512_abs_epi8(wq[j]);
        }
        for (int i = 0; i < mr; i++) {
            const int8_t *xi = xq->q + (m0 + i) * xq->K + g * G;
            const __m512i xv = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)xi));
            const __m512 dx = _mm512_permutexvar_ps(spread_d, _mm512_castps128_ps512(
                _mm_loadu_ps(xq->d + ((m0 + i) * groups + g) * (G / H))));
            for (int j = 0; j < np; j++) {
                const __m512i xs = _mm512_mask_sub_epi8(xv, neg[j], _mm512_setzero_si512(), xv);
                const __m512 l = _mm512_cvtepi32_ps(_mm512_madd_epi16(_mm512_maddubs_epi16(wq[j], xs), ones));
                acc[i][j] = _mm512_fmadd_ps(_mm512_mul_ps(sc[j], dx), l, acc[i][j]);
            }
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < np; j++) {
            float a[16];
            _mm512_storeu_ps(a, acc[i][j]);
            for (int h = 0; h < 2; h++) {
                const int64_t r = 2 * (p0 + j) + h;
                if (r < rows) y[(m0 + i) * ldy + r] = hsum8(a + 8 * h);
            }
        }
}

#define PAIR_CASE(MRv, NPv) \
    case MRv * 8 + NPv: pair_tile(&wp, p, rows, jb->xq, m0, yn, jb->ldy, MRv, NPv); break;
#define Q8_UNPACKED(T, TS)                                                                           \
static void T##_unpack(const uint8_t *w, int64_t row_bytes, int64_t rows, const struct xq *xq,       \
                       struct wpairs *wp) {                                                          \
    const int64_t groups = xq->groups;                                                               \
    for (int64_t r = 0; r < (rows + 1) / 2 * 2; r++)                                                 \
        for (int64_t g = 0; g < groups; g++) {                                                       \
            const int64_t at = (r / 2) * groups + g, h = r % 2;                                      \
            float a = 0.0f;                                                                          \
            __m256i q = _mm256_setzero_si256();                                                      \
            if (r < rows) {                                                                          \
                const uint8_t *blk = w + r * row_bytes + g * TS;                                     \
                a = T##_scale(blk);                                                                  \
                q = T##_quants8(blk);                                                                \
            }                                                                                        \
            _mm256_storeu_si256((__m256i *)(wp->q + at * 64 + h * 32), q);                           \
            wp->s[at * 2 + h] = a;                                                                   \
        }                                                                                            \
}                                                                                                    \
static int T##_batch_range(const struct q8job *jb, int64_t M, int64_t lo, int64_t hi) {              \
    const int64_t groups = jb->xq->groups;                                                           \
    struct wpairs wp = {malloc((size_t)(TR * groups * G)), malloc((size_t)(TR * groups) * sizeof(float))};     \
    if (wp.q == NULL || wp.s == NULL) {                                                              \
        free(wp.q), free(wp.s);                                                                      \
        return -1;                                                                                   \
    }                                                                                                \
    for (int64_t n0 = lo; n0 < hi; n0 += TR) {                                                       \
        const int64_t rows = hi - n0 < TR ? hi - n0 : TR, pairs = (rows + 1) / 2;                    \
        T##_unpack(jb->w + n0 * jb->row_bytes, jb->row_bytes, rows, jb->xq, &wp);                    \
        float *yn = jb->y + n0;                                                                      \
        for (int64_t m0 = 0; m0 < M; m0 += MR) {                                                     \
            const int mr = M - m0 < MR ? (int)(M - m0) : MR;                                         \
            for (int64_t p = 0; p < pairs; p += NP) {                                                \
                const int np = pairs - p < NP ? (int)(pairs - p) : NP;                               \
                switch (mr * 8 + np) {                                                               \
                    PAIR_CASE(4, 4) PAIR_CASE(4, 3) PAIR_CASE(4, 2) PAIR_CASE(4, 1)                      \
                    PAIR_CASE(3, 4) PAIR_CASE(3, 3) PAIR_CASE(3, 2) PAIR_CASE(3, 1)                      \
                    PAIR_CASE(2, 4) PAIR_CASE(2, 3) PAIR_CASE(2, 2) PAIR_CASE(2, 1)                      \
                    PAIR_CASE(1, 4) PAIR_CASE(1, 3) PAIR_CASE(1, 2)                                      \
                    default: pair_tile(&wp, p, rows, jb->xq, m0, yn, jb->ldy, 1, 1); break;          \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    }                                                                                                \
    free(wp.q), free(wp.s);                                                                          \
    return 0;                                                                                        \
}
#elif defined(Q8_AVX2)

struct wtile {
    int8_t *q;              /* [TR][K] */
    float *a;               /* [TR][groups] */
};

static inline __attribute__((always_inline)) void unpacked_tile(
        const struct wtile *wt, int64_t j0, const struct xq *xq, int64_t m0, float *y, int64_t ldy,
        const int mr, const int nr) {
    __m256 acc[MR][NR];
    const int64_t groups = xq->groups;
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) acc[i][j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256i wq[NR];
        __m256 sc[NR];
        for (int j = 0; j < nr; j++) {
            const int64_t r = (j0 + j) * groups + g;
            sc[j] = _mm256_set1_ps(wt->a[r]);
            wq[j] = _mm256_loadu_si256((const __m256i *)(wt->q + (j0 + j) * xq->K + g * G));
        }
        group_products(acc, wq, sc, xq, m0, g, mr, nr);
    }
    finish(acc, m0, y, ldy, mr, nr);
}

#define Q8_UNPACKED(T, TS)                                                                           \
static void T##_unpack(const uint8_t *w, int64_t row_bytes, int64_t rows, const struct xq *xq,       \
                       struct wtile *wt) {                                                           \
    for (int64_t r = 0; r < rows; r++)                                                               \
        for (int64_t g = 0; g < xq->groups; g++) {                                                   \
            const uint8_t *blk = w + r * row_bytes + g * TS;                                         \
            const int64_t at = r * xq->groups + g;                                                   \
            wt->a[at] = T##_scale(blk);                                                              \
            _mm256_storeu_si256((__m256i *)(wt->q + r * xq->K + g * G), T##_quants8(blk));           \
        }                                                                                            \
}                                                                                                    \
static int T##_batch_range(const struct q8job *jb, int64_t M, int64_t lo, int64_t hi) {              \
    const int64_t K = jb->xq->K, groups = jb->xq->groups;                                            \
    struct wtile wt = {malloc((size_t)(TR * K)), malloc((size_t)(TR * groups) * sizeof(float))};     \
    if (wt.q == NULL || wt.a == NULL) {                                                              \
        free(wt.q), free(wt.a);                                                                      \
        return -1;                                                                                   \
    }                                                                                                \
    for (int64_t n0 = lo; n0 < hi; n0 += TR) {                                                       \
        const int64_t rows = hi - n0 < TR ? hi - n0 : TR;                                            \
        T##_unpack(jb->w + n0 * jb->row_bytes, jb->row_bytes, rows, jb->xq, &wt);                    \
        for (int64_t m0 = 0; m0 < M; m0 += MR) {                                                     \
            const int mr = M - m0 < MR ? (int)(M - m0) : MR;                                         \
            for (int64_t j = 0; j < rows;) {                                                         \
                const int nr = rows - j >= 2 ? 2 : 1;                                                \
                float *yj = jb->y + n0 + j;                                                          \
                switch (mr * 8 + nr) {                                                               \
                    case 4 * 8 + 2: unpacked_tile(&wt, j, jb->xq, m0, yj, jb->ldy, 4, 2); break;         \
                    case 3 * 8 + 2: unpacked_tile(&wt, j, jb->xq, m0, yj, jb->ldy, 3, 2); break;         \
                    case 2 * 8 + 2: unpacked_tile(&wt, j, jb->xq, m0, yj, jb->ldy, 2, 2); break;         \
                    case 1 * 8 + 2: unpacked_tile(&wt, j, jb->xq, m0, yj, jb->ldy, 1, 2); break;         \
                    case 4 * 8 + 1: unpacked_tile(&wt, j, jb->xq, m0, yj, jb->ldy, 4, 1); break;         \
                    case 3 * 8 + 1: unpacked_tile(&wt, j, jb->xq, m0, yj, jb->ldy, 3, 1); break;         \
                    case 2 * 8 + 1: unpacked_tile(&wt, j, jb->xq, m0, yj, jb->ldy, 2, 1); break;         \
                    default: unpacked_tile(&wt, j, jb->xq, m0, yj, jb->ldy, 1, 1); break;         \
                }                                                                                    \
                j += nr;                                                                             \
            }                                                                                        \
        }                                                                                            \
    }                                                                                                \
    free(wt.q), free(wt.a);                                                                          \
    return 0;                                                                                        \
}
#else
#define Q8_UNPACKED(T, TS)
#endif

Q8_TYPE(q8_0, 34)

/* ---- Q4_0 and Q4_1: the group form. Activations (quantize_rowg) are 8 bits per 8 values times an
 * integer multiplier r (1-128) of one scale d per 32-value group, so a weight group's 32 products
 * add up as integers before one float multiply-add: with 4-bit weights, two maddubs results (8
 * values, at most 8 * 15 * 127) add in 16 bits, and one madd multiplies them by r. An output costs
 * llama.cpp's count of integer operations per group (its Q4_0 x Q8_0 kernel) and one fma a group,
 * where an 8-bit scale per 8 values needed a conversion and an fma per 4 products.
 *
 * What each output is (every build computes this, so they agree bit for bit):
 *   - activations: per group g of 32 values d_g, and per 8 values r_p and q8 (quantize_rowg);
 *     t_g = d_g * (float)(sum of the group's r_p q8);
 *   - weight group g of row n: unsigned quants q (0-15), a scale a and an additive term c
 *     (value = a * q + c: Q4_0 c = -8 a, Q4_1 c = m);
 *   - I_g = sum over the 4 parts p of r_p * (sum of q * q8 over the part), an exact int32 (at most
 *     4 * 128 * 8 * 15 * 127 < 2^24, so exact in float too);
 *   - A = fma(a * d_g, (float)I_g, A) over the groups in order (one chain: a group's integer work
 *     outlasts an fma's latency);
 *   - B[g mod 8] = fma(c, t_g, B[g mod 8]) over the groups in order (additive_lanes);
 *   - y = A + hsum8(B).
 *
 * The kernels work on 8 weight rows interleaved (below), so that the 8 lanes of a vector register
 * are 8 outputs: a weight of at least 8 rows that a linear alone holds is kept that way (the _X8
 * types); other rows are interleaved 8 at a time into a buffer as they are multiplied. */
#ifndef Q8_AVX2
/* I_g in plain C, as defined above (r: the low 16 bits of each word). */
static inline int32_t group_int(const int8_t *q, const int8_t *x, const int32_t *r) {
    int32_t I = 0;
    for (int p = 0; p < GP; p++) {
        int32_t s = 0;
        for (int v = GV * p; v < GV * (p + 1); v++) s += q[v] * x[v];
        I += (int16_t)r[p] * s;
    }
    return I;
}
#endif

/* ---- The group form's interleaved layout (the _X8 types).
 * lumen_interleave rearranges such a weight in place, 8 rows at a time (the last N mod 8 rows stay
 * as they are): group g of rows 8c .. 8c + 7 becomes 8 TS bytes at 8 TS g from the chunk's start:
 * the 8 rows' fp16 d in row order (Q4_1: then their m), then 4 vectors of 32 bytes, vector v
 * holding bytes 4v .. 4v + 3 of each row's qs in row order. Its low nibbles are each row's values
 * 4v .. 4v + 3 and its high nibbles values 16 + 4v .. 16 + 4v + 3. So maddubs gives 8 outputs'
 * products at once, and the multiply by r, the conversion and the fma of a group serve 8 outputs
 * (llama.cpp repacks Q4_0 into 8-row blocks for the same reason). Each output's operations are the
 * ones defined above, in the same order: the same bits as the row by row kernels, in every build.
 * Q8_0 is not interleaved: its row by row kernels stream it at memory speed already for one row,
 * and this layout's passes measured slower at 1-4 rows (kernel_ab --interleave, Zen 4, AVX2 build,
 * before its removal: 0.83-0.98x at one row, 0.67-0.79x at two, 1.12x at 16). */
enum { XR = 8, X8_ID = 1000 };   /* an _X8 type's id: its GGML type's plus X8_ID */
/* How far ahead the first activation row's pass prefetches the weights it streams: 3 KB.
 * kernel_ab, Q4_0, one row, the AVX2 build on Zen 4: 1.47x for 2048 x 5632 weights (TinyLlama's
 * ffn_down: its 10 KB activation row and the 25 KB chunks do not fit in L1 together), 0.99x and
 * 1.04x for 5632 x 2048 and 2560 x 2048 (the first two, 512 bytes ahead: 1.08x, 0.90x; 1 KB: 1.29x,
 * 0.93x; 2 KB: 1.32x, 1.00x; 4 KB: 1.40x, 0.93x). */
enum { XPF = 3072 };

static int x8_base(int qtype) {
    return qtype == LUMEN_Q4_0_X8 || qtype == LUMEN_Q4_1_X8 ? qtype - X8_ID : -1;
}
/* The fp16 fields that start a block (d; Q4_1: d, m); the 16 qs bytes follow them. */
static inline int x8_fields(int base) { return base == LUMEN_Q4_1 ? 2 : 1; }
/* A block's bytes: those fields, then 16 bytes of quants. */
static inline int x8_block_bytes(int base) { return 2 * x8_fields(base) + 16; }

static inline void copy_to(int to_x8, uint8_t *x8, uint8_t *blk, size_t n) {
    if (to_x8) memcpy(x8, blk, n);
    else memcpy(blk, x8, n);
}
/* Row i (of 8) of an interleaved group grp into the block layout (blk), or the reverse. */
static inline void x8_move(uint8_t *grp, int i, uint8_t *blk, int fields, int to_x8) {
    for (int f = 0; f < fields; f++) copy_to(to_x8, grp + 16 * f + 2 * i, blk + 2 * f, 2);
    for (int v = 0; v < 4; v++) copy_to(to_x8, grp + 16 * fields + 32 * v + 4 * i, blk + 2 * fields + 4 * v, 4);
}

int lumen_interleave(int qtype, uint8_t *w, int64_t N, int64_t row_bytes, int64_t K, int to_x8) {
    int bs, ts;
    if ((qtype != LUMEN_Q4_0 && qtype != LUMEN_Q4_1) || lumen_block_layout(qtype, &bs, &ts) != LUMEN_OK)
        return LUMEN_E_TYPE;
    const int fields = x8_fields(qtype);
    const int rc = lumen_check_rows(qtype, row_bytes, K);
    if (rc != LUMEN_OK) return rc;
    if (N < 0) return LUMEN_E_SHAPE;
    uint8_t *tmp = malloc((size_t)(XR * row_bytes));
    if (tmp == NULL) return LUMEN_E_NOMEM;
    for (int64_t c = 0; c < N / XR; c++) {
        uint8_t *chunk = w + c * XR * row_bytes;
        memcpy(tmp, chunk, (size_t)(XR * row_bytes));
        for (int64_t g = 0; g < K / G; g++)
            for (int i = 0; i < XR; i++) {
                if (to_x8) x8_move(chunk + g * XR * ts, i, tmp + i * row_bytes + g * ts, fields, 1);
                else x8_move(tmp + g * XR * ts, i, chunk + i * row_bytes + g * ts, fields, 0);
            }
    }
    free(tmp);
    return LUMEN_OK;
}

#ifdef Q8_AVX2
enum { XMR = 4 };   /* activation rows a pass over a chunk */

/* The 8 outputs of activation rows m0 .. m0 + mr and the chunk of weight rows at ch (type B: Q4_0 or
 * Q4_1), into y (row i at y + i ldy). Each group's quants are unpacked once for the mr rows; per row,
 * two maddubs results add in 16 bits per 8 values (at most 8 * 15 * 127), one madd multiplies them
 * by r_p, and one fma adds the group. Each group's 8 additive terms c are stored into cs (store: the
 * first pass) or read from it. */
static inline __attribute__((always_inline)) void x8_tile(const uint8_t *ch, const struct xq *xq, int64_t m0,
                                                          const int mr, float *cs, const int store, float *y,
                                                          int64_t ldy, const int B) {
    const int TS = x8_block_bytes(B), GB = XR * TS;
    const int QBYTES = 16 * x8_fields(B);                     /* where the quant vectors start */
    const int64_t groups = xq->groups, K = xq->K;
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256 A[XMR];
    for (int i = 0; i < mr; i++) A[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *grp = ch + g * GB;
        const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)grp));   /* exact, as fp16_to_fp32 */
        if (store) {
            for (int o = 0; o < GB; o += 64) _mm_prefetch((const char *)(grp + XPF + o), _MM_HINT_T0);
            _mm256_storeu_ps(cs + 8 * g, B == LUMEN_Q4_0 ? _mm256_mul_ps(_mm256_set1_ps(-8.0f), a)
                                                         : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(grp + 16))));
        }
        __m256i wl[4], wh[4];   /* vector v: values 4v .. 4v + 3 (low nibbles) and 16 + 4v .. (high) of 8 rows */
        for (int v = 0; v < 4; v++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(grp + QBYTES + 32 * v));
            wl[v] = _mm256_and_si256(w, low);
            wh[v] = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
        }
        for (int i = 0; i < mr; i++) {
            const int8_t *x = xq->qg + (m0 + i) * K + g * G;
            const int32_t *r = xq->rg + ((m0 + i) * groups + g) * GP;
            __m256i I = _mm256_setzero_si256();
            for (int h = 0; h < 2; h++) {   /* parts h (values 8h .. 8h + 7) and 2 + h (16 + 8h ..) */
                int32_t x0, x1, x2, x3;
                memcpy(&x0, x + 8 * h, 4), memcpy(&x1, x + 8 * h + 4, 4);
                memcpy(&x2, x + 16 + 8 * h, 4), memcpy(&x3, x + 16 + 8 * h + 4, 4);
                const __m256i lo = _mm256_add_epi16(_mm256_maddubs_epi16(wl[2 * h], _mm256_set1_epi32(x0)),
                                                    _mm256_maddubs_epi16(wl[2 * h + 1], _mm256_set1_epi32(x1)));
                const __m256i hi = _mm256_add_epi16(_mm256_maddubs_epi16(wh[2 * h], _mm256_set1_epi32(x2)),
                                                    _mm256_maddubs_epi16(wh[2 * h + 1], _mm256_set1_epi32(x3)));
                I = _mm256_add_epi32(I, _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_set1_epi32(r[h])),
                                                         _mm256_madd_epi16(hi, _mm256_set1_epi32(r[2 + h]))));
            }
            A[i] = _mm256_fmadd_ps(_mm256_mul_ps(a, _mm256_set1_ps(xq->dg[(m0 + i) * groups + g])),
                                   _mm256_cvtepi32_ps(I), A[i]);
        }
    }
    /* y = A + hsum8(B), lane by lane over the 8 outputs, B[g mod 8] = fma(c_g, t_g, ..) */
    for (int i = 0; i < mr; i++) {
        const float *t = xq->tg + (m0 + i) * groups;
        __m256 Bs[8];
        for (int l = 0; l < 8; l++) Bs[l] = _mm256_setzero_ps();
        int64_t g = 0;
        for (; g + 8 <= groups; g += 8)
            for (int l = 0; l < 8; l++)
                Bs[l] = _mm256_fmadd_ps(_mm256_loadu_ps(cs + 8 * (g + l)), _mm256_set1_ps(t[g + l]), Bs[l]);
        for (int l = 0; g + l < groups; l++)
            Bs[l] = _mm256_fmadd_ps(_mm256_loadu_ps(cs + 8 * (g + l)), _mm256_set1_ps(t[g + l]), Bs[l]);
        const __m256 yb = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(Bs[0], Bs[4]), _mm256_add_ps(Bs[2], Bs[6])),
                                        _mm256_add_ps(_mm256_add_ps(Bs[1], Bs[5]), _mm256_add_ps(Bs[3], Bs[7])));
        _mm256_storeu_ps(y + i * ldy, _mm256_add_ps(A[i], yb));
    }
}

/* x8_tile for activation rows m0 .. min(M, m0 + XMR), with mr a constant in each call. */
static inline __attribute__((always_inline)) void x8_tiles(const uint8_t *ch, const struct xq *xq, int64_t m0,
                                                           int64_t M, float *cs, float *y, int64_t ldy, const int B) {
    switch (M - m0 < XMR ? M - m0 : XMR) {
        case 4: x8_tile(ch, xq, m0, 4, cs, m0 == 0, y, ldy, B); break;
        case 3: x8_tile(ch, xq, m0, 3, cs, m0 == 0, y, ldy, B); break;
        case 2: x8_tile(ch, xq, m0, 2, cs, m0 == 0, y, ldy, B); break;
        default: x8_tile(ch, xq, m0, 1, cs, m0 == 0, y, ldy, B); break;
    }
}

/* Output rows [lo, hi) (whole chunks) for M activation rows, XMR at a time: the weights stream from
 * memory in the first pass and come from cache in the others'. At every batch size this was faster
 * than unpacking the weights once for tiles of rows, as the row by row kernels did above 4 rows
 * (Q4_0 in the earlier 8-value form, x8 / row by row on Zen 4, AVX2 build: 1.00x / 1.56x / 1.30x /
 * 1.23x / 1.18x at 5 / 8 / 16 / 64 / 128 rows; AVX-512 build: 1.40x and 1.23x at 16 and 128). */
static inline __attribute__((always_inline)) void x8_range(const struct q8job *jb, int64_t M, int64_t lo, int64_t hi,
                                                           const int B) {
    float cs[XR * jb->xq->groups];
    for (int64_t n = lo; n < hi; n += XR) {
        const uint8_t *ch = jb->w + n * jb->row_bytes;
        for (int64_t m0 = 0; m0 < M; m0 += XMR) x8_tiles(ch, jb->xq, m0, M, cs, jb->y + m0 * jb->ldy + n, jb->ldy, B);
    }
}

/* Rows w .. w + rows - 1 (rows <= 8; type B, the file's layout) interleaved into the chunk at ch, as
 * lumen_interleave would, the missing rows as zero blocks: per group, an 8 x 4 transpose of 32-bit
 * words in unpacks. */
static inline __attribute__((always_inline)) void x8_pack(const uint8_t *w, int64_t row_bytes, const int rows,
                                                          int64_t groups, uint8_t *ch, const int B) {
    const int TS = x8_block_bytes(B), F = x8_fields(B);
    for (int64_t g = 0; g < groups; g++) {
        uint8_t *grp = ch + g * XR * TS;
        __m128i q[XR];
        for (int i = 0; i < XR; i++) {
            const uint8_t *blk = w + i * row_bytes + g * TS;
            if (i < rows) {
                for (int f = 0; f < F; f++) memcpy(grp + 16 * f + 2 * i, blk + 2 * f, 2);
                q[i] = _mm_loadu_si128((const __m128i *)(blk + 2 * F));
            } else {
                for (int f = 0; f < F; f++) memset(grp + 16 * f + 2 * i, 0, 2);
                q[i] = _mm_setzero_si128();
            }
        }
        __m256i a[4], t[4];
        for (int i = 0; i < 4; i++) a[i] = _mm256_set_m128i(q[i + 4], q[i]);   /* rows i and i + 4 */
        t[0] = _mm256_unpacklo_epi32(a[0], a[1]), t[1] = _mm256_unpackhi_epi32(a[0], a[1]);
        t[2] = _mm256_unpacklo_epi32(a[2], a[3]), t[3] = _mm256_unpackhi_epi32(a[2], a[3]);
        uint8_t *qv = grp + 16 * F;
        _mm256_storeu_si256((__m256i *)qv, _mm256_unpacklo_epi64(t[0], t[2]));           /* bytes 0-3 of rows 0-7 */
        _mm256_storeu_si256((__m256i *)(qv + 32), _mm256_unpackhi_epi64(t[0], t[2]));    /* 4-7 */
        _mm256_storeu_si256((__m256i *)(qv + 64), _mm256_unpacklo_epi64(t[1], t[3]));    /* 8-11 */
        _mm256_storeu_si256((__m256i *)(qv + 96), _mm256_unpackhi_epi64(t[1], t[3]));    /* 12-15 */
    }
}

/* Output rows [lo, hi) of a weight in the file's layout (type B): 8 rows at a time interleaved into a
 * per-thread buffer (x8_pack, a few operations a group against the tiles' tens per group and
 * activation row), then the interleaved kernel; the last rows mod 8 padded with zero rows, whose
 * outputs are dropped. Returns nonzero if the buffer could not be allocated. */
static inline __attribute__((always_inline)) int file_range(const struct q8job *jb, int64_t M, int64_t lo, int64_t hi,
                                                            const int B) {
    const int TS = x8_block_bytes(B);
    const int64_t groups = jb->xq->groups;
    uint8_t *ch = malloc((size_t)(groups * XR * TS));
    if (ch == NULL) return 1;
    float cs[XR * groups];
    for (int64_t n = lo; n < hi; n += XR) {
        const int rows = hi - n < XR ? (int)(hi - n) : XR;
        /* rows a constant in the full chunks' call, so that their pack has no per-row test */
        if (rows == XR) x8_pack(jb->w + n * jb->row_bytes, jb->row_bytes, XR, groups, ch, B);
        else x8_pack(jb->w + n * jb->row_bytes, jb->row_bytes, rows, groups, ch, B);
        for (int64_t m0 = 0; m0 < M; m0 += XMR) {
            if (rows == XR) {
                x8_tiles(ch, jb->xq, m0, M, cs, jb->y + m0 * jb->ldy + n, jb->ldy, B);
                continue;
            }
            float part[XMR * XR];
            x8_tiles(ch, jb->xq, m0, M, cs, part, XR, B);
            for (int64_t i = m0; i < M && i < m0 + XMR; i++)
                memcpy(jb->y + i * jb->ldy + n, part + (i - m0) * XR, sizeof(float) * rows);
        }
    }
    free(ch);
    return 0;
}
#else
/* Output rows [lo, hi) of a Q4_0 or Q4_1 weight (base), in the file's layout or interleaved (x8: each
 * block put back together first), as defined above, in plain C (the x86-64-v2 and aarch64 builds). */
static void group_scalar_range(const struct q8job *jb, int64_t M, int64_t lo, int64_t hi, int base, int x8) {
    const struct xq *xq = jb->xq;
    const int TS = x8_block_bytes(base);
    float cs[xq->groups];
    for (int64_t n = lo; n < hi; n++)
        for (int64_t m = 0; m < M; m++) {
            float acc = 0.0f;
            for (int64_t g = 0; g < xq->groups; g++) {
                uint8_t tmp[20];
                const uint8_t *blk = jb->w + n * jb->row_bytes + g * TS;
                if (x8) {
                    x8_move((uint8_t *)jb->w + n / XR * XR * jb->row_bytes + g * XR * TS, (int)(n % XR), tmp,
                            x8_fields(base), 0);
                    blk = tmp;
                }
                int8_t q[G];
                float a;
                if (base == LUMEN_Q4_0) q4_0_scales(blk, &a, &cs[g]), q4_0_quants(blk, q);
                else q4_1_scales(blk, &a, &cs[g]), q4_1_quants(blk, q);
                const int64_t mg = m * xq->groups + g;
                acc = fmaf(a * xq->dg[mg], (float)group_int(q, xq->qg + m * xq->K + g * G, xq->rg + mg * GP), acc);
            }
            jb->y[m * jb->ldy + n] = acc + additive(cs, xq->tg + m * xq->groups, xq->groups);
        }
}
#endif

/* The row range of a Q4_0 or Q4_1 weight, in either layout: its kernel (nonzero: out of memory). */
static int group_any_range(int qtype, const struct q8job *jb, int64_t M, int64_t lo, int64_t hi) {
#ifdef Q8_AVX2
    if (qtype == LUMEN_Q4_0_X8) x8_range(jb, M, lo, hi, LUMEN_Q4_0);
    if (qtype == LUMEN_Q4_1_X8) x8_range(jb, M, lo, hi, LUMEN_Q4_1);
    if (qtype == LUMEN_Q4_0) return file_range(jb, M, lo, hi, LUMEN_Q4_0);
    if (qtype == LUMEN_Q4_1) return file_range(jb, M, lo, hi, LUMEN_Q4_1);
#else
    const int x8 = x8_base(qtype) >= 0;
    group_scalar_range(jb, M, lo, hi, x8 ? x8_base(qtype) : qtype, x8);
#endif
    return 0;
}

/* ---- The K-quants (Q4_K, Q5_K, Q6_K): 8-bit activations with an integer multiplier per 16
 * values, integer sums over each 256-value block. Their sub-block scales are integers (6 bits,
 * Q6_K's 8), and so are the activations' multipliers r, so a block's products add up exactly
 * before any float operation. For 1-4 rows, 32 values of an output cost one 8-bit multiply-add
 * (maddubs), one 16-bit one by sc r (madd) and an integer add, as llama.cpp's Q4_K x Q8_K kernel;
 * batches multiply 16-bit values (w = sc q by qx = r q8: two madd and two adds per 32 values, each
 * weight row unpacked once for every activation row). Activations are 8 bits in 16s, on a grid of
 * the block's d: never coarser than llama.cpp's Q8_K (8 bits, one scale per 256 values), finer
 * wherever 16 values are smaller than their block's largest.
 *
 * What each output is (every build computes this, so they agree bit for bit):
 *   - activations in blocks of 256 values (quantize_row16): dx = amax / QR (QR = 127 * 128), per
 *     16 values r (0-128) and q8 (+-127), qx = r q8; per group g of 32, t_g = dx * (float)(sum of
 *     its qx);
 *   - weight block: integers w = sc * q (Q4_K, Q5_K: the group's 6-bit scale times the unsigned
 *     quant; Q6_K: the 16 values' 8-bit scale times q - 32; |w| <= 4096), the block's float d and,
 *     for Q4_K and Q5_K, c_g = -(dmin * m_g) per group (value d w + c_g, as ggml decodes it);
 *   - lane l (0..7) of block b: I = sum of w * qx over values 4l .. 4l + 3 of each of its groups, an
 *     exact int32 (32 products of at most 4096 * 16256);
 *     A[l] = fma(d * dx, (float)I, A[l]) over the blocks in order;
 *   - Q4_K, Q5_K: B[g mod 8] = fma(c_g, t_g, B[g mod 8]) over the groups in order (Q6_K: B = 0);
 *   - y = hsum8(A + B), lane by lane (one horizontal sum an output). */

/* One weight block's scales: d, the integer scale of each 16 values, and c of its 8 groups. */
struct kblock {
    float d;
    float c[8];
    int16_t sc[16];
};

static inline __attribute__((always_inline)) void q4_k_kscales(const uint8_t *b, struct kblock *kb) {
    const float dmin = fp16_to_fp32(b + 2);
    kb->d = fp16_to_fp32(b);
#ifdef Q8_AVX2
    const __m128i f = k4_scale_min_bytes(b);
    _mm256_storeu_si256((__m256i *)kb->sc, _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(f, f)));
    const __m256 m = _mm256_mul_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(f, 8))));
    _mm256_storeu_ps(kb->c, _mm256_xor_ps(m, _mm256_set1_ps(-0.0f)));      /* -(dmin * m), exactly */
#else
    for (int s = 0; s < 8; s++) {
        uint8_t sc, mn;
        scale_min_k4(s, b + 4, &sc, &mn);
        kb->sc[2 * s] = kb->sc[2 * s + 1] = sc;
        kb->c[s] = -(dmin * (float)mn);
    }
#endif
}
#define q5_k_kscales q4_k_kscales
static inline __attribute__((always_inline)) void q6_k_kscales(const uint8_t *b, struct kblock *kb) {
    kb->d = fp16_to_fp32(b + 208);
#ifdef Q8_AVX2
    _mm256_storeu_si256((__m256i *)kb->sc, _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 192))));
#else
    for (int h = 0; h < 16; h++) kb->sc[h] = ((const int8_t *)(b + 192))[h];
#endif
}

#ifdef Q8_AVX2
/* Group s's 32 values w for the batches, in q16's order: out[0] the value pairs 0, 2, .., 14, out[1]
 * pairs 1, 3, .., 15 (the pairs of two registers a, c in order, shuffled within 128-bit lanes and
 * then across them). */
static inline __attribute__((always_inline)) void pairs_split(__m256i a, __m256i c, __m256i out[2]) {
    const __m256 ap = _mm256_castsi256_ps(a), cp = _mm256_castsi256_ps(c);
    out[0] = _mm256_permute4x64_epi64(_mm256_castps_si256(_mm256_shuffle_ps(ap, cp, 0x88)), 0xD8);
    out[1] = _mm256_permute4x64_epi64(_mm256_castps_si256(_mm256_shuffle_ps(ap, cp, 0xDD)), 0xD8);
}
#define KQ_W16(T, WIDEN)                                                                                \
static inline __attribute__((always_inline)) void T##_w16(const uint8_t *b, int s, const struct kblock *kb, \
                                                          __m256i out[2]) {                            \
    const __m256i q = T##_quants8(b, s);                                                               \
    pairs_split(_mm256_mullo_epi16(WIDEN(_mm256_castsi256_si128(q)), _mm256_set1_epi16(kb->sc[2 * s])), \
                _mm256_mullo_epi16(WIDEN(_mm256_extracti128_si256(q, 1)), _mm256_set1_epi16(kb->sc[2 * s + 1])), \
                out);                                                                                  \
}
KQ_W16(q4_k, _mm256_cvtepu8_epi16)
KQ_W16(q5_k, _mm256_cvtepu8_epi16)
KQ_W16(q6_k, _mm256_cvtepi8_epi16)

/* For 1-4 rows: a block's d, c (Q4_K, Q5_K, into c) and its integer scales as 16-bit words, group
 * s's at word s of both 128-bit lanes (Q4_K, Q5_K: sc_s in both; Q6_K: its first 16 values' scale in
 * the low lane, the rest's in the high one), the same integers as kscales. */
static inline __attribute__((always_inline)) __m256i q4_k_split_scales(const uint8_t *b, float *d, float *c) {
    const __m128i f = k4_scale_min_bytes(b);
    const __m256 m = _mm256_mul_ps(_mm256_set1_ps(fp16_to_fp32(b + 2)),
                                   _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(f, 8))));
    _mm256_storeu_ps(c, _mm256_xor_ps(m, _mm256_set1_ps(-0.0f)));          /* -(dmin * m), exactly */
    *d = fp16_to_fp32(b);
    return _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(f));
}
#define q5_k_split_scales q4_k_split_scales
static inline __attribute__((always_inline)) __m256i q6_k_split_scales(const uint8_t *b, float *d, float *c) {
    (void)c;
    *d = fp16_to_fp32(b + 208);
    const __m128i even_odd = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(b + 192)), even_odd));
}
/* Word s of each 128-bit lane, in every word of that lane. */
static inline __attribute__((always_inline)) __m256i group_words(__m256i v, int s) {
    return _mm256_shuffle_epi8(v, _mm256_set1_epi16((short)((2 * s + 1) << 8 | 2 * s)));
}
/* The quants as unsigned bytes, for maddubs (Q6_K's above). */
#define q4_k_uquants8 q4_k_quants8
#define q5_k_uquants8 q5_k_quants8

enum { KMR = 4, KNR = 4 };
enum { KBM = 4, KBN = 2 };   /* batch tiles: 4 x 2 (3 x 3, 3 x 2, 4 x 3 measured no faster) */

/* acc[i][j] += the products of group (value off) of weight rows j and activation rows m0 + i (both
 * in q16's order, so lane l sums values 4l .. 4l + 3): a register of 16 values at a time, fewer
 * registers live. */
static inline __attribute__((always_inline)) void kq_products(
        __m256i (*acc)[KNR], __m256i (*w)[2], const struct xq *xq, int64_t m0, int64_t off, const int mr,
        const int nr) {
    for (int h = 0; h < 2; h++)
        for (int i = 0; i < mr; i++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq->q16 + (m0 + i) * xq->K + off + 16 * h));
            for (int j = 0; j < nr; j++) {
                acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(w[j][h], xv));
                __asm__("" : "+x"(acc[i][j]));   /* as it comes: GCC otherwise pairs the products first, and
                                                    runs out of registers (kernel_ab 1.05-1.08x at 16-128 rows) */
            }
        }
}

/* The same sums for 1-4 activation rows, from the weights' unsigned 8-bit quants q and the rows'
 * 8-bit q (both in order): w * qx = (sc r) (q * q8). maddubs pairs the products (at most
 * 2 * 63 * 127; Q6_K, OFFSET: minus 32 times the pair's q8, so (q - 32) * q8 exactly), madd
 * multiplies the pairs by scale[i][j] = sc r (|sc r| <= 128 * 128) and adds them: lane l gets
 * values 4l .. 4l + 3, the exact integers the batches sum. */
static inline __attribute__((always_inline)) void kq_byte_products(
        __m256i (*acc)[KNR], const __m256i *q, __m256i (*scale)[KNR], const struct xq *xq, int64_t m0, int64_t off,
        const int mr, const int nr, const int OFFSET) {
    for (int i = 0; i < mr; i++) {
        const int64_t at = (m0 + i) * xq->K + off;
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq->q8k + at));
        const __m256i pair = OFFSET ? _mm256_loadu_si256((const __m256i *)(xq->pairs + at / 2)) : xv;
        for (int j = 0; j < nr; j++) {
            __m256i p = _mm256_maddubs_epi16(q[j], xv);
            if (OFFSET) p = _mm256_sub_epi16(p, pair);
            acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(p, scale[i][j]));
        }
    }
}

/* The end of block b: A = fma(d * dx, I, A) per lane, I reset. */
static inline __attribute__((always_inline)) void kq_block_end(
        __m256 (*A)[KNR], __m256i (*acc)[KNR], const float *d, const struct xq *xq, int64_t m0, int64_t b,
        const int mr, const int nr) {
    for (int i = 0; i < mr; i++) {
        const float dx = xq->d16[(m0 + i) * (xq->K / QB) + b];
        for (int j = 0; j < nr; j++) {
            A[i][j] = _mm256_fmadd_ps(_mm256_set1_ps(d[j] * dx), _mm256_cvtepi32_ps(acc[i][j]), A[i][j]);
            acc[i][j] = _mm256_setzero_si256();
        }
    }
}

/* y = hsum8(A + B) (Q6_K: hsum8(A)), B = fma(c_g, t_g, B) over the groups g in order, lane g mod 8
 * (additive_lanes' sums; groups is a multiple of 8, K of 256); weight row j's c at c + j * ldc. The
 * tile's mr * nr chains of fmas run side by side, not one output's after another's. */
static inline __attribute__((always_inline)) void kq_finish(
        __m256 (*A)[KNR], const float *c, int64_t ldc, const struct xq *xq, int64_t m0, float *y, int64_t ldy,
        const int mr, const int nr, const int MINS) {
    __m256 B[KMR][KNR];
    if (MINS) {
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++) B[i][j] = _mm256_setzero_ps();
        for (int64_t g = 0; g < xq->groups; g += 8) {
            __m256 cv[KNR];
            for (int j = 0; j < nr; j++) cv[j] = _mm256_loadu_ps(c + j * ldc + g);
            for (int i = 0; i < mr; i++) {
                const __m256 tv = _mm256_loadu_ps(xq->t16 + (m0 + i) * xq->groups + g);
                for (int j = 0; j < nr; j++) B[i][j] = _mm256_fmadd_ps(cv[j], tv, B[i][j]);
            }
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            float a[8];
            _mm256_storeu_ps(a, MINS ? _mm256_add_ps(A[i][j], B[i][j]) : A[i][j]);
            y[(m0 + i) * ldy + j] = hsum8(a);
        }
}

#define KQ_ZERO(mr, nr)                                                                                 \
    __m256i acc[KMR][KNR];                                                                              \
    __m256 A[KMR][KNR];                                                                                 \
    for (int i = 0; i < mr; i++)                                                                        \
        for (int j = 0; j < nr; j++) {                                                                  \
            acc[i][j] = _mm256_setzero_si256();                                                         \
            A[i][j] = _mm256_setzero_ps();                                                              \
        }

/* mr x nr outputs straight from the weight rows w .. w + nr (batches of 1-4 rows). One row: each
 * weight row's sc r for the whole block at once (one multiply a block); more rows: a group's sc
 * times each row's r. */
#define KQ_TILE(T, TS, MINS)                                                                            \
static inline __attribute__((always_inline)) void T##_ktile(                                             \
        const uint8_t *w, int64_t row_bytes, const struct xq *xq, int64_t m0, float *y, int64_t ldy,        \
        const int mr, const int nr) {                                                                   \
    KQ_ZERO(mr, nr)                                                                                     \
    float cs[MINS ? KNR : 1][MINS ? xq->groups : 1];                                                    \
    for (int64_t b = 0; b < xq->K / QB; b++) {                                                          \
        for (int j = 0; j < nr; j++)                                                                    \
            for (int o = 0; o < TS; o += 64)                                                            \
                _mm_prefetch((const char *)(w + (nr + j) * row_bytes + b * TS + o), _MM_HINT_T1);       \
        float d[KNR];                                                                                   \
        __m256i sc[KNR];                                                                                \
        for (int j = 0; j < nr; j++)                                                                    \
            sc[j] = T##_split_scales(w + j * row_bytes + b * TS, &d[j], MINS ? &cs[j][b * 8] : NULL);    \
        const int16_t *rk = xq->rk + m0 * (xq->K / QH) + b * (QB / QH);                                 \
        __m256i rb[KMR];                      /* row i's r: group s's halves at word s of each lane */   \
        for (int i = 0; i < mr; i++) rb[i] = _mm256_loadu_si256((const __m256i *)(rk + i * (xq->K / QH)));\
        if (mr == 1)                                                                                    \
            for (int j = 0; j < nr; j++) sc[j] = _mm256_mullo_epi16(sc[j], rb[0]);                      \
        _Pragma("GCC unroll 8")               /* constant s: each group's quants without branches */     \
        for (int s = 0; s < QB / G; s++) {                                                              \
            __m256i q[KNR], scale[KMR][KNR];                                                            \
            for (int j = 0; j < nr; j++) {                                                              \
                q[j] = T##_uquants8(w + j * row_bytes + b * TS, s);                                     \
                const __m256i sj = group_words(sc[j], s);                                               \
                for (int i = 0; i < mr; i++)                                                            \
                    scale[i][j] = mr == 1 ? sj : _mm256_mullo_epi16(sj, group_words(rb[i], s));            \
            }                                                                                           \
            kq_byte_products(acc, q, scale, xq, m0, b * QB + s * G, mr, nr, !MINS);                     \
        }                                                                                               \
        kq_block_end(A, acc, d, xq, m0, b, mr, nr);                                                     \
    }                                                                                                   \
    kq_finish(A, &cs[0][0], MINS ? xq->groups : 0, xq, m0, y, ldy, mr, nr, MINS);                       \
}

/* Batches of more than KMR rows: TR weight rows unpacked once (16-bit values, d and c) into a
 * per-thread buffer that every group of activation rows then reads: the same values in the same
 * operations, so the same bits. */
struct ktile {
    int16_t *w;                /* [TR][K] */
    float *d, *c;              /* [TR][K / QB], [TR][groups] */
};

static inline __attribute__((always_inline)) void kq_unpacked_tile(
        const struct ktile *kt, int64_t j0, const struct xq *xq, int64_t m0, float *y, int64_t ldy,
        const int mr, const int nr, const int MINS) {
    KQ_ZERO(mr, nr)
    const int64_t K = xq->K, blocks = K / QB;
    for (int64_t b = 0; b < blocks; b++) {
        float d[KNR];
        for (int j = 0; j < nr; j++) d[j] = kt->d[(j0 + j) * blocks + b];
        for (int s = 0; s < QB / G; s++) {
            __m256i wv[KNR][2];
            for (int j = 0; j < nr; j++) {
                const int16_t *wj = kt->w + (j0 + j) * K + b * QB + s * G;
                wv[j][0] = _mm256_loadu_si256((const __m256i *)wj);
                wv[j][1] = _mm256_loadu_si256((const __m256i *)(wj + 16));
            }
            kq_products(acc, wv, xq, m0, b * QB + s * G, mr, nr);
        }
        kq_block_end(A, acc, d, xq, m0, b, mr, nr);
    }
    kq_finish(A, kt->c + j0 * xq->groups, xq->groups, xq, m0, y, ldy, mr, nr, MINS);
}

#define KQ_CASE(MINS, mrv, nrv) \
    case mrv * 8 + nrv: kq_unpacked_tile(&kt, j, jb->xq, m0, yj, jb->ldy, mrv, nrv, MINS); break;
#define KQ_BATCH(T, TS, MINS)                                                                           \
static int T##_kbatch_range(const struct q8job *jb, int64_t M, int64_t lo, int64_t hi) {                \
    const int64_t K = jb->xq->K, blocks = K / QB, groups = jb->xq->groups;                              \
    struct ktile kt = {malloc((size_t)(TR * K) * sizeof(int16_t)), malloc((size_t)(TR * blocks) * sizeof(float)),\
                       malloc((size_t)(TR * groups) * sizeof(float))};                                  \
    if (kt.w == NULL || kt.d == NULL || kt.c == NULL) {                                                 \
        free(kt.w), free(kt.d), free(kt.c);                                                             \
        return -1;                                                                                      \
    }                                                                                                   \
    for (int64_t n0 = lo; n0 < hi; n0 += TR) {                                                          \
        const int64_t rows = hi - n0 < TR ? hi - n0 : TR;                                               \
        for (int64_t r = 0; r < rows; r++)                                                              \
            for (int64_t b = 0; b < blocks; b++) {                                                      \
                const uint8_t *blk = jb->w + (n0 + r) * jb->row_bytes + b * TS;                         \
                struct kblock kb;                                                                       \
                T##_kscales(blk, &kb);                                                                  \
                kt.d[r * blocks + b] = kb.d;                                                            \
                if (MINS) memcpy(kt.c + r * groups + b * 8, kb.c, sizeof kb.c);                         \
                for (int s = 0; s < QB / G; s++) {                                                      \
                    __m256i wv[2];                                                                      \
                    T##_w16(blk, s, &kb, wv);                                                           \
                    _mm256_storeu_si256((__m256i *)(kt.w + r * K + b * QB + s * G), wv[0]);             \
                    _mm256_storeu_si256((__m256i *)(kt.w + r * K + b * QB + s * G + 16), wv[1]);        \
                }                                                                                       \
            }                                                                                           \
        for (int64_t m0 = 0; m0 < M; m0 += KBM) {                                                       \
            const int mr = M - m0 < KBM ? (int)(M - m0) : KBM;                                          \
            for (int64_t j = 0; j < rows;) {                                                            \
                const int nr = rows - j >= KBN ? KBN : (int)(rows - j);                                 \
                float *yj = jb->y + n0 + j;                                                             \
                switch (mr * 8 + nr) {                                                                  \
                    KQ_CASE(MINS, 4, 2) KQ_CASE(MINS, 3, 2) KQ_CASE(MINS, 2, 2) KQ_CASE(MINS, 1, 2)     \
                    KQ_CASE(MINS, 4, 1) KQ_CASE(MINS, 3, 1) KQ_CASE(MINS, 2, 1) default: KQ_CASE(MINS, 1, 1)\
                }                                                                                       \
                j += nr;                                                                                \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
    free(kt.w), free(kt.d), free(kt.c);                                                                 \
    return 0;                                                                                           \
}
#else
/* The same arithmetic in plain C (the x86-64-v2 and aarch64 builds). */
#define KQ_TILE(T, TS, MINS)                                                                            \
static inline void T##_ktile(const uint8_t *w, int64_t row_bytes, const struct xq *xq, int64_t m0, float *y,\
                             int64_t ldy, const int mr, const int nr) {                                 \
    float cs[xq->groups];                                                                               \
    for (int j = 0; j < nr; j++)                                                                        \
        for (int i = 0; i < mr; i++) {                                                                  \
            float A[8] = {0}, B[8];                                                                     \
            const int16_t *xr = xq->q16 + (m0 + i) * xq->K;                                             \
            for (int64_t b = 0; b < xq->K / QB; b++) {                                                  \
                const uint8_t *blk = w + j * row_bytes + b * TS;                                        \
                struct kblock kb;                                                                       \
                T##_kscales(blk, &kb);                                                                  \
                if (MINS) memcpy(&cs[b * 8], kb.c, sizeof kb.c);                                        \
                int32_t I[8] = {0};                                                                     \
                for (int s = 0; s < QB / G; s++) {                                                      \
                    int8_t q[G];                                                                        \
                    T##_quants(blk, s, q);                                                              \
                    for (int v = 0; v < G; v++)                                                         \
                        I[v / 4] += (int32_t)(kb.sc[2 * s + v / 16] * q[v]) * xr[b * QB + s * G + v];\
                }                                                                                       \
                const float dx = xq->d16[(m0 + i) * (xq->K / QB) + b];                                  \
                for (int l = 0; l < 8; l++) A[l] = fmaf(kb.d * dx, (float)I[l], A[l]);                  \
            }                                                                                           \
            if (MINS) {                                                                                 \
                additive_lanes(cs, xq->t16 + (m0 + i) * xq->groups, xq->groups, B);                     \
                for (int l = 0; l < 8; l++) A[l] += B[l];                                               \
            }                                                                                           \
            y[(m0 + i) * ldy + j] = hsum8(A);                                                           \
        }                                                                                               \
}
#define KQ_BATCH(T, TS, MINS)
#endif

/* Output rows [lo, hi) for all M activation rows, in tiles as T##_range above (4 weight rows for
 * one activation row only). */
#define KQ_TYPE(T, TS, MINS)                                                                            \
KQ_TILE(T, TS, MINS)                                                                                    \
KQ_BATCH(T, TS, MINS)                                                                                   \
TILE_RANGE(T##_krange, T##_ktile, 1)   /* 16-bit values: two registers a group and row */

/* MINS: Q4_K and Q5_K, with their c_g terms; Q6_K's q - 32 (kq_byte_products' OFFSET). */
KQ_TYPE(q4_k, 144, 1)
KQ_TYPE(q5_k, 176, 1)
KQ_TYPE(q6_k, 210, 0)

#define LEGACY_TYPES(X) X(LUMEN_Q8_0, q8_0)
#define K_TYPES(X) X(LUMEN_Q4_K, q4_k) X(LUMEN_Q5_K, q5_k) X(LUMEN_Q6_K, q6_k)

/* Q4_0 and Q4_1, in either layout: the group form. */
static int group_type(int qtype) {
    return qtype == LUMEN_Q4_0 || qtype == LUMEN_Q4_1 || x8_base(qtype) >= 0;
}

int lumen_int8_type(int qtype) {
#define HAS(id, T) if (qtype == id) return 1;
    LEGACY_TYPES(HAS)
    if (group_type(qtype)) return 1;
    K_TYPES(HAS)
#undef HAS
    return 0;
}

static int k_type(int qtype) {
#define HAS(id, T) if (qtype == id) return 1;
    K_TYPES(HAS)
#undef HAS
    return 0;
}

/* x's M rows quantized into xq in the form qtype's kernels read, unless it is there already
 * (buffers allocated here, xq zeroed before the first call; xq_free releases them). */
static int quantize(int qtype, const float *x, int64_t M, int64_t ldx, int64_t K, int nthreads, struct xq *xq) {
    const int wide = k_type(qtype);
    xq->K = K, xq->groups = K / G;
    if (group_type(qtype)) {
        if (xq->dg != NULL) return LUMEN_OK;
        xq->qg = malloc((size_t)(M * K));
        xq->rg = malloc((size_t)(M * (K / GV)) * sizeof(int32_t));
        xq->dg = malloc((size_t)(M * (K / G)) * sizeof(float));
        xq->tg = malloc((size_t)(M * (K / G)) * sizeof(float));
        if (xq->qg == NULL || xq->rg == NULL || xq->dg == NULL || xq->tg == NULL) return LUMEN_E_NOMEM;
#pragma omp parallel for num_threads(nthreads) if (M >= 8)
        for (int64_t m = 0; m < M; m++)
            quantize_rowg(x + m * ldx, K, xq->qg + m * K, xq->rg + m * (K / GV), xq->dg + m * xq->groups,
                          xq->tg + m * xq->groups);
        return LUMEN_OK;
    }
    if (wide ? xq->d16 != NULL : xq->q != NULL) return LUMEN_OK;
    if (wide) {
#ifdef Q8_AVX2
        const int split = M <= MR;            /* the form T##_ktile reads; batches read q16 */
#else
        const int split = 0;
#endif
        if (split) {       /* pairs: Q6_K's, made for every K-quant, as the parts of a linear share one form */
            xq->q8k = malloc((size_t)(M * K));
            xq->rk = malloc((size_t)(M * (K / QH)) * sizeof(int16_t));
            xq->pairs = malloc((size_t)(M * (K / 2)) * sizeof(int16_t));
        } else {
            xq->q16 = malloc((size_t)(M * K) * sizeof(int16_t));
        }
        xq->d16 = malloc((size_t)(M * (K / QB)) * sizeof(float));
        xq->t16 = malloc((size_t)(M * (K / G)) * sizeof(float));
        if ((split ? xq->q8k == NULL || xq->rk == NULL || xq->pairs == NULL : xq->q16 == NULL) ||
            xq->d16 == NULL || xq->t16 == NULL)
            return LUMEN_E_NOMEM;
#pragma omp parallel for num_threads(nthreads) if (M >= 8)
        for (int64_t m = 0; m < M; m++)
            quantize_row16(x + m * ldx, K, split ? NULL : xq->q16 + m * K, split ? xq->q8k + m * K : NULL,
                           split ? xq->rk + m * (K / QH) : NULL, split ? xq->pairs + m * (K / 2) : NULL,
                           xq->d16 + m * (K / QB), xq->t16 + m * xq->groups);
        return LUMEN_OK;
    }
    xq->q = malloc((size_t)(M * K));
    xq->d = malloc((size_t)(M * K / H) * sizeof(float));
    if (xq->q == NULL || xq->d == NULL) return LUMEN_E_NOMEM;
#pragma omp parallel for num_threads(nthreads) if (M >= 8)
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + m * ldx, K, xq->q + m * K, xq->d + m * (K / H));
    return LUMEN_OK;
}

static void xq_free(struct xq *xq) {
    free(xq->q), free(xq->d), free(xq->q16), free(xq->q8k), free(xq->rk), free(xq->pairs), free(xq->d16), free(xq->t16);
    free(xq->qg), free(xq->rg), free(xq->dg), free(xq->tg);
}

/* y = xq's M rows times W (an int8 type, rows checked by the caller). */
static int multiply(int qtype, const uint8_t *w, int64_t row_bytes, int64_t N, const struct xq *xq, int64_t M,
                    float *y, int64_t ldy, int nthreads) {
    const struct q8job jb = {w, row_bytes, N, xq, y, ldy};
#ifdef Q8_AVX2
    const int batch = M > MR && !group_type(qtype);    /* the group form's kernels: every batch size */
    const int64_t align = group_type(qtype) ? XR : batch ? TR : M <= 2 ? 4 : 2;
#else
    const int batch = 0;
    const int64_t align = x8_base(qtype) >= 0 ? XR : M <= 2 ? 4 : 2;
#endif
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
        const int64_t chunks = (N + align - 1) / align;
        const int64_t lo = chunks * id / nt * align, hi = chunks * (id + 1) / nt * align;
        int mine = 0;
        if (lo < N) {
#ifdef Q8_AVX2
#define RUN(tid, T) if (qtype == tid && batch) mine = T##_batch_range(&jb, M, lo, hi < N ? hi : N);       \
                    if (qtype == tid && !batch) T##_range(&jb, M, lo, hi < N ? hi : N);
#define KRUN(tid, T) if (qtype == tid && batch) mine = T##_kbatch_range(&jb, M, lo, hi < N ? hi : N);     \
                     if (qtype == tid && !batch) T##_krange(&jb, M, lo, hi < N ? hi : N);
#else
#define RUN(tid, T) if (qtype == tid) T##_range(&jb, M, lo, hi < N ? hi : N);
#define KRUN(tid, T) if (qtype == tid) T##_krange(&jb, M, lo, hi < N ? hi : N);
#endif
            LEGACY_TYPES(RUN)
            if (group_type(qtype)) mine = group_any_range(qtype, &jb, M, lo, hi < N ? hi : N);
            K_TYPES(KRUN)
#undef RUN
#undef KRUN
        }
        if (mine != 0) {
#pragma omp atomic write
            failed = 1;
        }
    }
    (void)batch;
    return failed ? LUMEN_E_NOMEM : LUMEN_OK;
}

/* The same over every row of an int8 type's weight: an _X8 weight's last N mod 8 rows are rows of
 * its GGML type. */
static int multiply_weight(int qtype, const uint8_t *w, int64_t row_bytes, int64_t N, const struct xq *xq,
                           int64_t M, float *y, int64_t ldy, int nthreads) {
    if (x8_base(qtype) < 0) return multiply(qtype, w, row_bytes, N, xq, M, y, ldy, nthreads);
    const int64_t n8 = N / XR * XR;
    int rc = n8 > 0 ? multiply(qtype, w, row_bytes, n8, xq, M, y, ldy, nthreads) : LUMEN_OK;
    if (rc == LUMEN_OK && N > n8)
        rc = multiply(x8_base(qtype), w + n8 * row_bytes, row_bytes, N - n8, xq, M, y + n8, ldy, nthreads);
    return rc;
}

int lumen_int8_check_rows(int qtype, int64_t row_bytes, int64_t k) {
    return lumen_check_rows(x8_base(qtype) >= 0 ? x8_base(qtype) : qtype, row_bytes, k);
}

int lumen_qmatmul_int8(int qtype, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K,
                       const float *x, int64_t M, int64_t ldx, float *y, int64_t ldy, int nthreads) {
    if (!lumen_int8_type(qtype))
        return lumen_qmatmul(qtype, w, row_bytes, N, K, x, M, ldx, y, ldy, nthreads);
    const int rc = lumen_int8_check_rows(qtype, row_bytes, K);
    if (rc != LUMEN_OK) return rc;
    if (N < 0 || M < 0 || ldx < K || ldy < N) return LUMEN_E_SHAPE;
    if (M == 0 || N == 0) return LUMEN_OK;
    struct xq xq = {0};
    int out = quantize(qtype, x, M, ldx, K, nthreads, &xq);
    if (out == LUMEN_OK) out = multiply_weight(qtype, w, row_bytes, N, &xq, M, y, ldy, nthreads);
    xq_free(&xq);
    return out;
}

int lumen_linear_int8(const struct lumen_linear *l, const float *x, int64_t rows, int64_t k, float *y, int64_t ldy,
                      int nthreads) {
    struct xq xq = {0};
    int rc = LUMEN_OK;
    int64_t col = 0;
    for (int p = 0; p < l->parts && rc == LUMEN_OK; p++) {
        if (!lumen_int8_type(l->qtype[p]))
            rc = lumen_qmatmul(l->qtype[p], l->w[p], l->row_bytes[p], l->n[p], k, x, rows, k, y + col, ldy, nthreads);
        else if ((rc = lumen_int8_check_rows(l->qtype[p], l->row_bytes[p], k)) == LUMEN_OK && rows > 0 && l->n[p] > 0) {
            rc = quantize(l->qtype[p], x, rows, k, k, nthreads, &xq);   /* once a form: the parts share their input */
            if (rc == LUMEN_OK) rc = multiply_weight(l->qtype[p], l->w[p], l->row_bytes[p], l->n[p], &xq, rows, y + col, ldy,
                                              nthreads);
        }
        col += l->n[p];
    }
    xq_free(&xq);
    return rc;
}
