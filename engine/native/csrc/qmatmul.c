/* x @ W^T for W kept as GGUF blocks, on CPU, with the block decoders of decoders.h.
 *
 * Two loop orders, one arithmetic. Small batches (M <= MR, decode steps) decode one block of
 * NR weight rows into an L1 buffer and consume it at once with MR x NR register accumulators,
 * so the weight bytes stream from memory once with no float copy of them. Larger batches
 * decode a tile of rows over all of K once into a per-thread buffer, then run a micro-kernel
 * over every group of MR activation rows (AVX-512: 6), so decoding is paid once per tile.
 * With AVX-512 (F, BW, VL), batches of up to WIDE_MAX_M rows (Q4_1: 8) of the quantized types that
 * decoders.h has register decoders for skip the L1 buffer: 16 weights at a time go straight to a
 * register.
 * AVX2 builds do the same for 1-4 rows of Q8_0, Q4_0 and Q4_1 (AVX2_STREAM below).
 * Whatever the path, output (m, n) is the same sequence of fused multiply-adds: lane l of a
 * 16-lane accumulator sums k = l, l + 16, ... in order, then the lanes are added in a fixed
 * tree. So a row's result does not depend on the batch it is in, the tile it falls in or
 * the thread count, which keeps batched and solo generations identical.
 *
 * The whole file is compiled with -ffp-contract=off (the decoders are bit-exact with ggml
 * only unfused); the multiply-adds are explicit fma, which rounds once on every target.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "decoders.h"
#include "qmatmul.h"
#include "simd.h"

enum { MR = 4, NR = 4, MAX_BLOCK = 256 };

typedef void (*block_decoder)(const uint8_t *, float *);

/* Load a vector once into a register for all the fmas that use it. Without this GCC folds
 * the load into each fma as a memory operand (the 8 x 3 register kernel loaded each
 * activation 3 times: 24 loads for 24 fmas), and a CPU issues fewer loads than fmas a cycle
 * (BENCHMARKS.md, "C matmul kernels, fourth session"). Same instructions otherwise, same bits. */
#ifdef __AVX512F__
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define IN_REGISTER(v) (void)0
#endif

/* acc[i][j] += x row i . w row j over k in [0, len) (len a multiple of 16). */
#define ACCUMULATE_V16(acc, x, ldx, w, ldw, len, mr, nr)                               \
    for (int64_t k_ = 0; k_ < (len); k_ += 16) {                                      \
        v16 wv_[NR], xv_[MR];                                                          \
        for (int j_ = 0; j_ < (nr); j_++) { wv_[j_] = load((w) + j_ * (ldw) + k_); IN_REGISTER(wv_[j_]); } \
        for (int i_ = 0; i_ < (mr); i_++) { xv_[i_] = load((x) + i_ * (ldx) + k_); IN_REGISTER(xv_[i_]); } \
        for (int i_ = 0; i_ < (mr); i_++)                                              \
            for (int j_ = 0; j_ < (nr); j_++) acc[i_][j_] = vfma(xv_[i_], wv_[j_], acc[i_][j_]); \
    }

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
/* AVX2 has 16 ymm registers, and MR x NR v16 accumulators (two ymm each) would take 32: GCC
 * spilled them, and batches of 2-64 rows ran about 10x slower than AVX-512 builds. Each lane of
 * a v16 accumulator is a chain of its own (lane l sums k = l, l + 16, ... in order), so the
 * chains run in passes of at most 8 ymm accumulators (one row: 4 outputs, both halves; more
 * rows: one 8-lane half at a time), staying in acc between passes: each lane gets the same
 * operations in the same order, so the same bits as ACCUMULATE_V16. (One row in the v16 form,
 * through GCC's generic 64-byte vectors, ran at half the speed of two rows.) */
