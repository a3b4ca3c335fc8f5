// Fused sparse attention forward (FlashAttention-2 style on mma.sync), docs/design.rst sections 4-5.
//
// One CTA of WARPS warps per (query tile, head, batch); each warp owns BLOCK_Q / WARPS rows.
// The CTA walks its plan entry (an ordered list of key tiles), streaming K and V through
// shared memory with cp.async (double-buffered, one tile ahead). For every visited tile:
// S = Q.K^T on tensor cores, the tile's row maxima, then the skip rule decides for the whole
// query tile (every valid row must agree: one __syncthreads_and). A skipped tile costs its
// Q.K^T only; a kept tile goes through the online softmax and P.V with P fed from registers.
// LSE, the recall bound and the kept/visited bitmaps are written at the end. Launch parameters
// come in one ForwardParams struct; the plan row, the vote and the epilogue (an empty plan row
// gives O = 0, LSE = -inf) are shared with the wgmma kernel (forward_common.cuh).
//
// Template instances are listed by pysparse_attn/backends/cupy.py (NVRTC name expressions) and
// by pysparse_attn/backends/compile_check.py (nvcc).

#include "element_types.cuh"
#include "forward_common.cuh"
#include "forward_params.cuh"
#include "online_softmax.cuh"
#include "ptx.cuh"
#include "skip_rules.cuh"
#include "tile_masking.cuh"
#include "tile_traits.cuh"

namespace psa {

template <class Element, int HEAD_DIM, int BLOCK_Q, int WARPS, class Rule>
__global__ void __launch_bounds__(WARPS * 32, WARPS == 4 ? 2 : 1)
    attention_forward(const __grid_constant__ ForwardParams params) {
    using Traits = TileTraits<HEAD_DIM, BLOCK_Q, 64, WARPS>;
    constexpr int kKeyBlocks = Traits::kKeyBlocks;
    constexpr int kDimBlocks = Traits::kDimBlocks;
    constexpr int kDimSteps = Traits::kDimSteps;
    constexpr int kBlockK = Traits::kBlockK;
    constexpr int kM = Traits::kMFrags;
    constexpr bool kQInRegisters = Traits::kQInRegisters;

    extern __shared__ __align__(128) unsigned char shared_raw[];
    unsigned short* shared = reinterpret_cast<unsigned short*>(shared_raw);
    unsigned short* q_tile = shared;
    unsigned short* k_tiles = shared + Traits::kKOffset;
    unsigned short* v_tiles = shared + Traits::kVOffset;

    const int query_tile = blockIdx.x;
    const int head = blockIdx.y;
    const int batch = blockIdx.z;
    const int kv_head = head / params.head_group;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int n_queries = params.n_queries, n_keys = params.n_keys;
    const int n_key_tiles = (n_keys + kBlockK - 1) / kBlockK;
    const PlanRow plan = plan_row(params, batch, head, query_tile, gridDim.y, gridDim.x,
                                  n_key_tiles);
    const int n_visit = plan.count;
    const BoundRule<Rule, Log2Units, float> rule(params.rule_params, head);
    const float scale_log2 = params.scale_log2;
    const long long q_row_stride = params.q_row_stride;
    const long long k_row_stride = params.k_row_stride;
    const long long v_row_stride = params.v_row_stride;

    const unsigned short* q_slab =
        params.q + batch * params.q_batch_stride + head * params.q_head_stride;
    const unsigned short* k_slab =
        params.k + batch * params.k_batch_stride + kv_head * params.k_head_stride;
    const unsigned short* v_slab =
        params.v + batch * params.v_batch_stride + kv_head * params.v_head_stride;
    const int first_query = query_tile * BLOCK_Q;
    const int warp_row = warp * Traits::kRowsPerWarp;

    // Prologue: Q and the first K/V tile in one copy group.
    load_tile_async<Traits, BLOCK_Q>(q_tile, q_slab, q_row_stride, first_query, n_queries);
    int next_tile = n_visit > 0 ? plan.tiles[0] : 0;
    load_tile_async<Traits, kBlockK>(k_tiles, k_slab, k_row_stride, next_tile * kBlockK, n_keys);
    load_tile_async<Traits, kBlockK>(v_tiles, v_slab, v_row_stride, next_tile * kBlockK, n_keys);
    copy_async_commit();

    // Rows this lane owns (fragment m: rows +lane/4 and +lane/4+8), and whether they exist:
    // padded rows never influence a decision.
    bool row_valid[kM][2];
#pragma unroll
    for (int m = 0; m < kM; ++m)
#pragma unroll
        for (int r = 0; r < 2; ++r)
            row_valid[m][r] = first_query + warp_row + m * 16 + (lane >> 2) + 8 * r < n_queries;

    unsigned q_fragments[kQInRegisters ? kDimSteps : 1][4];
    float o[kM][kDimBlocks][4];
#pragma unroll
    for (int m = 0; m < kM; ++m)
#pragma unroll
        for (int db = 0; db < kDimBlocks; ++db)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[m][db][e] = 0.f;
    RowState state[kM];
#pragma unroll
    for (int m = 0; m < kM; ++m) state[m].init();

    for (int step = 0; step < n_visit; ++step) {
        const int key_tile = next_tile;
        const int buffer = step & 1;
        copy_async_wait<0>();
        // K/V of this step have landed for every thread, and every warp is done with the
        // buffer the prefetch below overwrites (it held step - 1).
        __syncthreads();
        if (kQInRegisters && step == 0) {
#pragma unroll
            for (int ks = 0; ks < kDimSteps; ++ks)
                load_matrix_x4(q_fragments[kQInRegisters ? ks : 0],
                               shared_address(q_tile + Traits::swizzle(warp_row + (lane & 15),
                                                                       ks * 2 + (lane >> 4))));
        }
        if (step + 1 < n_visit) {
            next_tile = plan.tiles[step + 1];
            const int other = (step + 1) & 1;
            load_tile_async<Traits, kBlockK>(k_tiles + other * Traits::kKvElements, k_slab,
                                             k_row_stride, next_tile * kBlockK, n_keys);
            load_tile_async<Traits, kBlockK>(v_tiles + other * Traits::kKvElements, v_slab,
                                             v_row_stride, next_tile * kBlockK, n_keys);
        }
        copy_async_commit();

        const unsigned short* k_tile = k_tiles + buffer * Traits::kKvElements;
        // S = Q.K^T (raw dot products, fp32); each K fragment feeds all kM row fragments.
        float s[kM][kKeyBlocks][4];
#pragma unroll
        for (int m = 0; m < kM; ++m)
#pragma unroll
            for (int nb = 0; nb < kKeyBlocks; ++nb)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[m][nb][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < kDimSteps; ++ks) {
            unsigned a[kM][4];
#pragma unroll
            for (int m = 0; m < kM; ++m) {
                if (kQInRegisters) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) a[m][e] = q_fragments[kQInRegisters ? ks : 0][e];
                } else {
                    load_matrix_x4(a[m], shared_address(q_tile + Traits::swizzle(
                                             warp_row + m * 16 + (lane & 15),
                                             ks * 2 + (lane >> 4))));
                }
            }
#pragma unroll
            for (int pair = 0; pair < kKeyBlocks / 2; ++pair) {
                const int matrix = lane >> 3;
                const int key = pair * 16 + (matrix >> 1) * 8 + (lane & 7);
                unsigned b[4];
                load_matrix_x4(
                    b, shared_address(k_tile + Traits::swizzle(key, ks * 2 + (matrix & 1))));
#pragma unroll
                for (int m = 0; m < kM; ++m) {
                    Element::mma(s[m][2 * pair], a[m], b[0], b[1]);
                    Element::mma(s[m][2 * pair + 1], a[m], b[2], b[3]);
                }
            }
        }
        const int valid_keys = min(kBlockK, n_keys - key_tile * kBlockK);
        float tile_max2[kM][2];
#pragma unroll
        for (int m = 0; m < kM; ++m) {
            if (valid_keys < kBlockK) mask_padded_keys(s[m], valid_keys, lane);
            tile_row_max(s[m], tile_max2[m]);
#pragma unroll
            for (int r = 0; r < 2; ++r) tile_max2[m][r] *= scale_log2;  // scale > 0: max commutes
        }

