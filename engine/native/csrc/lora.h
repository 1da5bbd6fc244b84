/* LoRA adapters inside a fused decoder layer (layer.c): after each linear, the rows of a step
 * that use an adapter get its low-rank term, y[i] += scale[i] * (x[i] @ A^T) @ B^T, computed
 * row by row in a fixed order (a row's bits never depend on the other rows of its batch). */
#ifndef LUMEN_LORA_H
#define LUMEN_LORA_H
#include <stdint.h>

#define LUMEN_LORA_TARGETS 7   /* attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down */
#define LUMEN_LORA_MAX_RANK 4096

/* One adapted projection: at = A [r, k], bt = B^T [r, n] (the adapter's scale folded in), both
 * float32 row-major; its output is columns [col, col + n) of its linear's output.
 * at == NULL: the adapter leaves this projection alone. */
struct lumen_lora_target {
    const float *at, *bt;
    int64_t r, col, n;
};

/* One adapter's targets in one layer. */
struct lumen_lora_layer {
    struct lumen_lora_target t[LUMEN_LORA_TARGETS];
};

/* A step's adapters: row i uses adapters[rows[i]] (or none when rows[i] is -1) at scales[i];
 * each adapter points at its layers ([layers] entries); `layer` is the layer computed now. */
struct lumen_lora_step {
    const int32_t *rows;
    const float *scales;
    const struct lumen_lora_layer *const *adapters;
    int32_t n_adapters, layers, layer;
};

/* LUMEN_OK, or LUMEN_E_INDEX / LUMEN_E_SHAPE (qmatmul.h) when a row names no adapter of the step,
 * the layer is out of range, or a target's rank or columns do not fit (`widths`: the output
 * width of the q/k/v, o, gate/up and down linears). Checked before any write. */
int lumen_lora_check(const struct lumen_lora_step *lora, int64_t rows, const int64_t widths[4]);

/* Targets [t0, t1) of the current layer over x [rows, k] (row stride ldx) into y (row stride ldy).
 * LUMEN_OK, or LUMEN_E_NOMEM (the step is then lost: the caller fails it). */
int lumen_lora_apply(const struct lumen_lora_step *lora, int t0, int t1, const float *x, int64_t ldx, int64_t rows,
                      int64_t k, float *y, int64_t ldy, int nthreads);
#endif