static inline __attribute__((always_inline)) void accumulate_halves(
        v16 (*acc)[NR], const float *x, int64_t ldx, const float *w, int64_t ldw, int64_t len,
        const int mr, const int nr) {
    const int cols = mr <= 2 ? NR : 2, hh = mr == 1 ? 2 : 1;   /* outputs x halves per pass: at most 8 */
    for (int j0 = 0; j0 < nr; j0 += cols) {
        const int nc = nr - j0 < cols ? nr - j0 : cols;
        for (int h0 = 0; h0 < 2; h0 += hh) {
            __m256 a[MR][NR][2];
            for (int i = 0; i < mr; i++)
                for (int j = 0; j < nc; j++)
                    for (int t = 0; t < hh; t++) a[i][j][t] = ((v16_halves *)&acc[i][j0 + j])->h[h0 + t];
            for (int64_t k = 0; k < len; k += 16)
                for (int t = 0; t < hh; t++) {
                    const int64_t at = k + 8 * (h0 + t);
                    __m256 wv[NR];
                    for (int j = 0; j < nc; j++) wv[j] = _mm256_loadu_ps(w + (j0 + j) * ldw + at);
                    for (int i = 0; i < mr; i++) {
                        const __m256 xv = _mm256_loadu_ps(x + i * ldx + at);
                        for (int j = 0; j < nc; j++) a[i][j][t] = _mm256_fmadd_ps(xv, wv[j], a[i][j][t]);
                    }
                }
            for (int i = 0; i < mr; i++)
                for (int j = 0; j < nc; j++)
                    for (int t = 0; t < hh; t++) ((v16_halves *)&acc[i][j0 + j])->h[h0 + t] = a[i][j][t];
        }
    }
}
#define ACCUMULATE(acc, x, ldx, w, ldw, len, mr, nr) accumulate_halves(acc, x, ldx, w, ldw, len, mr, nr)
/* The passes of a large batch's tile over K_CHUNK values at a time, so that the rows they
 * read stay in L1 between the two halves. */
enum { K_CHUNK = 512 };
#else
#define ACCUMULATE ACCUMULATE_V16
enum { K_CHUNK = 1 << 30 };
#endif

/* Small batches: mr x nr outputs, decoding block by block into L1 as it goes. */
static inline __attribute__((always_inline)) void stream_block(
        block_decoder dec, const int bs, const int ts, const uint8_t *w, int64_t row_bytes, int64_t K,
        const float *x, int64_t ldx, float *y, int64_t ldy, const int mr, const int nr) {
    v16 acc[MR][NR];
    float wb[NR][MAX_BLOCK] __attribute__((aligned(64)));
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) acc[i][j] = (v16){0};
    const int per = MAX_BLOCK / bs;             /* blocks decoded per chunk: 256 values a row */
    const int64_t nb = K / bs;
    int64_t b = 0;
    for (; b + per <= nb; b += per) {
        for (int j = 0; j < nr; j++) {
#if !defined(__AVX512F__) && defined(__AVX2__)
            /* Into L2 ahead of use, from the same place in the next group of rows, as the register
             * paths do: without it the AVX2 build streamed Q6_K at 2.6 GB/s a thread pair. */
            for (int o = 0; o < per * ts; o += 64)
                _mm_prefetch((const char *)(w + j * row_bytes + b * ts + nr * row_bytes + o), _MM_HINT_T1);
#endif
            for (int c = 0; c < per; c++) dec(w + j * row_bytes + (b + c) * ts, wb[j] + c * bs);
        }
        ACCUMULATE(acc, x + b * bs, ldx, &wb[0][0], MAX_BLOCK, MAX_BLOCK, mr, nr);
    }
    for (; b < nb; b++) {                       /* a row length that is not a multiple of 256 */
        for (int j = 0; j < nr; j++) dec(w + j * row_bytes + b * ts, wb[j]);
        ACCUMULATE(acc, x + b * bs, ldx, &wb[0][0], MAX_BLOCK, bs, mr, nr);
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) y[i * ldy + j] = hsum(acc[i][j]);
}

/* Large batches: mr x nr outputs from rows already decoded over all of K, mr up to TILE_MR. In
 * AVX-512 builds TILE_MR is 6 (24 of the 32 zmm as accumulators, each activation vector loaded
 * once for its NR fmas): 1.04-1.11x 4 rows at 64-256 rows (BENCHMARKS.md, "AVX-512 builds: the
 * tile path decodes with the register decoders"); the same fmas per output in the same order
 * as ACCUMULATE's, so the same bits. */
