/* 16-lane float vectors shared by the CPU kernels: an unaligned load, an explicit fma (one
 * rounding on every target, since the library is built with -ffp-contract=off) and a
 * horizontal sum in one fixed tree, so every reduction has a single, batch-independent order. */
#ifndef LUMEN_SIMD_H
#define LUMEN_SIMD_H
#include <math.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));   /* unaligned loads */

static inline __attribute__((always_inline)) v16 load(const float *p) { return *(const v16u *)p; }

static inline __attribute__((always_inline)) v16 vfma(v16 a, v16 b, v16 c) {
#ifdef __AVX512F__
    return (v16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
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
#endif
