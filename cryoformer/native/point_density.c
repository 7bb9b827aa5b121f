/* The elementwise passes of the point-density head, each one loop over a cache-sized piece of points.

   The head's matrix products run in torch (MKL / oneDNN); what is left between them (softmax, its
   recomputation and backward, the ReLU, the dot with the density weights and their gradients) is a
   dozen memory-bound torch operations per piece when written in torch. Here each is one pass that
   reads its inputs once and writes its output once, in fp32 arithmetic, with the products' operands
   and results in fp32 (suffix _f32) or bf16 (suffix _bf16, round to nearest even).

   Layouts (p points of the piece, B images, N tokens, C channels):
     logits  (p, B, N)   one GEMM of the piece's shared queries against all images' keys
     a, da   (B, p, N)   per-image blocks for the batched products with the values
     o, dh   (B, p, C)
     dl      (p, B, N)   the layout of the logits, for the shared queries' and keys' GEMMs
   Per-image blocks of a, da, o, dh are ``bstride`` elements apart, so the pieces may live in a larger
   (B, P, ...) buffer. lse, g and dens are (B, P) with row stride P, already offset to the piece. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "threads.h"

int cf_threads = 1;

void set_threads(int n) { cf_threads = n > 0 ? n : 1; }

typedef uint16_t bf16;

static inline float bf2f(bf16 x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

static inline float ld_f32(const float *p, long i) { return p[i]; }
static inline float ld_bf16(const bf16 *p, long i) { return bf2f(p[i]); }
static inline void st_f32(float *p, long i, float v) { p[i] = v; }
static inline void st_bf16(bf16 *p, long i, float v) { p[i] = f2bf(v); }

/* exp(x) for x <= 0 (arguments of a softmax after its maximum is taken off): 2^k 2^f with a degree-6
   polynomial for 2^f on [0, 1), relative error about 2e-7; written without branches or calls, so the
   loops around it vectorise. */
static inline float exp_nonpos(float x) {
    x = x < -87.0f ? -87.0f : x;
    float t = x * 1.4426950408889634f;
    float k = floorf(t);
    float f = t - k;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    int32_t bits;
    memcpy(&bits, &p, 4);
    bits += (int32_t)k << 23;
    memcpy(&p, &bits, 4);
    return p;
}

#define KERNELS(T, LD, ST, SUFFIX)                                                                      \
/* a = softmax(logits) per (point, image) row; its maximum and 1 / sum of exponentials are kept (no   \
   logarithm per row) for the backward's recomputation */                                              \
void softmax_fwd_##SUFFIX(const T *restrict logits, T *restrict a, long bstride, float *restrict mx,   \
                          float *restrict rs, long P,                                                  \
                          long p, long B, long N) {                                                    \
    float e[1024];                                                                                     \
    for (long i = 0; i < p; i++)                                                                       \
        for (long b = 0; b < B; b++) {                                                                 \
            const T *row = logits + (i * B + b) * N;                                                   \
            float m = LD(row, 0), s = 0.0f;                                                             \
            for (long n = 1; n < N; n++) { float v = LD(row, n); m = v > m ? v : m; }                 \
            for (long n = 0; n < N; n++) { e[n] = exp_nonpos(LD(row, n) - m); s += e[n]; }             \
            float r = 1.0f / s;                                                                        \
            T *out = a + b * bstride + i * N;                                                          \
            for (long n = 0; n < N; n++) ST(out, n, e[n] * r);                                         \
            mx[b * P + i] = m;                                                                         \
            rs[b * P + i] = r;                                                                         \
        }                                                                                              \
}                                                                                                      \
/* a = exp(logits - max) / sum: the softmax again from its saved maximum and sum (backward) */        \
void softmax_again_##SUFFIX(const T *restrict logits, const float *restrict mx,                        \
                            const float *restrict rs, long P, T *restrict a, long bstride,             \
                            long p, long B, long N) {                                                  \
    CF_PARALLEL                                                                                        \
    for (long i = 0; i < p; i++)                                                                       \
        for (long b = 0; b < B; b++) {                                                                 \
            const T *row = logits + (i * B + b) * N;                                                   \
            float m = mx[b * P + i], r = rs[b * P + i];                                                \
            T *out = a + b * bstride + i * N;                                                          \
            for (long n = 0; n < N; n++) ST(out, n, exp_nonpos(LD(row, n) - m) * r);                   \
        }                                                                                              \
}                                                                                                      \
/* dens = w2 . ReLU(o + u) + b2, u (p, C) shared by the images */                                      \
void density_fwd_##SUFFIX(const T *restrict o, long bstride, const float *restrict u,                  \
                          const float *restrict w2, float b2, float *restrict dens, long P, long p,    \
                          long B, long C) {                                                            \
    CF_PARALLEL                                                                                        \
    for (long i = 0; i < p; i++)                                                                       \
        for (long b = 0; b < B; b++) {                                                                 \
            const T *row = o + b * bstride + i * C;                                                    \
            const float *ur = u + i * C;                                                               \
            float s = 0.0f;                                                                            \
            for (long c = 0; c < C; c++) { float h = LD(row, c) + ur[c]; s += (h > 0.0f ? h : 0.0f) * w2[c]; } \
            dens[b * P + i] = s + b2;                                                                  \
        }                                                                                              \
}                                                                                                      \
/* dh = [o + u > 0] g w2; dw += ReLU(o + u) g; du += dh summed over the images */                     \
void density_bwd_##SUFFIX(const T *restrict o, long bstride, const float *restrict u,                  \
                          const float *restrict w2, const float *restrict g, long P, T *restrict dh,   \
                          float *restrict dw, float *restrict du, long p, long B, long C) {            \
    _Pragma("omp parallel for num_threads(cf_threads) schedule(static) reduction(+:dw[:C])")           \
    for (long i = 0; i < p; i++)                                                                       \
        for (long b = 0; b < B; b++) {                                                                 \
            const T *row = o + b * bstride + i * C;                                                    \
            T *drow = dh + b * bstride + i * C;                                                        \
            const float *ur = u + i * C;                                                               \
            float *dur = du + i * C;                                                                   \
            float gi = g[b * P + i];                                                                   \
            for (long c = 0; c < C; c++) {                                                             \
                float h = LD(row, c) + ur[c];                                                          \
                float on = h > 0.0f ? 1.0f : 0.0f;                                                     \
                float d = on * gi * w2[c];                                                             \
                dw[c] += on * h * gi;                                                                  \
                dur[c] += d;                                                                           \
                ST(drow, c, d);                                                                        \
            }                                                                                          \
        }                                                                                              \
}                                                                                                      \
/* dl = a (da - sum(da a)): the softmax's backward, written in the logits' (p, B, N) layout */        \
void softmax_bwd_##SUFFIX(const T *restrict a, const T *restrict da, long bstride, T *restrict dl,     \
                          long p, long B, long N) {                                                    \
    CF_PARALLEL                                                                                        \
    for (long i = 0; i < p; i++)                                                                       \
        for (long b = 0; b < B; b++) {                                                                 \
            const T *ar = a + b * bstride + i * N;                                                     \
            const T *dr = da + b * bstride + i * N;                                                    \
            float s = 0.0f;                                                                            \
            for (long n = 0; n < N; n++) s += LD(ar, n) * LD(dr, n);                                   \
            T *out = dl + (i * B + b) * N;                                                             \
            for (long n = 0; n < N; n++) ST(out, n, LD(ar, n) * (LD(dr, n) - s));                      \
        }                                                                                              \
}

KERNELS(float, ld_f32, st_f32, f32)
KERNELS(bf16, ld_bf16, st_bf16, bf16)
