/* Lumen's CPU attention kernel over the paged KV cache: the C interface. */
#ifndef LUMEN_ATTENTION_H
#define LUMEN_ATTENTION_H
#include <stdint.h>

/* For each i < n_rows, query row rows[i] of q (nh heads of hd floats, ldq floats apart) attends
 * to the first ctx_lens[i] positions of sequence seqs[i], whose block table is row seqs[i] of
 * block_tables (ldbt entries apart). Caches are [num_blocks, block_size, nkv, hd], float32, or
 * bfloat16 when cache_bf16. Writes out row rows[i] (ldo floats apart). Each row's result does
 * not depend on the other rows or the thread count.
 *
 * Bounds, checked before anything is read: q and out have q_rows rows, block_tables has n_seqs
 * rows of table_width block ids, the caches num_blocks blocks. Returns LUMEN_OK, LUMEN_E_INDEX
 * (a row, sequence, context length or block id out of range), LUMEN_E_SHAPE or LUMEN_E_NOMEM. */
int lumen_paged_attention_rows(const float *q, int64_t ldq, const void *k_cache, const void *v_cache,
                               int cache_bf16, const int32_t *block_tables, int64_t ldbt,
                               const int64_t *rows, const int32_t *seqs, const int32_t *ctx_lens,
                               int64_t n_rows, int nh, int nkv, int hd, int block_size, float scale,
                               float *out, int64_t ldo, int nthreads,
                               int64_t q_rows, int64_t n_seqs, int64_t table_width, int64_t num_blocks);

/* The attention itself, for a caller that ran lumen_check_attention on these arguments
 * (lumen_layer_forward checks once, before its first write). */
int lumen_paged_attention_checked(const float *q, int64_t ldq, const void *k_cache, const void *v_cache,
                                  int cache_bf16, const int32_t *block_tables, int64_t ldbt,
                                  const int64_t *rows, const int32_t *seqs, const int32_t *ctx_lens,
                                  int64_t n_rows, int nh, int nkv, int hd, int block_size, float scale,
                                  float *out, int64_t ldo, int nthreads);

/* The checks alone. */
int lumen_check_attention(const int32_t *block_tables, int64_t ldbt, const int64_t *rows, const int32_t *seqs,
                          const int32_t *ctx_lens, int64_t n_rows, int nh, int nkv, int hd, int block_size,
                          int64_t q_rows, int64_t n_seqs, int64_t table_width, int64_t num_blocks);
#endif
