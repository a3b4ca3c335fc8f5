// Fused sparse attention forward on Hopper warpgroup MMA (wgmma, sm_90a), docs/design.rst sections 4-5.
//
// Same contract, ForwardParams and skip logic as attention_forward.cu (the sm_80 mma.sync
// kernel; the plan row, vote and epilogue are both kernels' forward_common.cuh); what changes
// is the matrix engine. One CTA per (query tile, head, batch) with one warpgroup
// per 64 query rows. Q is loaded once (into registers at D = 128); K and V stream through a ring
// of kStages 128-byte-swizzled shared tiles filled by cp.async, kTilesAhead tiles ahead of the
// compute. S = Q.K^T is one chain of wgmma reading K (and Q at D = 64) from shared memory;
// after the row maxima and the all-rows skip decision, P goes from the accumulators into the
// register A operand of the P.V wgmma, which reads V (MN-major) from shared memory. A kept
// tile's P.V is issued with the next tile's Q.K^T and runs while the warpgroup computes that
// tile's softmax (meant to keep the tensor cores busy through the exponentials; it measured no
// faster than waiting at once, bench/results/gpu.md, and is kept as the simpler schedule to
// extend).
//
// Template instances are listed by pysparse_attn/backends/cupy.py (NVRTC name expressions) and
// by pysparse_attn/backends/compile_check.py (nvcc, sm_90a).
//
// Leave-one-out timing variants (bench/forward_ablation.py), each a macro defined only through
// the backend's private compile options, never in a library build; every one of them gives
// wrong results on purpose, they exist to see where the time goes:
//   PSA_ABLATE_QK_ONLY          Q.K^T and the loads only: no row max, softmax, vote or P.V.
//   PSA_ABLATE_NO_LOADS         every step reuses the first K/V tile (no copies after it).
//   PSA_ABLATE_CHEAP_EXP        exp2 replaced by one FMA (gpu/ptx.cuh, fast_exp2).
//   PSA_ABLATE_NO_TILE_BARRIER  no CTA barrier at the top of each step (ring reuse races).
//   PSA_ABLATE_NO_VOTE          the skip predicate is evaluated but never voted on: nothing is
//                               skipped, no vote barrier (the rule's cost without its barrier).
//   PSA_ABLATE_WARPGROUP_VOTE   each warpgroup votes alone (named barrier of 128 threads)
//                               instead of the CTA-wide __syncthreads_and.

#include "element_types.cuh"
#include "forward_common.cuh"
#include "forward_params.cuh"
#include "online_softmax.cuh"
#include "ptx.cuh"
#include "skip_rules.cuh"
#include "tile_masking.cuh"
#include "tile_traits_sm90.cuh"
#include "warp_specialization.cuh"
#include "warpgroup_mma.cuh"

