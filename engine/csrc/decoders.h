/* Decoding GGUF blocks to float32, one function per block layout (ggml-common.h).
 *
 * Each decoder follows ggml's dequantize_row_* float order step for step, and the library is
 * compiled with -ffp-contract=off, so values are bit-identical to ggml's and to engine.quant's
 * torch units (tests/engine/test_native.py checks it). Layouts are read as byte offsets from
 * the block start: no packed structs, no alignment assumptions. Included by qmatmul.c only,
 * so that every decoder can be inlined into the matmul loop made for its type.
 */
#ifndef LUMEN_DECODERS_H
#define LUMEN_DECODERS_H
#include <stdint.h>
#include <string.h>

#include "qmatmul.h"

#define DECODER static inline __attribute__((always_inline)) void

static inline float fp16_to_fp32(const uint8_t *p) {
    _Float16 h;
    memcpy(&h, p, 2);
    return (float)h;                         /* exact widening, as GGML_FP16_TO_FP32 */
}

static inline float bf16_to_fp32(const uint8_t *p) {
    uint32_t bits = (uint32_t)p[0] << 16 | (uint32_t)p[1] << 24;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint32_t u32le(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Q4_0: d fp16 | qs[16]; value j = d * ((qs[j % 16] >> 4 * (j / 16)) & 15) - 8 */
DECODER dec_q4_0(const uint8_t *b, float *y) {
    const float d = fp16_to_fp32(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < 16; j++) {
        y[j] = (float)((qs[j] & 0x0F) - 8) * d;
        y[j + 16] = (float)((qs[j] >> 4) - 8) * d;
    }
}

/* Q4_1: d fp16 | m fp16 | qs[16]; value = d * q + m */
DECODER dec_q4_1(const uint8_t *b, float *y) {
    const float d = fp16_to_fp32(b), m = fp16_to_fp32(b + 2);
    const uint8_t *qs = b + 4;
    for (int j = 0; j < 16; j++) {
        y[j] = (float)(qs[j] & 0x0F) * d + m;
        y[j + 16] = (float)(qs[j] >> 4) * d + m;
    }
}

/* Q5_0: d fp16 | qh u32 (bit j = value j's bit 4) | qs[16]; value = d * (q - 16) */
DECODER dec_q5_0(const uint8_t *b, float *y) {
    const float d = fp16_to_fp32(b);
    const uint32_t qh = u32le(b + 2);
    const uint8_t *qs = b + 6;
    for (int j = 0; j < 16; j++) {
        const int x0 = (int)((qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10)) - 16;
        const int x1 = (int)((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10)) - 16;
        y[j] = (float)x0 * d;
        y[j + 16] = (float)x1 * d;
    }
}

/* Q5_1: d fp16 | m fp16 | qh u32 | qs[16]; value = d * q + m */
DECODER dec_q5_1(const uint8_t *b, float *y) {
    const float d = fp16_to_fp32(b), m = fp16_to_fp32(b + 2);
    const uint32_t qh = u32le(b + 4);
    const uint8_t *qs = b + 8;
    for (int j = 0; j < 16; j++) {
        const int x0 = (int)((qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10));
        const int x1 = (int)((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10));
        y[j] = (float)x0 * d + m;
        y[j + 16] = (float)x1 * d + m;
    }
}

/* Q8_0: d fp16 | qs[32] int8; value = d * q */
DECODER dec_q8_0(const uint8_t *b, float *y) {
    const float d = fp16_to_fp32(b);
    const int8_t *qs = (const int8_t *)(b + 2);
    for (int j = 0; j < 32; j++) y[j] = (float)qs[j] * d;
}

/* Q2_K: scales[16] (4-bit scale | 4-bit min) | qs[64] (2-bit) | d fp16 | dmin fp16 */
DECODER dec_q2_k(const uint8_t *b, float *y) {
    const uint8_t *scales = b, *q = b + 16;
    const float d = fp16_to_fp32(b + 80), dmin = fp16_to_fp32(b + 82);
    int is = 0;
    for (int n = 0; n < 256; n += 128) {
        for (int shift = 0; shift < 8; shift += 2) {
            for (int half = 0; half < 2; half++) {
                const uint8_t sc = scales[is++];
                const float dl = d * (float)(sc & 0x0F), ml = dmin * (float)(sc >> 4);
                for (int l = 0; l < 16; l++) *y++ = dl * (float)((q[l + 16 * half] >> shift) & 3) - ml;
            }
        }
        q += 32;
    }
}

/* Q3_K: hmask[32] | qs[64] (low 2 bits) | scales[12] (16 six-bit scales) | d fp16 */
DECODER dec_q3_k(const uint8_t *b, float *y) {
    const uint8_t *hm = b, *q = b + 32;
    const float d_all = fp16_to_fp32(b + 108);
    const uint32_t kmask1 = 0x03030303, kmask2 = 0x0f0f0f0f;
    uint32_t aux[4];
    memcpy(aux, b + 96, 12);
    const uint32_t tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
    aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
    aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4);
    aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
    const int8_t *scales = (const int8_t *)aux;
    int is = 0;
    uint8_t m = 1;
    for (int n = 0; n < 256; n += 128) {
        for (int shift = 0; shift < 8; shift += 2) {
            for (int half = 0; half < 2; half++) {
                const float dl = d_all * (float)(scales[is++] - 32);
                for (int l = 0; l < 16; l++) {
                    const int v = ((q[l + 16 * half] >> shift) & 3) - ((hm[l + 16 * half] & m) ? 0 : 4);
                    *y++ = dl * (float)v;
                }
            }
            m <<= 1;
        }
        q += 32;
    }
}

/* get_scale_min_k4: the j-th six-bit scale and min of Q4_K / Q5_K's 12 packed bytes */
static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *mn) {
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* Q4_K: d fp16 | dmin fp16 | scales[12] | qs[128]; value = d * sc * q - dmin * m */
DECODER dec_q4_k(const uint8_t *b, float *y) {
    const float d = fp16_to_fp32(b), dmin = fp16_to_fp32(b + 2);
    const uint8_t *scales = b + 4, *q = b + 16;
    for (int is = 0; is < 8; is += 2) {
        uint8_t sc, mn;
        scale_min_k4(is, scales, &sc, &mn);
        const float d1 = d * (float)sc, m1 = dmin * (float)mn;
        scale_min_k4(is + 1, scales, &sc, &mn);
        const float d2 = d * (float)sc, m2 = dmin * (float)mn;
        for (int l = 0; l < 32; l++) *y++ = d1 * (float)(q[l] & 0x0F) - m1;
        for (int l = 0; l < 32; l++) *y++ = d2 * (float)(q[l] >> 4) - m2;
        q += 32;
    }
}

/* Q5_K: d fp16 | dmin fp16 | scales[12] | qh[32] | qs[128] */
DECODER dec_q5_k(const uint8_t *b, float *y) {
    const float d = fp16_to_fp32(b), dmin = fp16_to_fp32(b + 2);
    const uint8_t *scales = b + 4, *qh = b + 16, *ql = b + 48;
    uint8_t u1 = 1, u2 = 2;
    for (int is = 0; is < 8; is += 2) {
        uint8_t sc, mn;
        scale_min_k4(is, scales, &sc, &mn);
        const float d1 = d * (float)sc, m1 = dmin * (float)mn;
        scale_min_k4(is + 1, scales, &sc, &mn);
        const float d2 = d * (float)sc, m2 = dmin * (float)mn;
        for (int l = 0; l < 32; l++) *y++ = d1 * (float)((ql[l] & 0x0F) + ((qh[l] & u1) ? 16 : 0)) - m1;
        for (int l = 0; l < 32; l++) *y++ = d2 * (float)((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
        ql += 32;
        u1 <<= 2;
        u2 <<= 2;
    }
}

/* Q6_K: ql[128] (low 4 bits) | qh[64] (high 2 bits) | scales[16] int8 | d fp16.
 * ggml computes d * sc * q left to right; the scale products are hoisted, same values. */
DECODER dec_q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = fp16_to_fp32(b + 208);
    for (int n = 0; n < 256; n += 128) {
        for (int h = 0; h < 2; h++) {          /* l in [16h, 16h + 16) uses scales sc[h + 2i] */
            const float s1 = d * (float)sc[h], s2 = d * (float)sc[h + 2];
            const float s3 = d * (float)sc[h + 4], s4 = d * (float)sc[h + 6];
            for (int l = 16 * h; l < 16 * h + 16; l++) {
                const int q1 = (int)((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = (int)((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = s1 * (float)q1;
                y[l + 32] = s2 * (float)q2;
                y[l + 64] = s3 * (float)q3;
                y[l + 96] = s4 * (float)q4;
            }
        }
        y += 128;
        ql += 64;
        qh += 32;
        sc += 8;
    }
}

DECODER dec_f32(const uint8_t *b, float *y) { memcpy(y, b, 32 * sizeof(float)); }

DECODER dec_f16(const uint8_t *b, float *y) {
    for (int j = 0; j < 32; j++) y[j] = fp16_to_fp32(b + 2 * j);
}

DECODER dec_bf16(const uint8_t *b, float *y) {
    for (int j = 0; j < 32; j++) y[j] = bf16_to_fp32(b + 2 * j);
}

#endif
