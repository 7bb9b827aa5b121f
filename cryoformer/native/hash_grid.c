/* The multi-resolution hash grid's forward and table gradient, one loop over (level, point).

   In torch each level is some thirty small integer and float kernels over all points (corner cells,
   hashing, weights, a gather, a weighted sum), whose launch and memory traffic cost more than the
   arithmetic: at train box 32 the grid's forward took 10 ms of an 80 ms step. The arithmetic here is
   the torch form's (cryoformer/hashgrid.py, _level_corners), in the same precision and order, so the
   corners and weights are the same numbers; only the order of the final sums may differ by rounding.
   Build with -ffp-contract=off: a fused multiply-add would round the fp32 positions differently. */

#include <math.h>
#include <stdint.h>

#include "threads.h"

static const uint64_t PRIMES[3] = {1u, 2654435761u, 805459861u};
#define MASK32 0xFFFFFFFFull

/* (uint32)(int)floor(pos) as the torch form computes it: saturating to the int32 range */
static inline int64_t cell_of(float fl) {
    if (!(fl == fl) || fl < -2147483648.0f) return INT32_MIN;
    if (fl >= 2147483648.0f) return INT32_MAX;
    return (int64_t)fl;
}

static inline void level_corners(const double *pos3, double scale, int fma, int64_t res, int64_t size,
                                 int hashed, int64_t *idx, float *w) {
    int64_t g[3];
    float frac[3];
    for (int d = 0; d < 3; d++) {
        float pos = fma ? (float)(pos3[d] * scale + 0.5) : (float)pos3[d] * (float)scale + 0.5f;
        float fl = floorf(pos);
        frac[d] = pos - fl;
        g[d] = cell_of(fl);
    }
    int pow2 = (size & (size - 1)) == 0;
    uint64_t mask = pow2 ? (uint64_t)(size - 1) : MASK32;
    for (int c = 0; c < 8; c++) {
        int c0 = c & 1, c1 = (c >> 1) & 1, c2 = (c >> 2) & 1;
        float w0 = c0 ? frac[0] : 1.0f - frac[0];
        float w1 = c1 ? frac[1] : 1.0f - frac[1];
        float w2 = c2 ? frac[2] : 1.0f - frac[2];
        w[c] = (w0 * w1) * w2;
        uint64_t a0 = (uint64_t)(g[0] + c0), a1 = (uint64_t)(g[1] + c1), a2 = (uint64_t)(g[2] + c2);
        uint64_t i;
        if (hashed) {
            i = ((a0 * PRIMES[0]) & mask) ^ ((a1 * PRIMES[1]) & mask) ^ ((a2 * PRIMES[2]) & mask);
            if (!pow2) i %= (uint64_t)size;
        } else {
            uint64_t r = (uint64_t)res;
            i = ((a2 * r * r + a1 * r + a0) & MASK32) % (uint64_t)size;
        }
        idx[c] = (int64_t)i;
    }
}

/* out (P, L*F) = per level, the trilinear mix of the 8 corner rows of the table (entries, F).
   x (P, 3) in [0, 1]^3 as fp64 (exact for fp32 input); level arrays of length L. When crow and cw are
   given ((L, P, 8) each), the corners' table rows and weights are kept there for the backward. */
void hash_grid_fwd(const double *x, long P, const double *scale, const int64_t *res, const int64_t *size,
                   const int64_t *offset, const int64_t *hashed, long L, int fma, const float *table,
                   long F, float *out, int32_t *crow, float *cw) {
    for (long l = 0; l < L; l++) {
        CF_PARALLEL
        for (long p = 0; p < P; p++) {
            int64_t idx[8];
            float w[8];
            level_corners(x + 3 * p, scale[l], fma, res[l], size[l], (int)hashed[l], idx, w);
            float *o = out + p * L * F + l * F;
            for (long f = 0; f < F; f++) {
                float s = 0.0f;
                for (int c = 0; c < 8; c++) s += w[c] * table[(offset[l] + idx[c]) * F + f];
                o[f] = s;
            }
            if (crow) {
                long at = (l * P + p) * 8;
                for (int c = 0; c < 8; c++) {
                    crow[at + c] = (int32_t)(offset[l] + idx[c]);
                    cw[at + c] = w[c];
                }
            }
        }
    }
}

/* gtab (entries, F) += the table gradient of grad (P, L*F), from the kept corners (crow, cw) or
   recomputed ones (NULL); levels in parallel (disjoint table rows) */
void hash_grid_bwd(const double *x, long P, const double *scale, const int64_t *res, const int64_t *size,
                   const int64_t *offset, const int64_t *hashed, long L, int fma, const float *grad,
                   long F, float *gtab, const int32_t *crow, const float *cw) {
    CF_PARALLEL
    for (long l = 0; l < L; l++)
        for (long p = 0; p < P; p++) {
            int64_t idx[8];
            float w[8];
            if (crow) {
                long at = (l * P + p) * 8;
                for (int c = 0; c < 8; c++) {
                    idx[c] = crow[at + c];
                    w[c] = cw[at + c];
                }
            } else {
                level_corners(x + 3 * p, scale[l], fma, res[l], size[l], (int)hashed[l], idx, w);
                for (int c = 0; c < 8; c++) idx[c] += offset[l];
            }
            const float *g = grad + p * L * F + l * F;
            for (int c = 0; c < 8; c++) {
                float *row = gtab + idx[c] * F;
                for (long f = 0; f < F; f++) row[f] += w[c] * g[f];
            }
        }
}
