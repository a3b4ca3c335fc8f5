// Online-softmax bookkeeping in the mma.sync accumulator layout.
//
// In an m16n8 accumulator, lane l holds rows l/4 and l/4 + 8; the four lanes of a quad share a
// row, so a row reduction is two butterfly shuffles. Logits are kept pre-multiplied by
// scale*log2(e) so that every exponential is one exp2.
#pragma once

#include "ptx.cuh"

namespace psa {

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Per-row running state of the two rows a lane owns. `max2` is in log2 units (scaled logits),
// `sum` = sum over kept keys of exp2(s2 - max2), `skipped` the bound on skipped mass in the same
// frame as `sum` (docs/design.rst section 5).
struct RowState {
    float max2[2];
    float sum[2];
    float skipped[2];

    __device__ __forceinline__ void init() {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            max2[r] = negative_infinity();
            sum[r] = 0.f;
            skipped[r] = 0.f;
        }
    }
};

// Row maxima (raw dot products) of an S tile held as KEY_BLOCKS n8 accumulators.
template <int KEY_BLOCKS>
__device__ __forceinline__ void tile_row_max(const float (&s)[KEY_BLOCKS][4], float (&row_max)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float x = negative_infinity();
#pragma unroll
        for (int nb = 0; nb < KEY_BLOCKS; ++nb) x = fmaxf(x, fmaxf(s[nb][2 * r], s[nb][2 * r + 1]));
        row_max[r] = quad_max(x);
    }
}

// Exact skipped mass of a tile, sum_j exp2(s2_j - max2), full row (code 4 of the rule table).
template <int KEY_BLOCKS>
__device__ __forceinline__ void tile_row_mass(const float (&s)[KEY_BLOCKS][4], float scale_log2,
                                              const float (&max2)[2], float (&mass)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float x = 0.f;
#pragma unroll
        for (int nb = 0; nb < KEY_BLOCKS; ++nb) {
            x += fast_exp2(s[nb][2 * r] * scale_log2 - max2[r]);
            x += fast_exp2(s[nb][2 * r + 1] * scale_log2 - max2[r]);
        }
        mass[r] = quad_sum(x);
    }
}

// Keep a tile, statistics part: move the running max, turn S into P = exp2(s2 - max2) in
// place, rescale the sum and the skipped-mass bound; `alpha` is the factor the output
// accumulator must be scaled by (rescale_output). With FULL_ROW_SUM false the sum stays a
// per-lane partial (reduced once at the end), which saves two shuffles a row per tile.
template <bool FULL_ROW_SUM, int KEY_BLOCKS>
__device__ __forceinline__ void softmax_tile(float (&s)[KEY_BLOCKS][4], const float (&tile_max2)[2],
                                             float scale_log2, RowState& state,
                                             float (&alpha)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float new_max = fmaxf(state.max2[r], tile_max2[r]);
        alpha[r] = fast_exp2(state.max2[r] - new_max);
        float row_sum = 0.f;
#pragma unroll
        for (int nb = 0; nb < KEY_BLOCKS; ++nb) {
            s[nb][2 * r] = fast_exp2(fmaf(s[nb][2 * r], scale_log2, -new_max));
            s[nb][2 * r + 1] = fast_exp2(fmaf(s[nb][2 * r + 1], scale_log2, -new_max));
            row_sum += s[nb][2 * r] + s[nb][2 * r + 1];
        }
        if (FULL_ROW_SUM) row_sum = quad_sum(row_sum);
        state.sum[r] = state.sum[r] * alpha[r] + row_sum;
        state.skipped[r] *= alpha[r];
        state.max2[r] = new_max;
    }
}

template <int DIM_BLOCKS>
__device__ __forceinline__ void rescale_output(float (&out)[DIM_BLOCKS][4],
                                               const float (&alpha)[2]) {
#pragma unroll
    for (int db = 0; db < DIM_BLOCKS; ++db) {
        out[db][0] *= alpha[0];
        out[db][1] *= alpha[0];
        out[db][2] *= alpha[1];
        out[db][3] *= alpha[1];
    }
}

// Keep a tile: statistics, then the output rescale.
template <bool FULL_ROW_SUM, int KEY_BLOCKS, int DIM_BLOCKS>
__device__ __forceinline__ void keep_tile(float (&s)[KEY_BLOCKS][4], const float (&tile_max2)[2],
                                          float scale_log2, RowState& state,
                                          float (&out)[DIM_BLOCKS][4]) {
    float alpha[2];
    softmax_tile<FULL_ROW_SUM>(s, tile_max2, scale_log2, state, alpha);
    rescale_output(out, alpha);
}

}  // namespace psa
