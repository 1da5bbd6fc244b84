/* 16-lane float vectors shared by the CPU kernels: an unaligned load, an explicit fma (one
 * rounding on every target, since the library is built with -ffp-contract=off) and a
 * horizontal sum in one fixed tree, so every reduction has a single, batch-independent order;
 * and a 16-lane exponential, so that a value's e^x does not depend on its lane or neighbours. */
#ifndef LUMEN_SIMD_H
#define LUMEN_SIMD_H
#include <math.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));   /* unaligned loads */

static inline __attribute__((always_inline)) v16 load(const float *p) { return *(const v16u *)p; }

#if !defined(__AVX512F__) && defined(__AVX2__)
/* A v16 as the two 8-lane ymm halves that AVX2 computes it in. */
typedef union { v16 v; __m256 h[2]; } v16_halves;
#endif

static inline __attribute__((always_inline)) v16 vfma(v16 a, v16 b, v16 c) {
#ifdef __AVX512F__
    return (v16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__AVX2__) && defined(__FMA__)
    /* Two 8-lane fmas: each lane rounds once, as with AVX-512 or fmaf, so the same bits. */
    v16_halves x = {a}, y = {b}, z = {c};
    z.h[0] = _mm256_fmadd_ps(x.h[0], y.h[0], z.h[0]);
    z.h[1] = _mm256_fmadd_ps(x.h[1], y.h[1], z.h[1]);
    return z.v;
#else
    v16 r;
    for (int i = 0; i < 16; i++) r[i] = fmaf(a[i], b[i], c[i]);
    return r;
#endif
}

static inline float hsum(v16 v) {
    float s8[8], s4[4];
    for (int i = 0; i < 8; i++) s8[i] = v[i] + v[i + 8];
    for (int i = 0; i < 4; i++) s4[i] = s8[i] + s8[i + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}
/* e^x's steps shared by exp16 and exp8 (W: the intrinsics' prefix, _mm512 or _mm256), one set of
 * constants for both: |x| clamped to 88, n = x / ln2 rounded (ROUND), x = n ln2 + r (ln2 in two
 * parts), p = e^r by Cephes' expf polynomial on |r| <= ln2 / 2. The caller scales p by 2^n. */
#define EXP_REDUCED(W, T, ROUND, x, n, p)                                                         \
    x = W##_max_ps(W##_min_ps(x, W##_set1_ps(88.0f)), W##_set1_ps(-88.0f));                       \
    const T n = ROUND(W##_mul_ps(x, W##_set1_ps(1.44269504088896341f)),                           \
                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);                              \
    T r_ = W##_fnmadd_ps(n, W##_set1_ps(0.693359375f), x);                                        \
    r_ = W##_fnmadd_ps(n, W##_set1_ps(-2.12194440e-4f), r_);                                      \
    T p = W##_set1_ps(1.9875691500e-4f);                                                          \
    p = W##_fmadd_ps(p, r_, W##_set1_ps(1.3981999507e-3f));                                       \
    p = W##_fmadd_ps(p, r_, W##_set1_ps(8.3334519073e-3f));                                       \
    p = W##_fmadd_ps(p, r_, W##_set1_ps(4.1665795894e-2f));                                       \
    p = W##_fmadd_ps(p, r_, W##_set1_ps(1.6666665459e-1f));                                       \
    p = W##_fmadd_ps(p, r_, W##_set1_ps(5.0000001201e-1f));                                       \
    p = W##_fmadd_ps(p, W##_mul_ps(r_, r_), W##_add_ps(r_, W##_set1_ps(1.0f)))

#ifdef __AVX512F__
/* e^x for 16 lanes: EXP_REDUCED, then scaled by 2^n. Within 2 ulp of expf. */
static inline __attribute__((always_inline)) __m512 exp16(__m512 x) {
    EXP_REDUCED(_mm512, __m512, _mm512_roundscale_ps, x, n, p);
    return _mm512_scalef_ps(p, n);
}
#elif defined(__AVX2__) && defined(__FMA__)
/* exp16's e^x for 8 lanes: the same operations, so the same bits in AVX2 builds. AVX2 has no
 * scalef; 2^n is applied as 2^a * 2^b (a = floor(n / 2), b = n - a, both within +-64): the
 * first product is exact and the second rounds once, as scalef's single product does. */
static inline __attribute__((always_inline)) __m256 exp8(__m256 x) {
    EXP_REDUCED(_mm256, __m256, _mm256_round_ps, x, n, p);
    const __m256i ni = _mm256_cvtps_epi32(n), a = _mm256_srai_epi32(ni, 1), b = _mm256_sub_epi32(ni, a);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 pa = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(a, bias), 23));
    const __m256 pb = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(b, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, pa), pb);
}
#endif
#endif
