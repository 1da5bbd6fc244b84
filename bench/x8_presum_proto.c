/* A design experiment for issue 15's next step, not part of Lumen: the int8 mode's interleaved
 * Q4_0 kernel (x8_row in engine/native/csrc/q8matmul.c, 8 weight rows a register, without its
 * additive terms) as it is, with a float fma per 4 values (8-value activation scales), against a
 * form that adds two maddubs results in 16 bits (at most 4 * 15 * 127), multiplies them by an
 * integer multiplier per 8 values (madd) and does one float fma per 32-value group. It measures
 * the speed of that arithmetic, on random data; first each kernel's 8 outputs for one row are
 * checked against a float64 sum of the same terms (each form's own definition). Built since as the
 * int8 mode's group form of Q4_0 and Q4_1 (q8matmul.c); its "current" kernel here is slower than
 * Lumen's own, so its ratios overstate the gain (BENCHMARKS.md, "The group form").
 *
 *     gcc -O2 -march=x86-64-v3 -mtune=generic -fopenmp -o /tmp/x8_presum bench/x8_presum_proto.c
 *     /tmp/x8_presum 1; /tmp/x8_presum 16; /tmp/x8_presum 128      # activation rows */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <math.h>
#include <omp.h>

enum { XR = 8, TS = 18, GB = XR * TS, G = 32 };

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

/* current: as x8_row (Q4_0), without the additive part */
static inline void cur_row(const uint8_t *ch, const int8_t *x, const float *dx, int64_t groups, float *y) {
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 A[8];
    for (int l = 0; l < 8; l++) A[l] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *grp = ch + g * GB;
        const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)grp));
        __m256 s[4];
        for (int p = 0; p < 4; p++) s[p] = _mm256_mul_ps(a, _mm256_broadcast_ss(dx + g * 4 + p));
        for (int v = 0; v < 4; v++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(grp + 16 + 32 * v));
            int32_t xa, xb;
            memcpy(&xa, x + g * G + 4 * v, 4);
            memcpy(&xb, x + g * G + 16 + 4 * v, 4);
            const __m256i lo = _mm256_and_si256(wv, low), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low);
            const __m256i la = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(xa)), ones);
            const __m256i lb = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_set1_epi32(xb)), ones);
            A[v] = _mm256_fmadd_ps(s[v / 2], _mm256_cvtepi32_ps(la), A[v]);
            A[4 + v] = _mm256_fmadd_ps(s[2 + v / 2], _mm256_cvtepi32_ps(lb), A[4 + v]);
        }
    }
    __m256 t = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(A[0], A[4]), _mm256_add_ps(A[2], A[6])),
                             _mm256_add_ps(_mm256_add_ps(A[1], A[5]), _mm256_add_ps(A[3], A[7])));
    _mm256_storeu_ps(y, t);
}

/* pre-sum: r[g*4+p] int16 per 8 values, dxg[g] float per group */
static inline void new_row(const uint8_t *ch, const int8_t *x, const int16_t *r, const float *dxg, int64_t groups, float *y) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256 A[8];
    for (int l = 0; l < 8; l++) A[l] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *grp = ch + g * GB;
        const __m256 a = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)grp)), _mm256_broadcast_ss(dxg + g));
        __m256i p[4];
        for (int h = 0; h < 2; h++) {           /* values 8h .. 8h + 7 (lo) and 16 + 8h .. (hi) */
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(grp + 16 + 32 * (2 * h)));
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(grp + 16 + 32 * (2 * h + 1)));
            int32_t xa0, xa1, xb0, xb1;
            memcpy(&xa0, x + g * G + 8 * h, 4); memcpy(&xa1, x + g * G + 8 * h + 4, 4);
            memcpy(&xb0, x + g * G + 16 + 8 * h, 4); memcpy(&xb1, x + g * G + 16 + 8 * h + 4, 4);
            p[h] = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(w0, low), _mm256_set1_epi32(xa0)),
                                    _mm256_maddubs_epi16(_mm256_and_si256(w1, low), _mm256_set1_epi32(xa1)));
            p[2 + h] = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w0, 4), low), _mm256_set1_epi32(xb0)),
                                        _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w1, 4), low), _mm256_set1_epi32(xb1)));
        }
        const int16_t *rg = r + g * 4;
        const __m256i I = _mm256_add_epi32(
            _mm256_add_epi32(_mm256_madd_epi16(p[0], _mm256_set1_epi16(rg[0])), _mm256_madd_epi16(p[1], _mm256_set1_epi16(rg[1]))),
            _mm256_add_epi32(_mm256_madd_epi16(p[2], _mm256_set1_epi16(rg[2])), _mm256_madd_epi16(p[3], _mm256_set1_epi16(rg[3]))));
        A[g & 7] = _mm256_fmadd_ps(a, _mm256_cvtepi32_ps(I), A[g & 7]);
    }
    __m256 t = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(A[0], A[4]), _mm256_add_ps(A[2], A[6])),
                             _mm256_add_ps(_mm256_add_ps(A[1], A[5]), _mm256_add_ps(A[3], A[7])));
    _mm256_storeu_ps(y, t);
}

