/* A decoder layer in one call (layer.h): matmuls (qmatmul.c), RoPE and KV store, RMSNorm and
 * SiLU gating (rowwise.c), attention (attention.c), chained exactly as lumen/engine/model/llama.py chains them. */
#include "layer.h"

#include "attention.h"
#include "lora.h"
#include "rowwise.h"
#include "qmatmul.h"

/* y[:, cols of part p] = x @ W_p^T for each stacked part. */
static int linear(const struct lumen_linear *l, const float *x, int64_t rows, int64_t k, float *y, int64_t ldy,
                  int nthreads) {
    if (l->int8) return lumen_linear_int8(l, x, rows, k, y, ldy, nthreads);
    int64_t col = 0;
    for (int p = 0; p < l->parts; p++) {
        const int rc = lumen_qmatmul(l->qtype[p], l->w[p], l->row_bytes[p], l->n[p], k, x, rows, k, y + col, ldy,
                                     nthreads);
        if (rc != 0) return rc;
        col += l->n[p];
    }
    return 0;
}

/* Each part's rows hold k values, and the parts together give `width` outputs. */
static int check_linear(const struct lumen_linear *l, int64_t k, int64_t width) {
    int64_t n = 0;
    if (l->parts < 1 || l->parts > 3) return LUMEN_E_SHAPE;
    for (int p = 0; p < l->parts; p++) {
        const int rc = l->int8 ? lumen_int8_check_rows(l->qtype[p], l->row_bytes[p], k)
                               : lumen_check_rows(l->qtype[p], l->row_bytes[p], k);
        if (rc != LUMEN_OK) return rc;
        n += l->n[p];
    }
    return n == width ? LUMEN_OK : LUMEN_E_SHAPE;
}

static int check_layer(const struct lumen_layer *L, const struct lumen_step *S) {
    const int64_t qkv_width = (int64_t)(S->nq + 2 * S->nkv) * S->hd, attn_width = (int64_t)S->nq * S->hd;
    int rc;
    if ((rc = check_linear(&L->qkv, S->dim, qkv_width)) || (rc = check_linear(&L->wo, attn_width, S->dim))
        || (rc = check_linear(&L->gate_up, S->dim, 2 * S->ffn)) || (rc = check_linear(&L->down, S->ffn, S->dim)))
        return rc;
    const int64_t widths[4] = {qkv_width, S->dim, 2 * S->ffn, S->dim};
    if (S->lora && (rc = lumen_lora_check(S->lora, S->rows, widths))) return rc;
    if ((rc = lumen_check_positions_slots(S->positions, S->slots, S->rows, S->rope_positions,
                                          S->num_blocks * S->block_size)))
        return rc;
    return lumen_check_attention(S->block_tables, S->ldbt, S->attn_rows, S->attn_seqs, S->attn_ctx, S->rows,
                                 S->nq, S->nkv, S->hd, S->block_size, S->rows, S->n_seqs, S->table_width,
                                 S->num_blocks);
}

int lumen_layer_forward(const struct lumen_layer *L, const struct lumen_step *S, const float *next_norm) {
    const int64_t rows = S->rows, dim = S->dim, ffn = S->ffn;
    const int64_t ldqkv = (int64_t)(S->nq + 2 * S->nkv) * S->hd, ldattn = (int64_t)S->nq * S->hd;
    int rc;
    if ((rc = check_layer(L, S))) return rc;
    const struct lumen_lora_step *lora = S->lora;
    if ((rc = linear(&L->qkv, S->h, rows, dim, S->qkv, ldqkv, S->nthreads))) return rc;
    if (lora && (rc = lumen_lora_apply(lora, 0, 3, S->h, dim, rows, dim, S->qkv, ldqkv, S->nthreads))) return rc;
    /* check_layer has checked positions, slots and the attention's indices: the unchecked forms. */
    lumen_rope_store_checked(S->qkv, ldqkv, rows, S->nq, S->nkv, S->hd, S->rope_dim, S->positions, S->cos, S->sin,
                             L->k_cache, L->v_cache, S->slots);
    if ((rc = lumen_paged_attention_checked(S->qkv, ldqkv, L->k_cache, L->v_cache, 0, S->block_tables, S->ldbt,
                                            S->attn_rows, S->attn_seqs, S->attn_ctx, rows, S->nq, S->nkv, S->hd,
                                            S->block_size, S->scale, S->attn, ldattn, S->nthreads)))
        return rc;
    if ((rc = linear(&L->wo, S->attn, rows, ldattn, S->out, dim, S->nthreads))) return rc;
    if (lora && (rc = lumen_lora_apply(lora, 3, 4, S->attn, ldattn, rows, ldattn, S->out, dim, S->nthreads))) return rc;
    lumen_add_rms_norm(S->x, dim, S->out, dim, rows, dim, L->ffn_norm, S->eps, S->h, dim);
    if ((rc = linear(&L->gate_up, S->h, rows, dim, S->gate_up, 2 * ffn, S->nthreads))) return rc;
    if (lora && (rc = lumen_lora_apply(lora, 4, 6, S->h, dim, rows, dim, S->gate_up, 2 * ffn, S->nthreads))) return rc;
    lumen_silu_mul(S->gate_up, 2 * ffn, rows, ffn, S->act, ffn);
    if ((rc = linear(&L->down, S->act, rows, ffn, S->out, dim, S->nthreads))) return rc;
    if (lora && (rc = lumen_lora_apply(lora, 6, 7, S->act, ffn, rows, ffn, S->out, dim, S->nthreads))) return rc;
    lumen_add_rms_norm(S->x, dim, S->out, dim, rows, dim, next_norm, S->eps, S->h, dim);
    return 0;
}