        if (Rule::kCanSkip && step > 0) {
            float added[kM][2];
            bool may_skip = true;
#pragma unroll
            for (int m = 0; m < kM; ++m) {
                tile_skipped_mass<Rule>(s[m], tile_max2[m], scale_log2, state[m], valid_keys,
                                        added[m]);
                may_skip &= rows_may_skip(rule, state[m], tile_max2[m], added[m], row_valid[m]);
            }
            if (__syncthreads_and(may_skip)) {
#pragma unroll
                for (int m = 0; m < kM; ++m) add_skipped_mass(state[m], added[m]);
                record_tile(params, plan, key_tile, false);
                continue;
            }
        }
        record_tile(params, plan, key_tile, true);

#pragma unroll
        for (int m = 0; m < kM; ++m)
            keep_tile<Rule::kNeedsRowSum>(s[m], tile_max2[m], scale_log2, state[m], o[m]);

        // O += P.V with P straight from the accumulators (the C layout of two n8 blocks is the
        // A layout of one k16 step); each V fragment feeds all kM row fragments.
        const unsigned short* v_tile = v_tiles + buffer * Traits::kKvElements;
#pragma unroll
        for (int kstep = 0; kstep < kBlockK / 16; ++kstep) {
            unsigned a[kM][4];
#pragma unroll
            for (int m = 0; m < kM; ++m) {
                a[m][0] = Element::pack(s[m][2 * kstep][0], s[m][2 * kstep][1]);
                a[m][1] = Element::pack(s[m][2 * kstep][2], s[m][2 * kstep][3]);
                a[m][2] = Element::pack(s[m][2 * kstep + 1][0], s[m][2 * kstep + 1][1]);
                a[m][3] = Element::pack(s[m][2 * kstep + 1][2], s[m][2 * kstep + 1][3]);
            }
#pragma unroll
            for (int pair = 0; pair < kDimBlocks / 2; ++pair) {
                const int matrix = lane >> 3;
                const int key = kstep * 16 + (matrix & 1) * 8 + (lane & 7);
                unsigned b[4];
                load_matrix_x4_transposed(
                    b, shared_address(v_tile + Traits::swizzle(key, pair * 2 + (matrix >> 1))));
#pragma unroll
                for (int m = 0; m < kM; ++m) {
                    Element::mma(o[m][2 * pair], a[m], b[0], b[1]);
                    Element::mma(o[m][2 * pair + 1], a[m], b[2], b[3]);
                }
            }
        }
    }
    copy_async_wait<0>();

    // Epilogue: normalise, write O, LSE and the recall bound of the valid rows.
#pragma unroll
    for (int m = 0; m < kM; ++m)
        store_rows<Element, Rule::kNeedsRowSum>(params, o[m], state[m], row_valid[m],
                                                first_query + warp_row + m * 16 + (lane >> 2),
                                                batch, head, gridDim.y, n_visit == 0, lane);
}

}  // namespace psa
