/* Lumen's CPU kernels for GGUF weights kept in their file layout: the C interface.
 * Type ids are GGML's (GGMLQuantizationType). */
#ifndef LUMEN_QMATMUL_H
#define LUMEN_QMATMUL_H
#include <stdint.h>

enum {
    LUMEN_F32 = 0, LUMEN_F16 = 1, LUMEN_Q4_0 = 2, LUMEN_Q4_1 = 3, LUMEN_Q5_0 = 6, LUMEN_Q5_1 = 7,
    LUMEN_Q8_0 = 8, LUMEN_Q2_K = 10, LUMEN_Q3_K = 11, LUMEN_Q4_K = 12, LUMEN_Q5_K = 13, LUMEN_Q6_K = 14,
    LUMEN_BF16 = 30,
    /* Not GGML types: Q4_0 and Q4_1 weights rearranged by lumen_interleave, 8 rows interleaved (the
     * int8 mode only): the GGML type's id plus 1000. */
    LUMEN_Q4_0_X8 = 1002, LUMEN_Q4_1_X8 = 1003,
};

/* What every entry point returns. Each checks what it is given (types, row lengths, indices)
 * before it touches memory, and returns one of these instead of reading out of bounds. */
enum {
    LUMEN_OK = 0,
    LUMEN_E_TYPE = -1,    /* a type this library cannot decode */
    LUMEN_E_NOMEM = -2,   /* a buffer could not be allocated */
    LUMEN_E_SHAPE = -3,   /* a row's bytes do not hold k values of its type, or a size is negative */
    LUMEN_E_INDEX = -4,   /* a position, slot, block id, sequence or row index out of range */
};

/* The digest of the sources and flags this library was compiled from (build.py's build_id). */
const char *lumen_build_id(void);

/* The vector instruction set this build's kernels use: "AVX-512", "AVX2" or "none"
 * (aarch64 has no hand-written NEON paths yet: "none"). */
const char *lumen_vector_isa(void);

/* Values per block and bytes per block of qtype; LUMEN_E_TYPE when this library cannot decode it. */
int lumen_block_layout(int qtype, int *block_size, int *type_size);

/* LUMEN_OK when a row of row_bytes bytes holds exactly k values of qtype (k > 0), else an error. */
int lumen_check_rows(int qtype, int64_t row_bytes, int64_t k);

/* Decode one row of k values (row_bytes bytes of qtype blocks) into out[k]. */
int lumen_decode_row(int qtype, const uint8_t *row, int64_t row_bytes, int64_t k, float *out);

/* y[m * ldy + n] = sum_k x[m * ldx + k] * W[n][k] for m < M, n < N, where W's row n is the
 * GGUF blocks at w + n * row_bytes. Each output's float operations do not depend on M, N or
 * the thread count, so a row's result is the same alone or in any batch. Returns LUMEN_OK or
 * an error (unknown type, rows that do not hold K values, no memory). */
int lumen_qmatmul(int qtype, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K,
                  const float *x, int64_t M, int64_t ldx, float *y, int64_t ldy, int nthreads);

/* The matmul modes: exact (lumen_qmatmul) and int8 (lumen_qmatmul_int8). */
enum { LUMEN_MATMUL_EXACT = 0, LUMEN_MATMUL_INT8 = 1 };

/* 1 when lumen_qmatmul_int8 has integer kernels for qtype (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K,
 * and the _X8 types). */
int lumen_int8_type(int qtype);

/* lumen_check_rows for lumen_qmatmul_int8's types: an _X8 type's rows hold what its GGML type's do. */
int lumen_int8_check_rows(int qtype, int64_t row_bytes, int64_t k);

/* Rearranges a Q4_0 or Q4_1 weight (qtype: its GGML type; N rows of row_bytes bytes, k values
 * each) in place, from the file's layout into its _X8 type's (to_x8 1) or back (to_x8 0): each 8
 * rows' groups interleaved, so that the int8 kernels compute 8 outputs a vector register
 * (q8matmul.c); the last N mod 8 rows stay as they are. Both directions restore every byte. Only
 * lumen_qmatmul_int8 and the int8 mode of a layer read the _X8 types; every other entry point
 * refuses them as unknown types. */
int lumen_interleave(int qtype, uint8_t *w, int64_t N, int64_t row_bytes, int64_t k, int to_x8);

/* lumen_qmatmul's product with 8-bit activations (q8matmul.c says exactly what it computes): x's
 * rows are quantized in groups of 32 values and multiplied by the weights' quants as integers.
 * The same bits in every build, and a row's result does not depend on its batch. Types without
 * integer kernels (lumen_int8_type 0) are computed as lumen_qmatmul computes them. */
int lumen_qmatmul_int8(int qtype, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K,
                       const float *x, int64_t M, int64_t ldx, float *y, int64_t ldy, int nthreads);
#endif
