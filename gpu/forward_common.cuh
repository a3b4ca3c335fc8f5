// What the two forward kernels (attention_forward.cu on mma.sync, attention_forward_sm90.cu on
// wgmma) share: reading a CTA's plan row, the per-row skip vote, the statistics bitmaps and
// the epilogue. Both hold the online-softmax state of the two rows a lane owns in one m16
// accumulator fragment (online_softmax.cuh), so every helper here works on one fragment; the
// mma.sync kernel calls them once per fragment it owns.
#pragma once

#include "forward_params.cuh"
#include "online_softmax.cuh"
#include "ptx.cuh"
#include "skip_rules.cuh"

namespace psa {

// One CTA's plan row: query tile `query_tile` of (batch, head).
struct PlanRow {
    const int* tiles;      // key tiles in visit order
    int count;             // may be 0: the epilogue then writes O = 0, LSE = -inf
    long long stats_row;   // offset of the row in the (B, Hq, nq, nk) bitmaps
};

__device__ __forceinline__ PlanRow plan_row(const ForwardParams& params, int batch, int head,
                                            int query_tile, int n_heads, int n_query_tiles,
                                            int n_key_tiles) {
    const long long slab = (long long)batch * n_heads + head;
    const int* offsets = params.row_offsets + slab * (n_query_tiles + 1) + query_tile;
    const int start = offsets[0];
    PlanRow row;
    row.tiles = params.row_indices + slab * params.capacity + start;
    row.count = offsets[1] - start;
    row.stats_row = (slab * n_query_tiles + query_tile) * n_key_tiles;
    return row;
}

// The mass each row would skip with the tile: its exact row sum for kExactMass rules, else the
// bound nJ * exp2(tile_max2 - max2).
template <class Rule, int KEY_BLOCKS>
__device__ __forceinline__ void tile_skipped_mass(const float (&s)[KEY_BLOCKS][4],
                                                  const float (&tile_max2)[2], float scale_log2,
                                                  const RowState& state, int valid_keys,
                                                  float (&added)[2]) {
    if (Rule::kExactMass) {
        tile_row_mass(s, scale_log2, state.max2, added);
    } else {
#pragma unroll
        for (int r = 0; r < 2; ++r)
            added[r] = (float)valid_keys * fast_exp2(tile_max2[r] - state.max2[r]);
    }
}

// Whether both rows of the fragment allow the skip; padded rows never influence a decision.
template <class Bound>
__device__ __forceinline__ bool rows_may_skip(const Bound& rule, const RowState& state,
                                              const float (&tile_max2)[2],
                                              const float (&added)[2],
                                              const bool (&row_valid)[2]) {
    bool may_skip = true;
#pragma unroll
    for (int r = 0; r < 2; ++r)
        may_skip &= !row_valid[r] || rule(tile_max2[r], state.max2[r], state.sum[r],
                                          state.skipped[r], added[r]);
    return may_skip;
}

__device__ __forceinline__ void add_skipped_mass(RowState& state, const float (&added)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) state.skipped[r] += added[r];
}

// The visited / kept bitmaps of the statistics (one thread of the CTA writes).
__device__ __forceinline__ void record_tile(const ForwardParams& params, const PlanRow& row,
                                            int key_tile, bool kept) {
    if (params.want_stats && threadIdx.x == 0) {
        params.visited[row.stats_row + key_tile] = 1;
        if (kept) params.kept[row.stats_row + key_tile] = 1;
    }
}

struct alignas(8) FloatPair {
    float lo, hi;
};

// Epilogue of one fragment: normalise and write O (16-bit or float32), LSE and the recall
// bound of its two rows; `first_row` is the row of r = 0 (r = 1 is 8 rows down). A row with
// no visited tile (`empty_row`) gets O = 0, LSE = -inf and recall bound 1.
template <class Element, bool FULL_ROW_SUM, int DIM_BLOCKS>
__device__ __forceinline__ void store_rows(const ForwardParams& params,
                                           const float (&o)[DIM_BLOCKS][4],
                                           const RowState& state, const bool (&row_valid)[2],
                                           int first_row, int batch, int head, int n_heads,
                                           bool empty_row, int lane) {
    const long long slab = (long long)batch * n_heads + head;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        // quad_sum shuffles: every lane takes part before the padded rows drop out.
        const float sum = FULL_ROW_SUM ? state.sum[r] : quad_sum(state.sum[r]);
        const int row = first_row + 8 * r;
        if (!row_valid[r]) continue;
        const float inverse = empty_row ? 0.f : 1.f / sum;
        const long long offset = batch * params.out_batch_stride +
                                 head * params.out_head_stride +
                                 (long long)row * params.out_row_stride + 2 * (lane & 3);
        if (params.out_float32) {
            float* out_row = static_cast<float*>(params.out) + offset;
#pragma unroll
            for (int db = 0; db < DIM_BLOCKS; ++db) {
                FloatPair pair;
                pair.lo = o[db][2 * r] * inverse;
                pair.hi = o[db][2 * r + 1] * inverse;
                *reinterpret_cast<FloatPair*>(out_row + db * 8) = pair;
            }
        } else {
            unsigned short* out_row = static_cast<unsigned short*>(params.out) + offset;
#pragma unroll
            for (int db = 0; db < DIM_BLOCKS; ++db)
                *reinterpret_cast<unsigned*>(out_row + db * 8) =
                    Element::pack(o[db][2 * r] * inverse, o[db][2 * r + 1] * inverse);
        }
        if ((lane & 3) == 0) {
            const long long flat = slab * params.n_queries + row;
            params.lse[flat] = empty_row ? negative_infinity()
                                         : (state.max2[r] + log2f(sum)) * 0.69314718055994531f;
            if (params.want_stats)
                params.recall_bound[flat] =
                    empty_row ? 1.f : sum / (sum + state.skipped[r]);
        }
    }
}

}  // namespace psa
