/* The kernel library's decoders and matmul checked on another architecture (test_cross_arch.py
 * runs this under qemu-user against a cross-compiled build of csrc/).
 *
 * argv[1] is a file of cases written on the host, each:
 *   int32 qtype; int64 n, k, m, row_bytes;
 *   uint8 weights[n * row_bytes]; float decoded[n * k]; float x[m * k]; float y[m * n]; float y8[m * n]
 * where decoded, y and y8 are what the host's library computed (bit-exact with ggml's decoders,
 * the matmul's fixed fma order, the int8 mode's defined arithmetic). Each case must give the same
 * bits here: every row decoded, the m-row matmul with 2 threads in both modes, and each row of it
 * alone (batch invariance); for Q4_0 and Q4_1 also the int8 mode on the weights interleaved in
 * place (lumen_interleave), whose bytes must come back unchanged.
 * Prints one line per case and exits 0 only when every case matched. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qmatmul.h"

static void *read_exact(FILE *f, size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p || fread(p, 1, bytes, f) != bytes) { fprintf(stderr, "truncated case file\n"); exit(2); }
    return p;
}

static int64_t differing(const float *a, const float *b, int64_t count) {
    int64_t bad = 0;
    for (int64_t i = 0; i < count; i++) bad += memcmp(a + i, b + i, sizeof(float)) != 0;
    return bad;
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s CASES\n", argv[0]); return 2; }
    FILE *f = fopen(argv[1], "rb");
    if (!f) { perror(argv[1]); return 2; }
    printf("vector paths: %s\n", lumen_vector_isa());
    int failed = 0, cases = 0;
    int32_t qtype;
    while (fread(&qtype, sizeof qtype, 1, f) == 1) {
        int64_t dims[4];
        if (fread(dims, sizeof(int64_t), 4, f) != 4) { fprintf(stderr, "truncated case file\n"); return 2; }
        const int64_t n = dims[0], k = dims[1], m = dims[2], row_bytes = dims[3];
        uint8_t *w = read_exact(f, (size_t)(n * row_bytes));
        float *decoded = read_exact(f, sizeof(float) * (size_t)(n * k));
        float *x = read_exact(f, sizeof(float) * (size_t)(m * k));
        float *y = read_exact(f, sizeof(float) * (size_t)(m * n));
        float *y8 = read_exact(f, sizeof(float) * (size_t)(m * n));
        float *ours = calloc((size_t)(n * k), sizeof(float)), *yours = calloc((size_t)(m * n), sizeof(float));
        int rc = 0;
        for (int64_t r = 0; r < n && rc == 0; r++)
            rc = lumen_decode_row(qtype, w + r * row_bytes, row_bytes, k, ours + r * k);
        const int64_t bad_decode = rc ? -1 : differing(ours, decoded, n * k);
        rc = rc ? rc : lumen_qmatmul(qtype, w, row_bytes, n, k, x, m, k, yours, n, 2);
        const int64_t bad_matmul = rc ? -1 : differing(yours, y, m * n);
        int64_t bad_solo = 0;
        for (int64_t i = 0; i < m && rc == 0; i++) {
            rc = lumen_qmatmul(qtype, w, row_bytes, n, k, x + i * k, 1, k, yours + i * n, n, 1);
            bad_solo += rc ? 1 : differing(yours + i * n, y + i * n, n);
        }
        rc = rc ? rc : lumen_qmatmul_int8(qtype, w, row_bytes, n, k, x, m, k, yours, n, 2);
        int64_t bad_int8 = rc ? -1 : differing(yours, y8, m * n);
        for (int64_t i = 0; i < m && rc == 0; i++) {
            rc = lumen_qmatmul_int8(qtype, w, row_bytes, n, k, x + i * k, 1, k, yours + i * n, n, 1);
            bad_int8 += rc ? 1 : differing(yours + i * n, y8 + i * n, n);
        }
        int64_t bad_x8 = 0;              /* Q4_0, Q4_1: the int8 mode's interleaved layout, the same bits */
        if (rc == 0 && (qtype == LUMEN_Q4_0 || qtype == LUMEN_Q4_1)) {
            uint8_t *copy = malloc((size_t)(n * row_bytes));
            memcpy(copy, w, (size_t)(n * row_bytes));
            rc = lumen_interleave(qtype, w, n, row_bytes, k, 1);
            rc = rc ? rc : lumen_qmatmul_int8(qtype + 1000, w, row_bytes, n, k, x, m, k, yours, n, 2);
            bad_x8 = rc ? -1 : differing(yours, y8, m * n);
            rc = rc ? rc : lumen_interleave(qtype, w, n, row_bytes, k, 0);
            bad_x8 += rc == 0 && memcmp(copy, w, (size_t)(n * row_bytes)) != 0;
            free(copy);
        }
        const int ok = rc == 0 && bad_decode == 0 && bad_matmul == 0 && bad_solo == 0 && bad_int8 == 0 && bad_x8 == 0;
        printf("%s type %d n=%lld k=%lld m=%lld: rc %d, decode %lld differ, matmul %lld differ, solo rows %lld differ, "
               "int8 mode %lld differ, interleaved %lld differ\n", ok ? "ok" : "FAIL", qtype, (long long)n, (long long)k,
               (long long)m, rc, (long long)bad_decode, (long long)bad_matmul, (long long)bad_solo, (long long)bad_int8,
               (long long)bad_x8);
        failed += !ok;
        cases++;
        free(w); free(decoded); free(x); free(y); free(y8); free(ours); free(yours);
    }
    printf("%d of %d cases matched the host's bits\n", cases - failed, cases);
    return failed || cases == 0;
}
