/* LoRA terms of a fused layer's rows (lora.h).
 *
 * Rows are taken adapter by adapter, so that each adapter's A and B are read once per step
 * whatever the number of its rows (a GEMM, not a GEMV per row): threads split A's rows (the
 * rank) for the shrink t = x @ A^T, then the output columns for the expand y += t @ B^T.
 * Every output accumulates in one fixed order in every build (no contraction into fma: the
 * x86-64-v3 and -v4 builds give the same bits, checked on SmolLM2) and for any batch: a dot
 * product keeps 64 independent lanes reduced by a fixed tree, and y[c] adds t[j] * B[c, j] for
 * j in order; a row's bits never depend on the other rows of its batch. */
#include "lora.h"

#include <omp.h>
#include <stdlib.h>

#include "qmatmul.h"

/* Which linear each target belongs to: 0 q/k/v, 1 o, 2 gate/up, 3 down. */
static const int GROUP[LUMEN_LORA_TARGETS] = {0, 0, 0, 1, 2, 2, 3};
#define LANES 64

int lumen_lora_check(const struct lumen_lora_step *lora, int64_t rows, const int64_t widths[4]) {
    if (lora->layer < 0 || lora->layer >= lora->layers || lora->n_adapters < 0) return LUMEN_E_INDEX;
    for (int64_t i = 0; i < rows; i++)
        if (lora->rows[i] < -1 || lora->rows[i] >= lora->n_adapters) return LUMEN_E_INDEX;
    for (int a = 0; a < lora->n_adapters; a++) {
        const struct lumen_lora_layer *L = &lora->adapters[a][lora->layer];
        for (int t = 0; t < LUMEN_LORA_TARGETS; t++) {
            const struct lumen_lora_target *T = &L->t[t];
            if (!T->at) continue;
            if (!T->bt || T->r < 1 || T->r > LUMEN_LORA_MAX_RANK || T->col < 0 || T->n < 1
                || T->col + T->n > widths[GROUP[t]])
                return LUMEN_E_SHAPE;
        }
    }
    return LUMEN_OK;
}

/* Dot products of A's row `a` with up to 4 rows of x at once (`a` read once for all of them), each
 * kept in LANES independent partial sums (enough to hide the add latency) and reduced by a fixed
 * tree: out[q] depends on its own row only. */
static void dots(const float *a, const float *const *xs, int nx, int64_t k, float *out) {
    float acc[4][LANES] = {{0}};
    int64_t kk = 0;
    for (; kk + LANES <= k; kk += LANES)
        for (int q = 0; q < nx; q++)
            for (int l = 0; l < LANES; l++) acc[q][l] += a[kk + l] * xs[q][kk + l];
    for (int l = 0; kk + l < k; l++)
        for (int q = 0; q < nx; q++) acc[q][l] += a[kk + l] * xs[q][kk + l];
    for (int q = 0; q < nx; q++) {
        for (int s = LANES / 2; s; s >>= 1)
            for (int l = 0; l < s; l++) acc[q][l] += acc[q][l + s];
        out[q] = acc[q][0];
    }
}

/* One target over the m rows `idx` of one adapter: t [m, r] scratch. */
static void target(const struct lumen_lora_target *T, const int64_t *idx, int64_t m, const float *scales,
                   const float *x, int64_t ldx, int64_t k, float *y, int64_t ldy, float *t, int nthreads) {
    const int64_t r = T->r, n = T->n;
#pragma omp parallel num_threads(nthreads) if (m * r * (k + n) >= 8192)
    {
        const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
        for (int64_t j = r * id / nt; j < r * (id + 1) / nt; j++) {
            const float *a = T->at + j * k;   /* A's row j: at holds A [r, k] row-major */
            for (int64_t i = 0; i < m; i += 4) {
                const int nx = m - i < 4 ? (int)(m - i) : 4;
                const float *xs[4];
                float out[4];
                for (int q = 0; q < nx; q++) xs[q] = x + idx[i + q] * ldx;
                dots(a, xs, nx, k, out);
                for (int q = 0; q < nx; q++) t[(i + q) * r + j] = scales[idx[i + q]] * out[q];
            }
        }
#pragma omp barrier
        /* y[c] += t[j] * B^T[j, c] for j in order, 4 j's per pass over y (one load and store). */
        const int64_t c0 = n * id / nt, c1 = n * (id + 1) / nt;
        for (int64_t i = 0; i < m; i++) {
            const float *ti = t + i * r;
            float *yr = y + idx[i] * ldy + T->col;
            int64_t j = 0;
            for (; j + 4 <= r; j += 4) {
                const float *b0 = T->bt + j * n, *b1 = b0 + n, *b2 = b1 + n, *b3 = b2 + n;
                const float t0 = ti[j], t1 = ti[j + 1], t2 = ti[j + 2], t3 = ti[j + 3];
                for (int64_t c = c0; c < c1; c++) {
                    float v = yr[c];
                    v += t0 * b0[c];
                    v += t1 * b1[c];
                    v += t2 * b2[c];
                    v += t3 * b3[c];
                    yr[c] = v;
                }
            }
            for (; j < r; j++) {
                const float tj = ti[j], *b = T->bt + j * n;
                for (int64_t c = c0; c < c1; c++) yr[c] += tj * b[c];
            }
        }
    }
}

int lumen_lora_apply(const struct lumen_lora_step *lora, int t0, int t1, const float *x, int64_t ldx, int64_t rows,
                     int64_t k, float *y, int64_t ldy, int nthreads) {
    int64_t *idx = malloc((size_t)(rows > 0 ? rows : 1) * sizeof *idx);
    float *t = NULL;
    int64_t t_size = 0;
    int rc = LUMEN_OK;
    if (!idx) return LUMEN_E_NOMEM;
    for (int a = 0; a < lora->n_adapters && rc == LUMEN_OK; a++) {
        int64_t m = 0;
        for (int64_t i = 0; i < rows; i++)
            if (lora->rows[i] == a) idx[m++] = i;
        if (!m) continue;
        const struct lumen_lora_layer *L = &lora->adapters[a][lora->layer];
        for (int ti = t0; ti < t1; ti++) {
            const struct lumen_lora_target *T = &L->t[ti];
            if (!T->at) continue;
            if (m * T->r > t_size) {
                free(t);
                t_size = m * T->r;
                if (!(t = malloc((size_t)t_size * sizeof *t))) { rc = LUMEN_E_NOMEM; break; }
            }
            target(T, idx, m, lora->scales, x, ldx, k, y, ldy, t, nthreads);
        }
    }
    free(t);
    free(idx);
    return rc;
}
