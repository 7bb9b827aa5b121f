/* The canonical renderer's projection of each image's voxel map along its rotated rays.

   reach_pack: rotate each image's image-plane lattice into the map's frame, keep the points whose
   trilinear samples can reach a possibly nonzero voxel, and write those points' voxel coordinates and
   pixel indices, compacted, one image after another. The torch form (cryoformer/render.py:
   rotated_points, reach_lookup, pack_rows) is a dozen passes over (B, P, 3) tensors for a step; this is
   one. Rounding is to nearest even, as torch.round.

   project_fwd / project_bwd: the trilinear samples of those points summed into their pixels, and the
   adjoint (each sample's weights scattered back into the map): grid_sample with zero padding plus
   index_add, without the padded samples and the two (B, W) intermediates. */

#include <math.h>
#include <stdint.h>

#include "threads.h"

void reach_pack(const float *points, const int64_t *pixels, long P, const float *rot, long B,
                const float *offset, const uint8_t *reach, long g, long box, float *grid, int64_t *pix,
                int64_t *counts) {
    long half = box / 2, shift = (g - 4) / 2 + 2;
    CF_PARALLEL
    for (long b = 0; b < B; b++) {
        const float *r = rot + 9 * b;
        float *gb = grid + 3 * P * b;
        int64_t *pb = pix + P * b;
        long w = 0;
        for (long p = 0; p < P; p++) {
            const float *q = points + 3 * p;
            float world[3];
            for (int j = 0; j < 3; j++) {
                world[j] = q[0] * r[j] + q[1] * r[3 + j] + q[2] * r[6 + j];
                if (offset) world[j] -= offset[j];
            }
            long u[3];
            for (int j = 0; j < 3; j++) {
                long v = (long)nearbyintf(world[j]) + shift;
                u[j] = v < 0 ? 0 : (v > g - 1 ? g - 1 : v);
            }
            if (!reach[(u[2] * g + u[1]) * g + u[0]]) continue;
            for (int j = 0; j < 3; j++) gb[3 * w + j] = world[j] + (float)half;
            pb[w] = pixels[p] + b * box * box;
            w++;
        }
        counts[b] = w;
    }
}

/* the 8 corners of a trilinear sample at voxel coordinates c (x, y, z) of a D^3 map [z][y][x], with
   their weights; corners outside the map get weight 0 and index 0 (zero padding) */
static inline void corners(const float *c, long D, long *idx, float *wt) {
    float fl[3], fr[3];
    long i0[3];
    for (int j = 0; j < 3; j++) {
        fl[j] = floorf(c[j]);
        fr[j] = c[j] - fl[j];
        i0[j] = (long)fl[j];
    }
    for (int k = 0; k < 8; k++) {
        long x = i0[0] + (k & 1), y = i0[1] + ((k >> 1) & 1), z = i0[2] + ((k >> 2) & 1);
        float w = ((k & 1) ? fr[0] : 1.0f - fr[0]) * (((k >> 1) & 1) ? fr[1] : 1.0f - fr[1])
                  * (((k >> 2) & 1) ? fr[2] : 1.0f - fr[2]);
        int inside = x >= 0 && x < D && y >= 0 && y < D && z >= 0 && z < D;
        idx[k] = inside ? (z * D + y) * D + x : 0;
        wt[k] = inside ? w : 0.0f;
    }
}

/* out (B * box * box) += the trilinear samples, at each image's first counts[b] points of coords
   (B, W, 3), of maps stored sparsely: voxel i of image b's D^3 map [z][y][x] holds vals[b * vstride +
   slot[i]] (0 where slot[i] < 0; slot NULL: slot[i] = i, a dense map; vstride 0: one map for all),
   summed into the pixels pix (B, W) of that image */
void project_fwd(const float *vals, long vstride, const int32_t *slot, long D, const float *coords,
                 const int64_t *pix, long W, const int64_t *counts, long B, float *out) {
    CF_PARALLEL
    for (long b = 0; b < B; b++) {
        long idx[8];
        float wt[8];
        const float *v = vals + b * vstride;
        for (long k = 0; k < counts[b]; k++) {
            corners(coords + 3 * (b * W + k), D, idx, wt);
            float s = 0.0f;
            for (int c = 0; c < 8; c++) {
                long at = slot ? slot[idx[c]] : idx[c];
                if (at >= 0) s += wt[c] * v[at];
            }
            out[pix[b * W + k]] += s;
        }
    }
}

/* gvals += the adjoint of project_fwd applied to gout (B * box * box); images in parallel when each
   has its own map */
void project_bwd(float *gvals, long vstride, const int32_t *slot, long D, const float *coords,
                 const int64_t *pix, long W, const int64_t *counts, long B, const float *gout) {
    _Pragma("omp parallel for num_threads(cf_threads) schedule(static) if(vstride != 0)")
    for (long b = 0; b < B; b++) {
        long idx[8];
        float wt[8];
        float *gv = gvals + b * vstride;
        for (long k = 0; k < counts[b]; k++) {
            corners(coords + 3 * (b * W + k), D, idx, wt);
            float g = gout[pix[b * W + k]];
            for (int c = 0; c < 8; c++) {
                long at = slot ? slot[idx[c]] : idx[c];
                if (at >= 0) gv[at] += wt[c] * g;
            }
        }
    }
}
