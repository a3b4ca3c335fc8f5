// Fused sparse attention forward on Hopper warpgroup MMA (wgmma, sm_90a), DESIGN.md sections 4-5.
//
// Same contract, arguments and skip logic as attention_forward.cu (the sm_80 mma.sync kernel);
// what changes is the matrix engine. One CTA per (query tile, head, batch) with one warpgroup
// per 64 query rows. Q is loaded once (into registers at D = 128); K and V stream through a
// ring of 128-byte-swizzled shared stages filled by cp.async. S = Q.K^T is one chain of wgmma
// reading K (and Q at D = 64) from shared memory; P goes from the accumulators into the
// register A operand of the P.V wgmma, which reads V (MN-major) from shared memory. The loop is
// software-pipelined (see the loop comment): one CTA barrier per tile, which also carries the
// all-rows skip vote, and the tensor cores work on one tile's products while the warpgroup
// computes the neighbouring tile's softmax.
//
// Template instances are listed by pysparse_attn/backends/cupy.py (NVRTC name expressions) and
// by pysparse_attn/backends/compile_check.py (nvcc, sm_90a).

#include "element_types.cuh"
#include "online_softmax.cuh"
#include "ptx.cuh"
#include "skip_rules.cuh"
#include "tile_masking.cuh"
#include "tile_traits_sm90.cuh"
#include "warpgroup_mma.cuh"

