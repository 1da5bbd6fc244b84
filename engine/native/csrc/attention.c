/* Attention of single query rows over the paged KV cache, on CPU: the decode half of the torch
 * backend (engine/model/attention/torch_backend.py), one call per layer for the whole batch.
 *
 * Each work unit is one (query row, KV head) pair: the group of query heads that share the KV
 * head scores every cached key once, takes a float32 softmax, and sums the values. A unit's
 * float operations depend only on its own row, context and head size, never on the batch,
 * the split across threads or the other rows, so a sequence decodes to the same bits alone or
 * batched. Dot products: lane l of a 16-lane accumulator sums k = l, l + 16, ... in order,
 * the lanes are added in a fixed tree, then any tail k >= 16 * (hd / 16) follows in order.
 *
 * Compiled with -ffp-contract=off like the matmul; multiply-adds are explicit fma.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "attention.h"
#include "qmatmul.h"
#include "simd.h"

static inline float dot(const float *a, const float *b, int n) {
    const int body = n & ~15;
    float s = 0.0f;
    if (body) {
        v16 acc = {0};
        for (int k = 0; k < body; k += 16) acc = vfma(load(a + k), load(b + k), acc);
        s = hsum(acc);
    }
    for (int k = body; k < n; k++) s = fmaf(a[k], b[k], s);
    return s;
}

/* One cached row of hd values as float32: the cache itself, or `tmp` filled from bf16. */
static inline const float *cache_row(const void *cache, int bf16, int64_t offset, int hd, float *tmp) {
    if (!bf16) return (const float *)cache + offset;
    const uint16_t *src = (const uint16_t *)cache + offset;
    for (int k = 0; k < hd; k++) {
        const uint32_t bits = (uint32_t)src[k] << 16;
        memcpy(tmp + k, &bits, sizeof bits);
    }
    return tmp;
}

int lumen_check_attention(const int32_t *block_tables, int64_t ldbt, const int64_t *rows, const int32_t *seqs,
                          const int32_t *ctx_lens, int64_t n_rows, int nh, int nkv, int hd, int block_size,
                          int64_t q_rows, int64_t n_seqs, int64_t table_width, int64_t num_blocks) {
    if (n_rows < 0 || nh <= 0 || nkv <= 0 || nh % nkv != 0 || hd <= 0 || block_size <= 0 || table_width < 0
        || (n_seqs > 0 && ldbt < table_width))
        return LUMEN_E_SHAPE;
    for (int64_t i = 0; i < n_rows; i++) {
        if (rows[i] < 0 || rows[i] >= q_rows || seqs[i] < 0 || seqs[i] >= n_seqs || ctx_lens[i] < 0
            || ctx_lens[i] > table_width * block_size)
            return LUMEN_E_INDEX;
        const int32_t *table = block_tables + (int64_t)seqs[i] * ldbt;
        for (int64_t b = 0; b < (ctx_lens[i] + block_size - 1) / block_size; b++)
            if (table[b] < 0 || table[b] >= num_blocks) return LUMEN_E_INDEX;
    }
    return LUMEN_OK;
}

int lumen_paged_attention_rows(const float *q, int64_t ldq, const void *k_cache, const void *v_cache,
                               int cache_bf16, const int32_t *block_tables, int64_t ldbt,
                               const int64_t *rows, const int32_t *seqs, const int32_t *ctx_lens,
                               int64_t n_rows, int nh, int nkv, int hd, int block_size, float scale,
                               float *out, int64_t ldo, int nthreads,
                               int64_t q_rows, int64_t n_seqs, int64_t table_width, int64_t num_blocks) {
    const int checked = lumen_check_attention(block_tables, ldbt, rows, seqs, ctx_lens, n_rows, nh, nkv, hd,
                                              block_size, q_rows, n_seqs, table_width, num_blocks);
    if (checked != LUMEN_OK) return checked;
    return lumen_paged_attention_checked(q, ldq, k_cache, v_cache, cache_bf16, block_tables, ldbt, rows, seqs,
                                         ctx_lens, n_rows, nh, nkv, hd, block_size, scale, out, ldo, nthreads);
}

