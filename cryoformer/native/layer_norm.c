/* The point query's normalisation, (LayerNorm(q + c) * t), and its backward, one pass over the rows each.

   In torch it is an add, the norm, a scale, and in the backward the norm's backward, two products and
   a sum over (P, C) tensors: at train box 64 some ten passes over 5.5 MB a step. Statistics in fp32,
   the biased variance, as torch's LayerNorm. */

#include <math.h>
#include <stdint.h>

#include "threads.h"

/* y = ((q + c - mean) * rstd * gamma + beta) * t per row of C; mean and rstd kept (P) */
void scaled_norm_fwd(const float *q, const float *c, long P, long C, const float *gamma, const float *beta,
                     float t, float eps, float *y, float *mean, float *rstd) {
    CF_PARALLEL
    for (long p = 0; p < P; p++) {
        const float *qr = q + p * C, *cr = c + p * C;
        float s = 0.0f;
        for (long k = 0; k < C; k++) s += qr[k] + cr[k];
        float m = s / (float)C, v = 0.0f;
        for (long k = 0; k < C; k++) { float d = qr[k] + cr[k] - m; v += d * d; }
        float r = 1.0f / sqrtf(v / (float)C + eps);
        float *yr = y + p * C;
        for (long k = 0; k < C; k++) yr[k] = ((qr[k] + cr[k] - m) * r * gamma[k] + beta[k]) * t;
        mean[p] = m;
        rstd[p] = r;
    }
}

/* dx (P, C) = the gradient of y's inputs q + c; dgamma, dbeta (C) and dt (1) accumulated */
void scaled_norm_bwd(const float *q, const float *c, const float *mean, const float *rstd, long P, long C,
                     const float *gamma, const float *beta, float t, const float *dy, float *dx, float *dgamma,
                     float *dbeta, float *dt) {
    float dts = 0.0f;
    _Pragma("omp parallel for num_threads(cf_threads) schedule(static) reduction(+:dgamma[:C], dbeta[:C], dts)")
    for (long p = 0; p < P; p++) {
        const float *qr = q + p * C, *cr = c + p * C, *dyr = dy + p * C;
        float m = mean[p], r = rstd[p], s1 = 0.0f, s2 = 0.0f;
        for (long k = 0; k < C; k++) {
            float xh = (qr[k] + cr[k] - m) * r;
            float g = dyr[k] * t;
            dgamma[k] += g * xh;
            dbeta[k] += g;
            dts += dyr[k] * (xh * gamma[k] + beta[k]);
            float dxh = g * gamma[k];
            s1 += dxh;
            s2 += dxh * xh;
        }
        s1 /= (float)C;
        s2 /= (float)C;
        float *dxr = dx + p * C;
        for (long k = 0; k < C; k++) {
            float xh = (qr[k] + cr[k] - m) * r;
            dxr[k] = r * (dyr[k] * t * gamma[k] - s1 - xh * s2);
        }
    }
    dt[0] += dts;
}