namespace psa {

template <class Element, int HEAD_DIM, int BLOCK_Q, class Rule>
__global__ void __launch_bounds__(BLOCK_Q * 2, BLOCK_Q == 64 && HEAD_DIM == 64 ? 2 : 1)
attention_forward_sm90(
    const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
    const unsigned short* __restrict__ v, unsigned short* __restrict__ out,
    long long q_batch_stride, long long q_head_stride, long long q_row_stride,
    long long k_batch_stride, long long k_head_stride, long long k_row_stride,
    long long v_batch_stride, long long v_head_stride, long long v_row_stride,
    long long out_batch_stride, long long out_head_stride, long long out_row_stride,
    int n_queries, int n_keys, int head_group,
    const int* __restrict__ visit, const int* __restrict__ count, int max_count,
    float scale_log2, float rule_param,
    float* __restrict__ lse, float* __restrict__ recall_bound,
    unsigned char* __restrict__ kept, unsigned char* __restrict__ visited, int want_stats) {
    using Traits = WarpgroupTileTraits<HEAD_DIM, BLOCK_Q, 64>;
    constexpr int kKeyBlocks = Traits::kKeyBlocks;
    constexpr int kDimBlocks = Traits::kDimBlocks;
    constexpr int kBlockK = Traits::kBlockK;
    constexpr int kStages = Traits::kStages;
    static_assert(Traits::kThreads == BLOCK_Q * 2, "launch bounds above assume 2 threads a row");

    extern __shared__ unsigned char shared_raw[];
    // The swizzle is a function of address bits 4-9: tiles must sit on 1024-byte boundaries.
    const unsigned raw_address = shared_address(shared_raw);
    unsigned short* shared = reinterpret_cast<unsigned short*>(
        shared_raw + ((Traits::kAlignment - (raw_address & (Traits::kAlignment - 1))) &
                      (Traits::kAlignment - 1)));
    unsigned short* q_tile = shared + Traits::kQOffset;
    unsigned short* stages = shared + Traits::kStagesOffset;  // stage s: K, then V

    const int query_tile = blockIdx.x;
    const int head = blockIdx.y;
    const int batch = blockIdx.z;
    const int kv_head = head / head_group;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int n_query_tiles = gridDim.x;
    const int n_key_tiles = (n_keys + kBlockK - 1) / kBlockK;

    const long long plan_row = ((long long)batch * gridDim.y + head) * n_query_tiles + query_tile;
    const int n_visit = count[plan_row];
    const int* visit_list = visit + plan_row * max_count;
    const long long stats_row = plan_row * n_key_tiles;

    const unsigned short* q_slab = q + batch * q_batch_stride + head * q_head_stride;
    const unsigned short* k_slab = k + batch * k_batch_stride + kv_head * k_head_stride;
    const unsigned short* v_slab = v + batch * v_batch_stride + kv_head * v_head_stride;
    const int first_query = query_tile * BLOCK_Q;
    const int warp_row = warp * 16;  // warp w of warpgroup g owns rows 64g + 16w ..

    auto load_stage = [&](int stage, int tile) {
        load_tile_async<Traits, kBlockK>(stages + stage * Traits::kStageElements, k_slab,
                                         k_row_stride, tile * kBlockK, n_keys);
        load_tile_async<Traits, kBlockK>(stages + stage * Traits::kStageElements +
                                             Traits::kKvElements,
                                         v_slab, v_row_stride, tile * kBlockK, n_keys);
    };

    // Prologue: Q with the first tile, then up to kAhead - 1 more tiles, one copy group each.
    constexpr int kAhead = Traits::kTilesAhead;
#pragma unroll
    for (int stage = 0; stage < kAhead; ++stage) {
        if (stage == 0)
            load_tile_async<Traits, BLOCK_Q>(q_tile, q_slab, q_row_stride, first_query, n_queries);
        if (stage < n_visit) load_stage(stage, visit_list[stage]);
        copy_async_commit();
    }

    bool row_valid[2];
#pragma unroll
    for (int r = 0; r < 2; ++r)
        row_valid[r] = first_query + warp_row + (lane >> 2) + 8 * r < n_queries;

    constexpr bool kQInRegisters = Traits::kQInRegisters;
    unsigned q_fragments[kQInRegisters ? Traits::kDimSteps : 1][4];
    const unsigned q_base = shared_address(q_tile) + (warp >> 2) * 64 * 128;
    const unsigned stages_base = shared_address(stages);
    constexpr unsigned kStageBytes = 2 * Traits::kStageElements;
    constexpr unsigned kVBytesOffset = 2 * Traits::kKvElements;

    float o[kDimBlocks][4];
#pragma unroll
    for (int db = 0; db < kDimBlocks; ++db)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[db][e] = 0.f;
    RowState state;
    state.init();

    // Software pipeline, one CTA barrier per tile. Step j: the barrier also reduces the skip
    // vote on tile j - 1 (whose S was computed in step j - 1); Q.K^T of tile j is issued; tile
    // j - 1's softmax runs while the tensor cores compute it; tile j - 1's P.V is issued and
    // runs through the row maxima and vote of tile j and into step j + 1, which waits for it
    // before rescaling O. A stage is therefore busy for three steps, so the ring holds
    // kStages = kTilesAhead + 3 tiles.
    float s[kKeyBlocks][4];          // S of tile j
    float pending_s[kKeyBlocks][4];  // S of tile j - 1, awaiting the vote
    float pending_max2[2], pending_added[2];
    bool pending = false, pending_vote = false;
    int pending_tile = 0, pending_stage = 0;
    unsigned p[Traits::kKeySteps][4];

    for (int step = 0; step <= n_visit; ++step) {
        const bool has_tile = step < n_visit;
        copy_async_wait<kAhead - 1>();
        fence_generic_to_async_shared();
        // Tile j's K/V have landed for every thread, and the stage the prefetch below
        // overwrites (tile j - 3) has no reader left.
        bool keep_pending = pending;
        if (Rule::kCanSkip) {
            // Always reached by every thread (it is also step 0's data barrier).
            const bool all_skip = __syncthreads_and(pending_vote);
            keep_pending = pending && !all_skip;
        } else {
            __syncthreads();
        }
        if (pending && want_stats && threadIdx.x == 0) {
            visited[stats_row + pending_tile] = 1;
            if (keep_pending) kept[stats_row + pending_tile] = 1;
        }
        if (kQInRegisters && step == 0) {
#pragma unroll
            for (int ks = 0; ks < Traits::kDimSteps; ++ks)
                load_matrix_x4(q_fragments[kQInRegisters ? ks : 0],
                               shared_address(q_tile + Traits::template tile_offset<BLOCK_Q>(
                                                           warp_row + (lane & 15), ks * 2 + (lane >> 4))));
        }

        // S = Q.K^T of tile j (raw dot products, fp32), K-major operands, one k16 step per 32
        // bytes of a 128-byte panel row. The vote keeps the condition visibly warp-uniform: a
        // wgmma under a branch ptxas thinks divergent gets every wgmma serialized (C7520).
        const int key_tile = has_tile ? visit_list[step] : 0;
        const int stage = step % kStages;
        if (__all_sync(0xffffffffu, has_tile)) {
            const unsigned k_stage = stages_base + stage * kStageBytes;
            warpgroup_fence();
            pin_accumulator(s);
#pragma unroll
            for (int ks = 0; ks < Traits::kDimSteps; ++ks) {
                const unsigned panel = ks >> 2, within = (ks & 3) * 32;
                const unsigned long long k_descriptor =
                    sw128_descriptor(k_stage + panel * Traits::kKvPanelBytes + within, 16);
                if (kQInRegisters)
                    Warpgroup<Element, kBlockK>::rs(s, q_fragments[kQInRegisters ? ks : 0],
                                                    k_descriptor, ks > 0);
                else
                    Warpgroup<Element, kBlockK>::ss(
                        s, sw128_descriptor(q_base + panel * Traits::kQPanelBytes + within, 16),
                        k_descriptor, ks > 0);
            }
        }
        warpgroup_commit();
        if (step + kAhead < n_visit) load_stage((step + kAhead) % kStages, visit_list[step + kAhead]);
        copy_async_commit();

        // Tile j - 1: softmax if kept (overlapping Q.K^T of tile j), else its mass bound.
        float alpha[2];
        if (keep_pending) {
            softmax_tile<Rule::kNeedsRowSum>(pending_s, pending_max2, scale_log2, state, alpha);
        } else if (pending) {
#pragma unroll
            for (int r = 0; r < 2; ++r) state.skipped[r] += pending_added[r];
        }
        // In flight: P.V of tile j - 2 (older), Q.K^T of tile j. The P.V has to finish before
        // O is rescaled and p is overwritten.
        warpgroup_wait<1>();
        pin_accumulator(o);
        if (__all_sync(0xffffffffu, keep_pending)) {
            rescale_output(o, alpha);
#pragma unroll
            for (int kstep = 0; kstep < Traits::kKeySteps; ++kstep) {
                p[kstep][0] = Element::pack(pending_s[2 * kstep][0], pending_s[2 * kstep][1]);
                p[kstep][1] = Element::pack(pending_s[2 * kstep][2], pending_s[2 * kstep][3]);
                p[kstep][2] = Element::pack(pending_s[2 * kstep + 1][0], pending_s[2 * kstep + 1][1]);
                p[kstep][3] = Element::pack(pending_s[2 * kstep + 1][2], pending_s[2 * kstep + 1][3]);
            }
            // O += P.V: P in the A-fragment layout (two n8 blocks = one k16 step), V MN-major:
            // 16 keys = 2048 bytes of each 64-column panel per step.
            const unsigned v_stage = stages_base + pending_stage * kStageBytes + kVBytesOffset;
            warpgroup_fence();
            pin_accumulator(o);
#pragma unroll
            for (int kstep = 0; kstep < Traits::kKeySteps; ++kstep)
                Warpgroup<Element, HEAD_DIM>::rs_transposed_b(
                    o, p[kstep],
                    sw128_descriptor(v_stage + kstep * 16 * 128, Traits::kKvPanelBytes));
        }
        warpgroup_commit();
        // In flight: Q.K^T of tile j (older), P.V of tile j - 1.
        warpgroup_wait<1>();
        pin_accumulator(s);

        pending = has_tile;
        if (!has_tile) break;
        const int valid_keys = min(kBlockK, n_keys - key_tile * kBlockK);
        if (valid_keys < kBlockK) mask_padded_keys(s, valid_keys, lane);
        tile_row_max(s, pending_max2);
#pragma unroll
        for (int r = 0; r < 2; ++r) pending_max2[r] *= scale_log2;  // scale > 0: max commutes
        pending_vote = false;
        if (Rule::kCanSkip && step > 0) {  // the first tile of a list is never skipped
            if (Rule::kExactMass) {
                tile_row_mass(s, scale_log2, state.max2, pending_added);
            } else {
#pragma unroll
                for (int r = 0; r < 2; ++r)
                    pending_added[r] = (float)valid_keys * fast_exp2(pending_max2[r] - state.max2[r]);
            }
            pending_vote = true;
#pragma unroll
            for (int r = 0; r < 2; ++r)
                pending_vote &= !row_valid[r] || Rule::may_skip(pending_max2[r], state.max2[r],
                                                                state.sum[r], state.skipped[r],
                                                                pending_added[r], rule_param);
        }
#pragma unroll
        for (int nb = 0; nb < kKeyBlocks; ++nb)
#pragma unroll
            for (int e = 0; e < 4; ++e) pending_s[nb][e] = s[nb][e];
        pending_tile = key_tile;
        pending_stage = stage;
    }
    warpgroup_wait<0>();
    pin_accumulator(o);
    copy_async_wait<0>();

    // Epilogue: normalise, write O, LSE and the recall bound of the valid rows.
    const long long row_base = ((long long)batch * gridDim.y + head) * n_queries;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float sum = Rule::kNeedsRowSum ? state.sum[r] : quad_sum(state.sum[r]);
        const int row = first_query + warp_row + (lane >> 2) + 8 * r;
        if (!row_valid[r]) continue;
        const float inverse = 1.f / sum;
        unsigned short* out_row = out + batch * out_batch_stride + head * out_head_stride +
                                  (long long)row * out_row_stride;
#pragma unroll
        for (int db = 0; db < kDimBlocks; ++db) {
            const unsigned packed = Element::pack(o[db][2 * r] * inverse, o[db][2 * r + 1] * inverse);
            *reinterpret_cast<unsigned*>(out_row + db * 8 + 2 * (lane & 3)) = packed;
        }
        if ((lane & 3) == 0) {
            lse[row_base + row] = (state.max2[r] + log2f(sum)) * 0.69314718055994531f;
            if (want_stats) recall_bound[row_base + row] = sum / (sum + state.skipped[r]);
        }
    }
}

}  // namespace psa