int main(int argc, char **argv) {
    const int64_t N = 5632, K = 2048, groups = K / G;
    const int M = argc > 1 ? atoi(argv[1]) : 128;
    const int copies = 16;                      /* 16 copies of 5.8 MB: streams from memory at 1 row */
    const size_t wbytes = (size_t)N * groups * TS;
    uint8_t *w = malloc(wbytes * copies);
    for (size_t i = 0; i < wbytes * copies; i++) w[i] = (uint8_t)rand();
    for (size_t c = 0; c < (size_t)copies * N / XR * groups; c++) {   /* fp16 d = 0.01 */
        uint16_t *d = (uint16_t *)(w + c * GB);
        for (int j = 0; j < 8; j++) d[j] = 0x211F;
    }
    int8_t *x = malloc(M * K); float *dx = malloc(M * K / 8 * 4), *dxg = malloc(M * groups * 4);
    int16_t *r = malloc(M * K / 8 * 2);
    for (int64_t i = 0; i < M * K; i++) x[i] = (int8_t)(rand() % 255 - 127);
    for (int64_t i = 0; i < M * K / 8; i++) { dx[i] = 0.01f; r[i] = 1 + rand() % 128; }
    for (int64_t i = 0; i < M * groups; i++) dxg[i] = 0.0001f;
    float *y = malloc(sizeof(float) * M * N);
    {   /* each form against float64 over its own terms: row 0, weight rows 0-7 */
        float y0[8], y1[8];
        cur_row(w, x, dx, groups, y0);
        new_row(w, x, r, dxg, groups, y1);
        for (int j = 0; j < 8; j++) {
            double ref0 = 0, ref1 = 0, mag0 = 0, mag1 = 0;
            for (int64_t g = 0; g < groups; g++) {
                const uint8_t *grp = w + g * GB;
                const double a = _cvtsh_ss(((const uint16_t *)grp)[j]);
                for (int q8 = 0; q8 < G; q8++) {
                    const int v = (q8 % 16) / 4, b = q8 % 4;
                    const uint8_t byte = grp[16 + 32 * v + 4 * j + b];
                    const int q = q8 < 16 ? byte & 15 : byte >> 4;
                    const double t0 = a * dx[g * 4 + q8 / 8] * q * x[g * G + q8];
                    const double t1 = a * dxg[g] * q * r[g * 4 + q8 / 8] * x[g * G + q8];
                    ref0 += t0, mag0 += fabs(t0), ref1 += t1, mag1 += fabs(t1);
                }
            }
            if (fabs(y0[j] - ref0) > 1e-5 * mag0 || fabs(y1[j] - ref1) > 1e-5 * mag1) {
                printf("output %d: current %g (float64 %g), pre-sum %g (float64 %g)\n", j, y0[j], ref0, y1[j], ref1);
                return 1;
            }
        }
    }
    double best[2] = {1e9, 1e9};
    for (int round = 0; round < 7; round++)
        for (int kind = 0; kind < 2; kind++) {
            double t0 = now();
            for (int c = 0; c < copies; c++) {
                const uint8_t *wc = w + c * wbytes;
#pragma omp parallel for num_threads(2) schedule(static)
                for (int64_t n = 0; n < N; n += XR)
                    for (int m = 0; m < M; m++) {
                        const uint8_t *ch = wc + n / XR * groups * GB;
                        if (kind == 0) cur_row(ch, x + m * K, dx + m * K / 8, groups, y + m * N + n);
                        else new_row(ch, x + m * K, r + m * K / 8, dxg + m * groups, groups, y + m * N + n);
                    }
            }
            double t = (now() - t0) / copies;
            if (t < best[kind]) best[kind] = t;
        }
    printf("M=%d: current %.3f ms, pre-sum %.3f ms, ratio %.2fx\n", M, 1e3 * best[0], 1e3 * best[1], best[0] / best[1]);
    return 0;
}