#ifdef __AVX512F__
enum { TILE_MR = 6 };
static inline __attribute__((always_inline)) void decoded_block(
        const float *w, int64_t K, const float *x, int64_t ldx, float *y, int64_t ldy, const int mr, const int nr) {
    __m512 acc[TILE_MR][NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        __m512 wv[NR];
        for (int j = 0; j < nr; j++) { wv[j] = _mm512_loadu_ps(w + j * K + k); IN_REGISTER(wv[j]); }
        for (int i = 0; i < mr; i++) {
            __m512 xv = _mm512_loadu_ps(x + i * ldx + k);
            IN_REGISTER(xv);
            for (int j = 0; j < nr; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) y[i * ldy + j] = hsum((v16)acc[i][j]);
}
/* SIZES (below) for mr up to 6. */
#define TILE_SIZES(call, kernel, mr, nr)                                                       \
    switch ((mr) * 8 + (nr)) {                                                                 \
        case 6 * 8 + NR: call(kernel, 6, NR); break; case 5 * 8 + NR: call(kernel, 5, NR); break; \
        case 4 * 8 + NR: call(kernel, 4, NR); break; case 3 * 8 + NR: call(kernel, 3, NR); break; \
        case 2 * 8 + NR: call(kernel, 2, NR); break; case 1 * 8 + NR: call(kernel, 1, NR); break; \
        case 6 * 8 + 1: call(kernel, 6, 1); break; case 5 * 8 + 1: call(kernel, 5, 1); break;    \
        case 4 * 8 + 1: call(kernel, 4, 1); break; case 3 * 8 + 1: call(kernel, 3, 1); break;    \
        case 2 * 8 + 1: call(kernel, 2, 1); break; default: call(kernel, 1, 1); break;           \
    }
#else
enum { TILE_MR = MR };
static inline __attribute__((always_inline)) void decoded_block(
        const float *w, int64_t K, const float *x, int64_t ldx, float *y, int64_t ldy, const int mr, const int nr) {
    v16 acc[MR][NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) acc[i][j] = (v16){0};
    for (int64_t k0 = 0; k0 < K; k0 += K_CHUNK)
        ACCUMULATE(acc, x + k0, ldx, w + k0, K, K - k0 < K_CHUNK ? K - k0 : K_CHUNK, mr, nr);
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) y[i * ldy + j] = hsum(acc[i][j]);
}
#define TILE_SIZES SIZES
#endif

static inline __attribute__((always_inline)) void decode_row(
        block_decoder dec, const int bs, const int ts, const uint8_t *row, int64_t K, float *out) {
    for (int64_t b = 0; b < K / bs; b++) dec(row + b * ts, out + b * bs);
}

/* Dispatch a runtime (mr, nr) to call(kernel, MR, NR) with constant sizes; nr is NR or 1. */
#define SIZES(call, kernel, mr, nr)                                                    \
    switch ((mr) * 8 + (nr)) {                                                         \
        case 4 * 8 + NR: call(kernel, 4, NR); break;                                   \
        case 3 * 8 + NR: call(kernel, 3, NR); break;                                   \
        case 2 * 8 + NR: call(kernel, 2, NR); break;                                   \
        case 1 * 8 + NR: call(kernel, 1, NR); break;                                   \
        case 4 * 8 + 1: call(kernel, 4, 1); break;                                     \
        case 3 * 8 + 1: call(kernel, 3, 1); break;                                     \
        case 2 * 8 + 1: call(kernel, 2, 1); break;                                     \
        default: call(kernel, 1, 1); break;                                            \
    }

#ifdef REGISTER_DECODERS
/* Register-decoding variants of stream_block: each block's 16-value groups are decoded
 * straight into registers by decoders.h's register decoders and consumed at once, with the
 * same fma order per output as every other path. Each cache line of a block is prefetched
 * into L2 from the same place in the next group of rows (ANR rows further), which streamed
 * faster than a fixed distance ahead (BENCHMARKS.md, "Figures from code comments"). */
#define REGISTER_STREAM(name, T, AMR, ANR, PREPARE)                                            \
static inline __attribute__((always_inline)) void name(                                          \
        const uint8_t *w, int64_t row_bytes, int64_t K, const float *x, int64_t ldx, float *y,    \
        int64_t ldy, const int mr, const int nr) {                                               \
    __m512 acc[AMR][ANR];                                                                        \
    for (int i = 0; i < mr; i++)                                                                 \
        for (int j = 0; j < nr; j++) acc[i][j] = _mm512_setzero_ps();                            \
    for (int64_t b = 0; b < K / T##_BS; b++) {                                                   \
        T##_prep p[ANR];                                                                         \
        for (int j = 0; j < nr; j++) {                                                           \
            const uint8_t *blk = w + j * row_bytes + b * T##_TS;                                 \
            for (int o = 0; o < T##_TS; o += 64)                                                 \
                _mm_prefetch((const char *)blk + ANR * row_bytes + o, _MM_HINT_T1);                   \
            PREPARE(blk, &p[j]);                                                                 \
        }                                                                                        \
        _Pragma("GCC unroll 16")                                                                 \
        for (int g = 0; g < T##_BS / 16; g++) {                                                  \
            __m512 wv[ANR];                                                                      \
            for (int j = 0; j < nr; j++) wv[j] = T##_group(w + j * row_bytes + b * T##_TS, &p[j], g); \
            for (int i = 0; i < mr; i++) {          /* one activation register at a time */     \
                __m512 xv = _mm512_loadu_ps(x + i * ldx + b * T##_BS + 16 * g);                  \
                IN_REGISTER(xv);                                                                 \
                for (int j = 0; j < nr; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);  \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
    for (int i = 0; i < mr; i++)                                                                 \
        for (int j = 0; j < nr; j++) y[i * ldy + j] = hsum((v16)acc[i][j]);                      \
}
/* Batches of 5-20 rows: up to 8 activation rows x 3 weight rows of accumulators, re-decoding
 * the weights once per slice of the batch (cheaper than the tile path's float round trip
 * through L2). Slices are even (9 rows: 5 + 4), and 3 weight rows per pass (5 rows is a k = 4
 * speculative verify). Up to 20 rows this path beat the tile path and beyond it lost, as
 * measured with bench/kernel_ab.py (BENCHMARKS.md, "Figures from code comments"). */
enum { WMR = 8, WNR = 3, WIDE_MAX_M = 20 };
/* Q4_1's wide path won up to 8 rows only (1.31x the tile path at 8, even at 10-16, 0.86x at 20:
 * BENCHMARKS.md, "AVX-512 builds: Q4_1 in registers"). */
static inline int64_t wide_max_m(int qtype) { return qtype == LUMEN_Q4_1 ? 8 : WIDE_MAX_M; }
#endif

/* One matmul call: what every thread's share of the work needs. */
struct job {
    const uint8_t *w;
    int64_t row_bytes, N, K, M, ldx, ldy;
    const float *x;
    float *y;
};

#if !defined(REGISTER_DECODERS) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define AVX2_DECODERS 1
/* AVX2 builds (no AVX-512): small batches of Q8_0, Q4_0 and Q4_1 decode 16 weights at a time into
 * two ymm halves and consume them at once, as the AVX-512 register paths do, computing each
 * value as the block decoder does (same operations, same order), so the same bits. At most 4
 * outputs (8 of the 16 ymm registers as accumulators): 1 x 4 for one activation row, 2 x 2 for
 * two, 4 x 1 for three or four. (Through 16-lane generic vectors this ran up to 1.5x slower.) */
static inline __attribute__((always_inline)) void from_int32(__m256i lo, __m256i hi, __m256 d, __m256 out[2]) {
    out[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(lo), d);
    out[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(hi), d);
}

/* Q8_0 group g: int8 values 16g .. 16g + 15, times d, as two 8-lane halves. */
static inline __attribute__((always_inline)) void q8_0_avx2(const uint8_t *b, __m256 d, __m256 m, int g, __m256 out[2]) {
    (void)m;
    const __m128i q = _mm_loadu_si128((const __m128i *)(b + 2 + 16 * g));
    from_int32(_mm256_cvtepi8_epi32(q), _mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)), d, out);
}

/* The 16 nibbles of a Q4 block's 16 bytes: low ones for group 0, high ones for group 1. */
static inline __attribute__((always_inline)) __m128i nibbles(const uint8_t *qs, int g) {
    const __m128i q = _mm_loadu_si128((const __m128i *)qs);
    return _mm_and_si128(g == 0 ? q : _mm_srli_epi16(q, 4), _mm_set1_epi8(15));
}

static inline __attribute__((always_inline)) void q4_0_avx2(const uint8_t *b, __m256 d, __m256 m, int g, __m256 out[2]) {
    (void)m;
    const __m128i q = _mm_sub_epi8(nibbles(b + 2, g), _mm_set1_epi8(8));
    from_int32(_mm256_cvtepi8_epi32(q), _mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)), d, out);
}

static inline __attribute__((always_inline)) void q4_1_avx2(const uint8_t *b, __m256 d, __m256 m, int g, __m256 out[2]) {
    const __m128i q = nibbles(b + 4, g);
    from_int32(_mm256_cvtepu8_epi32(q), _mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)), d, out);
    out[0] = _mm256_add_ps(out[0], m);      /* (float)q * d + m: two roundings, as the decoder */
    out[1] = _mm256_add_ps(out[1], m);
}

