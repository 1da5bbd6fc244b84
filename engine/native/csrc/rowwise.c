/* The row-wise work between a layer's matmuls (rowwise.h), in C so that a decode step makes a
 * few calls per layer instead of dozens of small torch operations. Each reduction runs in one
 * fixed order per row (16 lanes, then simd.h's tree), so a row's result never depends on
 * the batch. Elementwise products are written as torch writes them (no fused multiply-add:
 * the file is built with -ffp-contract=off), so RoPE gives torch's bits exactly. */
#include <math.h>
#include <string.h>

#include "qmatmul.h"
#include "rowwise.h"
#include "simd.h"

void lumen_add_rms_norm(float *x, int64_t ldx, const float *dx, int64_t lddx, int64_t rows, int64_t dim,
                        const float *w, float eps, float *out, int64_t ldo) {
    for (int64_t r = 0; r < rows; r++) {
        float *xr = x + r * ldx, *o = out + r * ldo;
        if (dx != NULL) {
            const float *d = dx + r * lddx;
            for (int64_t j = 0; j < dim; j++) xr[j] += d[j];
        }
        v16 acc = {0};
        int64_t j = 0;
        for (; j + 16 <= dim; j += 16) {
            const v16 v = load(xr + j);
            acc = vfma(v, v, acc);
        }
        float ss = hsum(acc);
        for (; j < dim; j++) ss = fmaf(xr[j], xr[j], ss);
        const float scale = 1.0f / sqrtf(ss / (float)dim + eps);
        for (j = 0; j < dim; j++) o[j] = xr[j] * scale * w[j];
    }
}

int lumen_check_positions_slots(const int64_t *positions, const int64_t *slots, int64_t rows,
                                int64_t positions_limit, int64_t slots_limit) {
    for (int64_t r = 0; r < rows; r++)
        if (positions[r] < 0 || positions[r] >= positions_limit || slots[r] < 0 || slots[r] >= slots_limit)
            return LUMEN_E_INDEX;
    return LUMEN_OK;
}

int lumen_rope_store(float *qkv, int64_t ldqkv, int64_t rows, int nq, int nkv, int hd, int rope_dim,
                     const int64_t *positions, const float *cos, const float *sin,
                     float *k_cache, float *v_cache, const int64_t *slots, int64_t positions_limit,
                     int64_t slots_limit) {
    const int checked = lumen_check_positions_slots(positions, slots, rows, positions_limit, slots_limit);
    if (checked != LUMEN_OK) return checked;
    lumen_rope_store_checked(qkv, ldqkv, rows, nq, nkv, hd, rope_dim, positions, cos, sin, k_cache, v_cache, slots);
    return LUMEN_OK;
}

void lumen_rope_store_checked(float *qkv, int64_t ldqkv, int64_t rows, int nq, int nkv, int hd, int rope_dim,
                              const int64_t *positions, const float *cos, const float *sin,
                              float *k_cache, float *v_cache, const int64_t *slots) {
    const int half = rope_dim / 2;
    for (int64_t r = 0; r < rows; r++) {
        float *row = qkv + r * ldqkv;
        const float *c = cos + positions[r] * half, *s = sin + positions[r] * half;
        for (int head = 0; head < nq + nkv; head++) {
            float *v = row + (int64_t)head * hd;
            for (int i = 0; i < half; i++) {
                const float x0 = v[2 * i], x1 = v[2 * i + 1];
                v[2 * i] = x0 * c[i] - x1 * s[i];
                v[2 * i + 1] = x0 * s[i] + x1 * c[i];
            }
        }
        const size_t kv_bytes = (size_t)nkv * hd * sizeof(float);
        memcpy(k_cache + slots[r] * nkv * hd, row + (int64_t)nq * hd, kv_bytes);
        memcpy(v_cache + slots[r] * nkv * hd, row + (int64_t)(nq + nkv) * hd, kv_bytes);
    }
}

void lumen_silu_mul(const float *h, int64_t ldh, int64_t rows, int64_t ffn, float *out, int64_t ldo) {
    for (int64_t r = 0; r < rows; r++) {
        const float *g = h + r * ldh, *u = g + ffn;
        float *o = out + r * ldo;
        int64_t j = 0;
#ifdef __AVX512F__
        for (; j + 16 <= ffn; j += 16) {
            const __m512 gv = _mm512_loadu_ps(g + j);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            _mm512_storeu_ps(o + j, _mm512_mul_ps(silu, _mm512_loadu_ps(u + j)));
        }
#elif defined(__AVX2__) && defined(__FMA__)
        for (; j + 16 <= ffn; j += 16)           /* as the AVX-512 loop, in two halves: the same bits */
            for (int half = 0; half < 16; half += 8) {
                const __m256 gv = _mm256_loadu_ps(g + j + half);
                const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
                const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
                _mm256_storeu_ps(o + j + half, _mm256_mul_ps(silu, _mm256_loadu_ps(u + j + half)));
            }
#endif
        for (; j < ffn; j++) o[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
    }
}
