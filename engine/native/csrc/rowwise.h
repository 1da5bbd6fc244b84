/* Lumen's row-wise CPU glue between the matmuls of a layer: the C interface.
 * Every function works on `rows` independent rows; a row's result depends only on that row. */
#ifndef LUMEN_GLUE_H
#define LUMEN_GLUE_H
#include <stdint.h>

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w; when dx is not NULL, first x[r] += dx[r] (in place). */
void lumen_add_rms_norm(float *x, int64_t ldx, const float *dx, int64_t lddx, int64_t rows, int64_t dim,
                        const float *w, float eps, float *out, int64_t ldo);

/* In row r of qkv (nq query heads, then nkv key heads, then nkv value heads, hd floats each), rotate
 * the first rope_dim values of every query and key head by position positions[r] (GGUF pair layout,
 * cos/sin tables [context, rope_dim / 2]), then store the row's keys and values (float32) into
 * cache row slots[r] of k_cache / v_cache ([slots, nkv, hd]). */
int lumen_rope_store(float *qkv, int64_t ldqkv, int64_t rows, int nq, int nkv, int hd, int rope_dim,
                     const int64_t *positions, const float *cos, const float *sin,
                     float *k_cache, float *v_cache, const int64_t *slots, int64_t positions_limit,
                     int64_t slots_limit);

/* The same, for a caller that ran lumen_check_positions_slots on these positions and slots. */
void lumen_rope_store_checked(float *qkv, int64_t ldqkv, int64_t rows, int nq, int nkv, int hd, int rope_dim,
                              const int64_t *positions, const float *cos, const float *sin,
                              float *k_cache, float *v_cache, const int64_t *slots);

/* LUMEN_OK when every positions[r] < positions_limit (rows of the cos/sin tables) and every
 * slots[r] < slots_limit (cache rows), none negative; LUMEN_E_INDEX otherwise. */
int lumen_check_positions_slots(const int64_t *positions, const int64_t *slots, int64_t rows,
                                int64_t positions_limit, int64_t slots_limit);

/* out[r][j] = silu(h[r][j]) * h[r][ffn + j]: the gate and up halves of one gate/up matmul. */
void lumen_silu_mul(const float *h, int64_t ldh, int64_t rows, int64_t ffn, float *out, int64_t ldo);
#endif