#define AVX2_CALL(T, MRC, NRC) \
    T##_stream_avx2(wn, jb->row_bytes, jb->K, jb->x, jb->ldx, jb->y + n, jb->ldy, MRC, NRC)
/* Accumulators as ymm pairs (lanes 0-7 and 8-15 of the v16 they stand for), each weight row's
 * group decoded and consumed at once: at most 8 accumulators, 2 decoded and 2 per activation row. */
#define AVX2_STREAM(T, HAS_MIN)                                                                  \
static inline __attribute__((always_inline)) void T##_stream_avx2(                               \
        const uint8_t *w, int64_t row_bytes, int64_t K, const float *x, int64_t ldx, float *y,    \
        int64_t ldy, const int mr, const int nr) {                                               \
    __m256 acc[4][4][2];                                                                         \
    for (int i = 0; i < mr; i++)                                                                 \
        for (int j = 0; j < nr; j++) acc[i][j][0] = acc[i][j][1] = _mm256_setzero_ps();          \
    for (int64_t b = 0; b < K / 32; b++) {                                                       \
        float dj[4], mj[4];                 /* each row's block scales, once for both groups */   \
        for (int j = 0; j < nr; j++) {                                                           \
            const uint8_t *blk = w + j * row_bytes + b * T##_TS;                                 \
            _mm_prefetch((const char *)blk + nr * row_bytes, _MM_HINT_T1);                       \
            dj[j] = fp16_to_fp32(blk);                                                           \
            mj[j] = HAS_MIN ? fp16_to_fp32(blk + 2) : dj[j];                                     \
        }                                                                                        \
        for (int g = 0; g < 2; g++) {                                                            \
            __m256 xv[4][2];                                                                     \
            for (int i = 0; i < mr; i++) {                                                       \
                xv[i][0] = _mm256_loadu_ps(x + i * ldx + b * 32 + 16 * g);                       \
                xv[i][1] = _mm256_loadu_ps(x + i * ldx + b * 32 + 16 * g + 8);                   \
            }                                                                                    \
            for (int j = 0; j < nr; j++) {                                                       \
                __m256 wv[2];                                                                    \
                T##_avx2(w + j * row_bytes + b * T##_TS, _mm256_set1_ps(dj[j]), _mm256_set1_ps(mj[j]), g, wv); \
                for (int i = 0; i < mr; i++) {                                                   \
                    acc[i][j][0] = _mm256_fmadd_ps(xv[i][0], wv[0], acc[i][j][0]);               \
                    acc[i][j][1] = _mm256_fmadd_ps(xv[i][1], wv[1], acc[i][j][1]);               \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
    for (int i = 0; i < mr; i++)                                                                 \
        for (int j = 0; j < nr; j++) {                                                           \
            v16_halves r;                                                                        \
            r.h[0] = acc[i][j][0];                                                               \
            r.h[1] = acc[i][j][1];                                                               \
            y[i * ldy + j] = hsum(r.v);                                                          \
        }                                                                                        \
}                                                                                                \
static int T##_range_avx2(const struct job *jb, int64_t lo, int64_t hi) {                        \
    const int mr = (int)jb->M, full = mr == 1 ? 4 : mr == 2 ? 2 : 1;                             \
    for (int64_t n = lo; n < hi;) {                                                              \
        const int nr = hi - n >= full ? full : 1;                                                \
        const uint8_t *wn = jb->w + n * jb->row_bytes;                                           \
        switch (mr * 8 + nr) {                                                                   \
            case 1 * 8 + 4: AVX2_CALL(T, 1, 4); break;                                           \
            case 2 * 8 + 2: AVX2_CALL(T, 2, 2); break;                                           \
            case 2 * 8 + 1: AVX2_CALL(T, 2, 1); break;                                           \
            case 3 * 8 + 1: AVX2_CALL(T, 3, 1); break;                                           \
            case 4 * 8 + 1: AVX2_CALL(T, 4, 1); break;                                           \
            default: AVX2_CALL(T, 1, 1); break;                                                  \
        }                                                                                        \
        n += nr;                                                                                 \
    }                                                                                            \
    return 0;                                                                                    \
}
enum { q8_0_TS = 34, q4_0_TS = 18, q4_1_TS = 20 };
AVX2_STREAM(q8_0, 0)
AVX2_STREAM(q4_0, 0)
AVX2_STREAM(q4_1, 1)
#define AVX2_TYPES(X) X(LUMEN_Q8_0, q8_0) X(LUMEN_Q4_0, q4_0) X(LUMEN_Q4_1, q4_1)
#endif

/* Small batches: output rows [lo, hi) (multiples of NR, but for the last), all M <= MR rows. */
static inline __attribute__((always_inline)) int stream_range(
        block_decoder dec, const int bs, const int ts, const struct job *jb, int64_t lo, int64_t hi) {
    const int mr = (int)jb->M;
    for (int64_t n = lo; n < hi;) {
        const int nr = hi - n >= NR ? NR : 1;
#define STREAM(kernel, MRC, NRC) kernel(dec, bs, ts, jb->w + n * jb->row_bytes, jb->row_bytes, jb->K, jb->x, \
                                           jb->ldx, jb->y + n, jb->ldy, MRC, NRC)
        SIZES(STREAM, stream_block, mr, nr)
#undef STREAM
        n += nr;
    }
    return 0;
}

enum { TILE = 64 };   /* rows decoded at once for large batches */

/* Decodes one weight row of K values: decode_row with the type's block decoder, or in AVX-512
 * builds the type's register decoders (regs_row_T below: the same values). */
typedef void (*row_decoder)(const uint8_t *row, int64_t K, float *out);

/* Large batches: tiles [lo, hi) of TILE output rows each, all M rows. */
static inline __attribute__((always_inline)) int tile_range(
        row_decoder decode, const struct job *jb, int64_t lo, int64_t hi) {
    const int64_t K = jb->K, M = jb->M;
    float *wbuf = aligned_alloc(64, (size_t)(TILE * K * sizeof(float) + 63) / 64 * 64);
    if (wbuf == NULL) return -2;
    for (int64_t t = lo; t < hi; t++) {
        const int64_t n0 = t * TILE, rows = jb->N - n0 < TILE ? jb->N - n0 : TILE;
        for (int64_t r = 0; r < rows; r++) decode(jb->w + (n0 + r) * jb->row_bytes, K, wbuf + r * K);
#define DECODED(kernel, MRC, NRC) kernel(wbuf + j * K, K, jb->x + m0 * jb->ldx, jb->ldx, \
                                                jb->y + m0 * jb->ldy + n0 + j, jb->ldy, MRC, NRC)
        for (int64_t m0 = 0; m0 < M; m0 += TILE_MR) {
            const int mr = M - m0 < TILE_MR ? (int)(M - m0) : TILE_MR;
            for (int64_t j = 0; j < rows;) {
                const int nr = rows - j >= NR ? NR : 1;
                TILE_SIZES(DECODED, decoded_block, mr, nr)
                j += nr;
            }
        }
#undef DECODED
    }
    free(wbuf);
    return 0;
}

typedef int (*range_fn)(const struct job *, int64_t, int64_t);

/* Split [0, units) into one contiguous share per thread, each share a multiple of `align`.
 * The decoder is a constant inside each range_fn, so it is inlined there; OpenMP's outlined
 * region only ever makes this one indirect call per thread. */
static int run_parallel(range_fn fn, const struct job *jb, int64_t units, int64_t align, int nthreads) {
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
        const int64_t chunks = (units + align - 1) / align;
        const int64_t lo = chunks * id / nt * align, hi = chunks * (id + 1) / nt * align;
        if (lo < units && fn(jb, lo, hi < units ? hi : units) != 0) {
#pragma omp atomic write
            failed = 1;
        }
    }
    return failed ? -2 : 0;
}