namespace psa {

template <class Element, int HEAD_DIM, int BLOCK_Q, class Rule>
__global__ void __launch_bounds__(BLOCK_Q * 2, BLOCK_Q == 64 || HEAD_DIM == 64 ? 2 : 1)
    attention_forward_sm90(const __grid_constant__ ForwardParams params) {
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
    const int warp_row = warp * 16;  // warp w of warpgroup g owns rows 64g + 16w ..

    // Prologue: Q with the first tile, then up to kAhead - 1 more tiles, one copy group each.
    constexpr int kAhead = Traits::kTilesAhead;
#pragma unroll
    for (int stage = 0; stage < kAhead; ++stage) {
        if (stage == 0)
            load_tile_async<Traits, BLOCK_Q>(q_tile, q_slab, q_row_stride, first_query, n_queries);
        if (stage < n_visit) {
            const int tile = plan.tiles[stage];
            load_tile_async<Traits, kBlockK>(k_tiles + stage * Traits::kKvElements, k_slab,
                                             k_row_stride, tile * kBlockK, n_keys);
            load_tile_async<Traits, kBlockK>(v_tiles + stage * Traits::kKvElements, v_slab,
                                             v_row_stride, tile * kBlockK, n_keys);
        }
        copy_async_commit();
    }

    bool row_valid[2];
#pragma unroll
    for (int r = 0; r < 2; ++r)
        row_valid[r] = first_query + warp_row + (lane >> 2) + 8 * r < n_queries;

    const unsigned k_base = shared_address(k_tiles);
    const unsigned v_base = shared_address(v_tiles);
    constexpr unsigned kKvBytes = 2 * Traits::kKvElements;

    float o[kDimBlocks][4];
#pragma unroll
    for (int db = 0; db < kDimBlocks; ++db)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[db][e] = 0.f;
    RowState state;
    state.init();
    // P of the last kept tile, whose P.V is issued together with the next tile's Q.K^T so that
    // the tensor cores run it while this warpgroup does the next softmax.
    unsigned p[Traits::kKeySteps][4];
    // At D = 128, Q is the register A operand of Q.K^T (loaded once, after the first barrier),
    // so the wgmma reads only K from shared memory (64x64 tiles: 17.96 -> 17.16 ms, 128x64
    // unchanged). At D = 64 the 32 extra registers cost the second CTA per SM (128x64: 9.1 ->
    // 11.9 ms), so Q is read from shared memory there.
    constexpr bool kQInRegisters = HEAD_DIM == 128;
    unsigned q_fragments[kQInRegisters ? Traits::kDimSteps : 1][4];
    const unsigned q_base = shared_address(q_tile) + (warp >> 2) * 64 * 128;
    bool pv_pending = false;
    unsigned pv_stage = 0;

    // The vote keeps the condition visibly warp-uniform: a wgmma under a branch ptxas thinks
    // divergent gets every wgmma of the kernel serialized (C7520). The fence orders the
    // writes of p and o before the wgmma reads them (ptxas would inject it otherwise, C7519).
    auto issue_pv = [&](unsigned v_stage) {
        warpgroup_fence();
#pragma unroll
        for (int kstep = 0; kstep < Traits::kKeySteps; ++kstep)
            Warpgroup<Element, HEAD_DIM>::rs_transposed_b(
                o, p[kstep], sw128_descriptor(v_stage + kstep * 16 * 128, Traits::kKvPanelBytes));
    };

    for (int step = 0; step < n_visit; ++step) {
        const int key_tile = plan.tiles[step];
#ifdef PSA_ABLATE_NO_LOADS
        const int stage = 0;
#else
        const int stage = step % kStages;
#endif
        copy_async_wait<kAhead - 1>();
        fence_generic_to_async_shared();
        // This step's K/V have landed for every thread, and every warpgroup has finished the
        // P.V that read the stage the prefetch below overwrites (it held step - 2).
#ifndef PSA_ABLATE_NO_TILE_BARRIER
        __syncthreads();
#else
        if (step == 0) __syncthreads();  // Q has to be in shared memory before it is read
#endif
        if (kQInRegisters && step == 0) {
#pragma unroll
            for (int ks = 0; ks < Traits::kDimSteps; ++ks)
                load_matrix_x4(q_fragments[kQInRegisters ? ks : 0],
                               shared_address(q_tile + Traits::template tile_offset<BLOCK_Q>(
                                                           warp_row + (lane & 15),
                                                           ks * 2 + (lane >> 4))));
        }

        // S = Q.K^T (raw dot products, fp32), K-major operands, one k16 step per 32 bytes of a
        // 128-byte panel row; then the previous kept tile's P.V, in a second group.
        float s[kKeyBlocks][4];
        const unsigned k_stage = k_base + stage * kKvBytes;
        warpgroup_fence();
        pin_accumulator(s);
        pin_accumulator(o);
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
        warpgroup_commit();
        if (__all_sync(0xffffffffu, pv_pending)) issue_pv(v_base + pv_stage * kKvBytes);
        warpgroup_commit();
        // The prefetch is issued while the tensor cores work on the two groups above.
#ifdef PSA_ABLATE_NO_LOADS
        if (false) {
#else
        if (step + kAhead < n_visit) {
#endif
            const int tile = plan.tiles[step + kAhead];
            const int target = (step + kAhead) % kStages;
            load_tile_async<Traits, kBlockK>(k_tiles + target * Traits::kKvElements, k_slab,
                                             k_row_stride, tile * kBlockK, n_keys);
            load_tile_async<Traits, kBlockK>(v_tiles + target * Traits::kKvElements, v_slab,
                                             v_row_stride, tile * kBlockK, n_keys);
        }
        copy_async_commit();
        warpgroup_wait<1>();
        pin_accumulator(s);
#ifdef PSA_ABLATE_QK_ONLY
        // Fold S into O (one add a block) so that nothing is dead code, then the next step.
#pragma unroll
        for (int nb = 0; nb < kKeyBlocks; ++nb) o[nb % kDimBlocks][nb & 3] += s[nb][0];
        continue;
#endif

        const int valid_keys = min(kBlockK, n_keys - key_tile * kBlockK);
        if (valid_keys < kBlockK) mask_padded_keys(s, valid_keys, lane);
        float tile_max2[2];
        tile_row_max(s, tile_max2);
#pragma unroll
        for (int r = 0; r < 2; ++r) tile_max2[r] *= scale_log2;  // scale > 0: max commutes

        bool skip = false;
        if (Rule::kCanSkip && step > 0) {
            float added[2];
            tile_skipped_mass<Rule>(s, tile_max2, scale_log2, state, valid_keys, added);
#if defined(PSA_ABLATE_NO_VOTE)
            const bool may_skip = rows_may_skip(rule, state, tile_max2, added, row_valid);
            asm volatile("" :: "r"((int)may_skip));  // evaluated, never voted on
            skip = false;
#elif defined(PSA_ABLATE_WARPGROUP_VOTE)
            skip = warpgroup_all(rows_may_skip(rule, state, tile_max2, added, row_valid),
                                 1 + (warp >> 2));
#else
            skip = __syncthreads_and(rows_may_skip(rule, state, tile_max2, added, row_valid));
#endif
            if (skip) add_skipped_mass(state, added);
        }
        record_tile(params, plan, key_tile, !skip);
        float alpha[2];
        if (!skip) softmax_tile<Rule::kNeedsRowSum>(s, tile_max2, scale_log2, state, alpha);
        // The previous P.V has to finish before O is rescaled and before p is overwritten.
        warpgroup_wait<0>();
        pin_accumulator(o);
        pv_pending = !skip;
        if (skip) continue;
        rescale_output(o, alpha);
        pv_stage = stage;
#pragma unroll
        for (int kstep = 0; kstep < Traits::kKeySteps; ++kstep) {
            p[kstep][0] = Element::pack(s[2 * kstep][0], s[2 * kstep][1]);
            p[kstep][1] = Element::pack(s[2 * kstep][2], s[2 * kstep][3]);
            p[kstep][2] = Element::pack(s[2 * kstep + 1][0], s[2 * kstep + 1][1]);
            p[kstep][3] = Element::pack(s[2 * kstep + 1][2], s[2 * kstep + 1][3]);
        }
    }
    if (__all_sync(0xffffffffu, pv_pending)) {
        pin_accumulator(o);
        issue_pv(v_base + pv_stage * kKvBytes);
        warpgroup_commit();
        warpgroup_wait<0>();
        pin_accumulator(o);
    }
    copy_async_wait<0>();

    // Epilogue: normalise, write O, LSE and the recall bound of the valid rows.
    store_rows<Element, Rule::kNeedsRowSum>(params, o, state, row_valid,
                                            first_query + warp_row + (lane >> 2), batch, head,
                                            gridDim.y, n_visit == 0, lane);
}

}  // namespace psa
