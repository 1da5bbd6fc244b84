/* One whole Llama decoder layer on CPU in one call, for layers whose matmuls all have C kernels:
 * the same kernels, in the same order, as lumen/engine/model/llama.py's glued forward (so the same bits),
 * without a Python round trip between them. */
#ifndef LUMEN_LAYER_H
#define LUMEN_LAYER_H
#include <stdint.h>

#include "lora.h"

/* A linear as up to 3 GGUF matrices stacked by rows (q/k/v, gate/up), over the same input. */
struct lumen_linear {
    int32_t parts;
    int32_t qtype[3];
    const uint8_t *w[3];
    int64_t row_bytes[3], n[3];
    int32_t int8;                            /* 1: the int8 matmul mode (lumen_qmatmul_int8) */
};

/* What does not change between steps: a layer's weights and its KV cache ([slots, nkv, hd] float32). */
struct lumen_layer {
    const float *attn_norm, *ffn_norm;
    struct lumen_linear qkv, wo, gate_up, down;
    float *k_cache, *v_cache;
};

/* One step: shapes, the step's rows and scratch buffers (float32, rows contiguous). */
struct lumen_step {
    int64_t rows, dim, ffn;
    int32_t nq, nkv, hd, rope_dim, block_size, nthreads;
    float eps, scale;
    float *x, *h;                            /* residual stream and normed input, [rows, dim] */
    float *qkv, *attn, *out, *gate_up, *act; /* [rows, (nq + 2 nkv) hd], [rows, nq hd], [rows, dim], [rows, 2 ffn], [rows, ffn] */
    const int64_t *positions, *slots;
    const float *cos, *sin;
    const int32_t *block_tables;
    int64_t ldbt;
    const int64_t *attn_rows;
    const int32_t *attn_seqs, *attn_ctx;
    /* Bounds every index is checked against before the first write: rows of the cos/sin
     * tables, blocks of the KV cache, and the block tables' shape. */
    int64_t rope_positions, num_blocks, n_seqs, table_width;
    const struct lumen_lora_step *lora;      /* the rows' LoRA adapters (lora.h); NULL: none this step */
};

/* y[:, cols of part p] = x @ W_p^T for each stacked part in the int8 mode (q8matmul.c): x's rows
 * quantized once for all the parts. Returns LUMEN_OK or an error (qmatmul.h). */
int lumen_linear_int8(const struct lumen_linear *l, const float *x, int64_t rows, int64_t k, float *y, int64_t ldy,
                      int nthreads);

/* x += attention(h); h = norm(x); x += mlp(h); h = next_norm(x). Returns 0, -1 for a type the
 * matmul cannot decode, -2 when out of memory. */
/* Returns LUMEN_OK, or an error (qmatmul.h) found by the checks that run before any write:
 * a weight whose rows do not hold their k values, an index out of range, no memory. */
int lumen_layer_forward(const struct lumen_layer *layer, const struct lumen_step *step, const float *next_norm);
#endif