#define TYPES(X)                                                                        \
    X(LUMEN_F32, dec_f32, 32, 128) X(LUMEN_F16, dec_f16, 32, 64) X(LUMEN_BF16, dec_bf16, 32, 64) \
    X(LUMEN_Q4_0, dec_q4_0, 32, 18) X(LUMEN_Q4_1, dec_q4_1, 32, 20) X(LUMEN_Q5_0, dec_q5_0, 32, 22) \
    X(LUMEN_Q5_1, dec_q5_1, 32, 24) X(LUMEN_Q8_0, dec_q8_0, 32, 34) X(LUMEN_Q2_K, dec_q2_k, 256, 84) \
    X(LUMEN_Q3_K, dec_q3_k, 256, 110) X(LUMEN_Q4_K, dec_q4_k, 256, 144) X(LUMEN_Q5_K, dec_q5_k, 256, 176) \
    X(LUMEN_Q6_K, dec_q6_k, 256, 210)

#ifndef LUMEN_BUILD_ID
#define LUMEN_BUILD_ID "unversioned"
#endif
const char *lumen_build_id(void) { return LUMEN_BUILD_ID; }

const char *lumen_vector_isa(void) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    return "AVX-512";
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    return "AVX2";
#else
    return "none";
#endif
}

int lumen_block_layout(int qtype, int *block_size, int *type_size) {
#define LAYOUT(id, fn, bs, ts) if (qtype == id) { *block_size = bs; *type_size = ts; return LUMEN_OK; }
    TYPES(LAYOUT)
#undef LAYOUT
    return LUMEN_E_TYPE;
}