int lumen_paged_attention_checked(const float *q, int64_t ldq, const void *k_cache, const void *v_cache,
                                  int cache_bf16, const int32_t *block_tables, int64_t ldbt,
                                  const int64_t *rows, const int32_t *seqs, const int32_t *ctx_lens,
                                  int64_t n_rows, int nh, int nkv, int hd, int block_size, float scale,
                                  float *out, int64_t ldo, int nthreads) {
    const int group = nh / nkv;
    int64_t max_ctx = 0;
    for (int64_t i = 0; i < n_rows; i++) max_ctx = ctx_lens[i] > max_ctx ? ctx_lens[i] : max_ctx;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        /* Per thread: scores [group][max_ctx], a bf16 staging row and the group's outputs. */
        float *buf = malloc(sizeof(float) * ((size_t)group * (size_t)max_ctx + (size_t)hd * (1 + group)));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t unit = 0; unit < n_rows * nkv; unit++) {
            if (!buf) continue;
            const int64_t i = unit / nkv;
            const int g = (int)(unit % nkv);
            const int64_t ctx = ctx_lens[i];
            const int32_t *table = block_tables + (int64_t)seqs[i] * ldbt;
            const float *qg = q + rows[i] * ldq + (int64_t)g * group * hd;
            float *scores = buf, *tmp = buf + (size_t)group * max_ctx, *acc = tmp + hd;
            for (int64_t j = 0; j < ctx; j++) {
                const int64_t slot = (int64_t)table[j / block_size] * block_size + j % block_size;
                const float *kj = cache_row(k_cache, cache_bf16, (slot * nkv + g) * hd, hd, tmp);
                for (int h = 0; h < group; h++) scores[h * max_ctx + j] = dot(qg + h * hd, kj, hd) * scale;
            }
            float inv_sum[group];
            for (int h = 0; h < group; h++) {
                float *s = scores + h * max_ctx, top = -INFINITY, sum = 0.0f;
                for (int64_t j = 0; j < ctx; j++) top = s[j] > top ? s[j] : top;
                int64_t j = 0;
#ifdef __AVX512F__
                for (; j + 16 <= ctx; j += 16)      /* the same exponential whatever the context */
                    _mm512_storeu_ps(s + j, exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), _mm512_set1_ps(top))));
                for (; j < ctx; j++) {
                    const __mmask16 one = 1;
                    _mm512_mask_storeu_ps(s + j, one, exp16(_mm512_set1_ps(s[j] - top)));
                }
#elif defined(__AVX2__) && defined(__FMA__)
                for (; j + 8 <= ctx; j += 8)        /* exp16's values, 8 lanes at a time */
                    _mm256_storeu_ps(s + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(top))));
                for (; j < ctx; j++) s[j] = _mm256_cvtss_f32(exp8(_mm256_set1_ps(s[j] - top)));
#else
                for (; j < ctx; j++) s[j] = expf(s[j] - top);
#endif
                for (j = 0; j < ctx; j++) sum += s[j];
                inv_sum[h] = 1.0f / sum;
            }
            memset(acc, 0, sizeof(float) * (size_t)hd * group);
            for (int64_t j = 0; j < ctx; j++) {
                const int64_t slot = (int64_t)table[j / block_size] * block_size + j % block_size;
                const float *vj = cache_row(v_cache, cache_bf16, (slot * nkv + g) * hd, hd, tmp);
                for (int h = 0; h < group; h++) {
                    const float p = scores[h * max_ctx + j];
                    float *a = acc + h * hd;
                    for (int k = 0; k < hd; k++) a[k] = fmaf(p, vj[k], a[k]);
                }
            }
            float *og = out + rows[i] * ldo + (int64_t)g * group * hd;
            for (int h = 0; h < group; h++)
                for (int k = 0; k < hd; k++) og[h * hd + k] = acc[h * hd + k] * inv_sum[h];
        }
        free(buf);
    }
    return failed ? LUMEN_E_NOMEM : LUMEN_OK;
}