int lumen_check_rows(int qtype, int64_t row_bytes, int64_t k) {
    int bs, ts;
    if (lumen_block_layout(qtype, &bs, &ts) != LUMEN_OK) return LUMEN_E_TYPE;
    if (k <= 0 || k % bs != 0 || row_bytes != k / bs * ts) return LUMEN_E_SHAPE;
    return LUMEN_OK;
}

int lumen_decode_row(int qtype, const uint8_t *row, int64_t row_bytes, int64_t k, float *out) {
    const int rc = lumen_check_rows(qtype, row_bytes, k);
    if (rc != LUMEN_OK) return rc;
#define DECODE(id, fn, bs, ts) if (qtype == id) { decode_row(fn, bs, ts, row, k, out); return LUMEN_OK; }
    TYPES(DECODE)
#undef DECODE
    return LUMEN_E_TYPE;
}

#ifdef REGISTER_DECODERS
#define WIDE_SIZES(call, kernel, mr, nr)                                                        \
    switch ((mr) * 4 + (nr)) {                                                                   \
        case 8 * 4 + 2: call(kernel, 8, 2); break; case 7 * 4 + 2: call(kernel, 7, 2); break;    \
        case 6 * 4 + 2: call(kernel, 6, 2); break; case 5 * 4 + 2: call(kernel, 5, 2); break;    \
        case 4 * 4 + 2: call(kernel, 4, 2); break; case 3 * 4 + 2: call(kernel, 3, 2); break;    \
        case 2 * 4 + 2: call(kernel, 2, 2); break; case 1 * 4 + 2: call(kernel, 1, 2); break;    \
        case 8 * 4 + 1: call(kernel, 8, 1); break; case 7 * 4 + 1: call(kernel, 7, 1); break;    \
        case 6 * 4 + 1: call(kernel, 6, 1); break; case 5 * 4 + 1: call(kernel, 5, 1); break;    \
        case 4 * 4 + 1: call(kernel, 4, 1); break; case 3 * 4 + 1: call(kernel, 3, 1); break;    \
        case 2 * 4 + 1: call(kernel, 2, 1); break; default: call(kernel, 1, 1); break;           \
        case 8 * 4 + 3: call(kernel, 8, 3); break; case 7 * 4 + 3: call(kernel, 7, 3); break;    \
        case 6 * 4 + 3: call(kernel, 6, 3); break; case 5 * 4 + 3: call(kernel, 5, 3); break;    \
        case 4 * 4 + 3: call(kernel, 4, 3); break; case 3 * 4 + 3: call(kernel, 3, 3); break;    \
        case 2 * 4 + 3: call(kernel, 2, 3); break; case 1 * 4 + 3: call(kernel, 1, 3); break;    \
    }
#define REGISTER_CALL(kernel, MRC, NRC) kernel(jb->w + n * jb->row_bytes, jb->row_bytes, jb->K,  \
        jb->x + m0 * jb->ldx, jb->ldx, jb->y + m0 * jb->ldy + n, jb->ldy, MRC, NRC)

/* For a type T with register decoders: M <= MR streams MR x NR outputs at a time (every row of
 * the batch), M <= WIDE_MAX_M streams WMR x WNR (the batch in slices of WMR rows), and larger
 * batches take the tile path with the register decoders' values, 16 at a time, as its row
 * decoder (regs_row_T): the block decoders, scalar loops that GCC vectorizes only in part, left
 * Q6_K's tile path up to 1.35x slower (BENCHMARKS.md, "AVX-512 builds: the tile path decodes
 * with the register decoders"). */
#define REGISTER_PATHS(T)                                                                       \
REGISTER_STREAM(stream_regs_##T, T, MR, NR, STREAM_PREPARE_##T)                                \
REGISTER_STREAM(wide_regs_##T, T, WMR, WNR, T##_prepare)                                        \
static int stream_regs_range_##T(const struct job *jb, int64_t lo, int64_t hi) {                 \
    const int mr = (int)jb->M;                                                                   \
    const int64_t m0 = 0;                                                                        \
    for (int64_t n = lo; n < hi;) {                                                              \
        const int nr = hi - n >= NR ? NR : 1;                                                    \
        SIZES(REGISTER_CALL, stream_regs_##T, mr, nr)                                            \
        n += nr;                                                                                 \
    }                                                                                            \
    return 0;                                                                                    \
}                                                                                                \
static int wide_regs_range_##T(const struct job *jb, int64_t lo, int64_t hi) {                   \
    const int64_t slices = (jb->M + WMR - 1) / WMR;     /* even slices: 9 rows are 5 + 4, not 8 + 1 */ \
    for (int64_t n = lo; n < hi;) {                                                              \
        const int nr = hi - n >= WNR ? WNR : 1;                                                  \
        for (int64_t s = 0; s < slices; s++) {                                                   \
            const int64_t m0 = jb->M * s / slices;                                               \
            const int mr = (int)(jb->M * (s + 1) / slices - m0);                                 \
            WIDE_SIZES(REGISTER_CALL, wide_regs_##T, mr, nr)                                     \
        }                                                                                        \
        n += nr;                                                                                 \
    }                                                                                            \
    return 0;                                                                                    \
}                                                                                                \
static void regs_row_##T(const uint8_t *row, int64_t K, float *out) {                            \
    for (int64_t b = 0; b < K / T##_BS; b++) {                                                   \
        const uint8_t *blk = row + b * T##_TS;                                                   \
        T##_prep p;                                                                              \
        T##_prepare(blk, &p);                                                                    \
        _Pragma("GCC unroll 16")                                                                 \
        for (int g = 0; g < T##_BS / 16; g++) _mm512_storeu_ps(out + b * T##_BS + 16 * g, T##_group(blk, &p, g)); \
    }                                                                                            \
}                                                                                                \
static int tile_regs_range_##T(const struct job *jb, int64_t lo, int64_t hi) {                   \
    return tile_range(regs_row_##T, jb, lo, hi);                                                 \
}
#define REGISTER_TYPES(X) X(LUMEN_Q8_0, q8_0) X(LUMEN_Q4_0, q4_0) X(LUMEN_Q4_1, q4_1) X(LUMEN_Q2_K, q2_k) \
    X(LUMEN_Q3_K, q3_k) X(LUMEN_Q4_K, q4_k) X(LUMEN_Q5_K, q5_k) X(LUMEN_Q6_K, q6_k) X(LUMEN_F16, f16) X(LUMEN_BF16, bf16)
/* What 1-4 rows prepare a block with: the wide path's T_prepare, but for Q4_1 (decoders.h). */
#define STREAM_PREPARE_q8_0 q8_0_prepare
#define STREAM_PREPARE_q4_0 q4_0_prepare
#define STREAM_PREPARE_q4_1 q4_1_prepare_stream
#define STREAM_PREPARE_q2_k q2_k_prepare
#define STREAM_PREPARE_q3_k q3_k_prepare
#define STREAM_PREPARE_q4_k q4_k_prepare
#define STREAM_PREPARE_q5_k q5_k_prepare
#define STREAM_PREPARE_q6_k q6_k_prepare
#define STREAM_PREPARE_f16 f16_prepare
#define STREAM_PREPARE_bf16 bf16_prepare
#define PATHS(id, T) REGISTER_PATHS(T)
REGISTER_TYPES(PATHS)
#undef PATHS
#endif

#define RANGES(id, fn, bs, ts)                                                                         \
    static int stream_##fn(const struct job *jb, int64_t lo, int64_t hi) { return stream_range(fn, bs, ts, jb, lo, hi); } \
    static void row_##fn(const uint8_t *row, int64_t K, float *out) { decode_row(fn, bs, ts, row, K, out); } \
    static int tile_##fn(const struct job *jb, int64_t lo, int64_t hi) { return tile_range(row_##fn, jb, lo, hi); }
TYPES(RANGES)
#undef RANGES

int lumen_qmatmul(int qtype, const uint8_t *w, int64_t row_bytes, int64_t N, int64_t K,
                  const float *x, int64_t M, int64_t ldx, float *y, int64_t ldy, int nthreads) {
    const int rc = lumen_check_rows(qtype, row_bytes, K);
    if (rc != LUMEN_OK) return rc;
    if (N < 0 || M < 0 || ldx < K || ldy < N) return LUMEN_E_SHAPE;
    const struct job jb = {w, row_bytes, N, K, M, ldx, ldy, x, y};
#ifdef REGISTER_DECODERS
#define REGISTER_MATMUL(id, T)                                                               \
    if (qtype == id && M <= MR) return run_parallel(stream_regs_range_##T, &jb, N, NR, nthreads); \
    if (qtype == id && M <= wide_max_m(qtype)) return run_parallel(wide_regs_range_##T, &jb, N, WNR, nthreads); \
    if (qtype == id) return run_parallel(tile_regs_range_##T, &jb, (N + TILE - 1) / TILE, 1, nthreads);
    REGISTER_TYPES(REGISTER_MATMUL)
#undef REGISTER_MATMUL
#endif
#ifdef AVX2_DECODERS
#define AVX2_MATMUL(id, T) if (qtype == id && M <= MR) return run_parallel(T##_range_avx2, &jb, N, M == 1 ? 4 : 2, nthreads);
    AVX2_TYPES(AVX2_MATMUL)
#undef AVX2_MATMUL
#endif
#define MATMUL(id, fn, bs, ts)                                                               \
    if (qtype == id) {                                                                       \
        if (M <= MR) return run_parallel(stream_##fn, &jb, N, NR, nthreads);                 \
        return run_parallel(tile_##fn, &jb, (N + TILE - 1) / TILE, 1, nthreads);            \
    }
    TYPES(MATMUL)
#undef MATMUL
    return LUMEN_E_TYPE;
}
